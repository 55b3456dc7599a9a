"""What the browser's noise gate left of the coughs in the clips whose score it moved: a model that hears only the
coughs must move too where the gate erased them.

    python benchmarks/robustness_causes.py /tmp/q5000 [--recipe after] [--n 5000] [--seed 77] [--moved 0.2]

Reads a ``bench_quality.py`` work folder: the generated data set's truth (``coughvid_<n>_<seed>.truth.csv``) and a
recipe's ``evaluation/robustness.parquet``. Each measured clip is made again by the generator with its coughs
alone (``coughreg.synth.coughvid.regenerate_clip``), the evaluation's gate (``recording_chain.NoiseGate``) is metered on
the clip as generated (before its codec: the evaluation gates the decoded recording, so the share is a close
estimate), and the share of the coughs' energy it lets through is set beside the change of the score. The gate
opens 10 dB above the clip's noise floor, so coughs less than about 10 dB above the background (cough evidence
below 0.64 in the generator's law) are erased unless something louder holds the gate open around them. It prints
the change of the score by how much of the coughs the gate kept, and the clips that moved most.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coughreg.audio.recording_chain import NoiseGate, slug
from coughreg.synth.coughvid import SAMPLE_RATE, regenerate_clip

KEPT_BINS = [0.0, 0.1, 0.5, 0.9, 1.0001]
KEPT_NAMES = ["< 10 % (erased)", "10-50 %", "50-90 %", ">= 90 % (kept)"]


def cough_energy_kept(seed: int, index: int, uuid: str) -> float:
    identifier, samples, info = regenerate_clip(seed, index)
    if identifier != uuid:
        raise SystemExit(f"clip {index} of seed {seed} is {identifier}, the truth file says {uuid}: another data set")
    coughs = info["coughs"].astype(np.float64)
    total = float(np.sum(coughs**2))
    if total == 0:
        return float("nan")
    gain = NoiseGate().gain(samples, SAMPLE_RATE)
    return float(np.sum((coughs * gain) ** 2) / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--recipe", default="after")
    parser.add_argument("-n", "--n", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--label", default="cough_detected")
    parser.add_argument("--moved", type=float, default=0.2, help="a change this large counts as moved")
    args = parser.parse_args()
    truth = pd.read_csv(args.workdir / f"coughvid_{args.n}_{args.seed}.truth.csv")
    truth["index"] = np.arange(len(truth))
    robustness = pd.read_parquet(args.workdir / args.recipe / "evaluation" / "robustness.parquet")
    gate = robustness[(robustness["transform"] == slug(NoiseGate())) & (robustness["label"] == args.label)]
    gate = gate.merge(truth.rename(columns={"uuid": "id"}), on="id")
    gate = gate[~gate["gated"]].copy()  # a clip the generator gated already: the gate has nothing left to take
    gate["kept"] = [cough_energy_kept(args.seed, int(i), u) for i, u in zip(gate["index"], gate["id"])]
    gate["moved"] = gate["change"].abs()
    gate["coughs kept by the gate"] = pd.cut(gate["kept"], KEPT_BINS, labels=KEPT_NAMES, right=False)
    table = gate.groupby("coughs kept by the gate", observed=False)["moved"].agg(
        clips="count", mean_change="mean", largest="max", moved=lambda m: int((m > args.moved).sum()))
    print(f"noise gate on {len(gate)} clips the generator did not gate ({args.recipe}):")
    print(table.round(3).to_markdown())
    top = gate.sort_values("moved", ascending=False).head(12)
    print("\nthe clips that moved most:")
    print(top[["id", "evidence", "background", "distractor", "kept", "original", "transformed"]].round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
