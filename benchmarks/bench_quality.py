"""How well a small backbone learns on the CPU: validation MAE against the noise floor and the baseline.

    python benchmarks/bench_quality.py [-n 2000] [--config configs/demo.yaml] [--set training.epochs=14]...

The figure in the README comes from
``-n 5000 --set environment.number_of_seeds_per_run=2 --set training.epochs=6`` (an ensemble of
two short runs beats one long run at the same cost: a small backbone overfits a few thousand
clips within a dozen epochs).

Generates N COUGHVID-format recordings (the generator's fixed mapping), runs ingest, features,
train and evaluate as plain Python, and prints the validation MAE beside the generator's noise
floor (the best any model can do) and the predict-the-median baseline, with the training time.
From the generator's truth table (each clip's latent evidence and ingredients) it also prints the
floor realized on the very validation rows, and the error split by what made a clip hard: gated
clips (phone noise suppression turned the background into digital silence, which hides the level
the label is read from) and each background.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from coughreg.config import load_resolved_config  # noqa: E402
from coughreg.evaluate import evaluate  # noqa: E402
from coughreg.features import extract_features  # noqa: E402
from coughreg.ingest import ingest  # noqa: E402
from coughreg.synth import generate_coughvid_zip, posterior_median  # noqa: E402
from coughreg.training import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--config", type=Path, default=PROJECT / "configs" / "demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/coughreg-quality"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = load_resolved_config(args.config, args.overrides)
    work = args.workdir
    archive = work / f"coughvid_{args.n}_{args.seed}.zip"
    if not archive.exists():
        generate_coughvid_zip(archive, args.n, seed=args.seed, workers=os.cpu_count() or 1, progress_every=500)
    generator = json.loads(archive.with_suffix(".generator.json").read_text())
    ingest(str(archive), work / "ingest", config)
    started = time.perf_counter()
    extract_features(work / "ingest", work / "features", config)
    features_s = time.perf_counter() - started
    shutil.rmtree(work / "model", ignore_errors=True)  # train afresh: a finished model folder would be reused
    started = time.perf_counter()
    train(work / "features", work / "model", config)
    train_s = time.perf_counter() - started
    metrics = evaluate(work / "model", work / "features", work / "evaluation", config).metrics
    floor = generator["noise_floor_mae_expected"]
    print()
    print(f"recordings             {args.n} ({metrics['validation_rows']} validation)")
    print(f"backbone               {config.architecture.backbone}, {config.training.epochs} epochs, CPU")
    print(f"features time          {features_s:.0f} s")
    print(f"training time          {train_s:.0f} s ({train_s / 60:.1f} min)")
    print(f"validation MAE         {metrics['validation_mae']:.4f}")
    print(f"noise floor MAE        {floor:.4f}  -> model / floor = {metrics['validation_mae'] / floor:.2f}")
    print(f"median-baseline MAE    {metrics['baseline_median_mae']:.4f}  -> model / baseline = {metrics['mae_vs_median_baseline']:.2f}")
    breakdown(work / "model" / "predictions.parquet", archive.with_suffix(".truth.csv"), config.dataset.label_columns[0])
    print(f"report                 {work / 'evaluation' / 'report.html'}")


def breakdown(predictions_path: Path, truth_path: Path, label: str) -> None:
    """The model's error beside the Bayes floor on the same validation rows, overall and by subset."""
    predictions = pd.read_parquet(predictions_path)
    truth = pd.read_csv(truth_path).rename(columns={label: "truth"})
    rows = predictions.merge(truth, left_on="id", right_on="uuid", how="inner")
    error = (rows[f"pred_{label}"] - rows["truth"]).abs()
    floor = (rows["truth"] - posterior_median(rows["evidence"].to_numpy())).abs()
    print(f"floor on these rows    {floor.mean():.4f}  -> model / floor = {error.mean() / floor.mean():.2f}")
    print("by subset              rows   model MAE   floor MAE   model / floor")
    subsets = [("gated", rows["gated"].astype(bool)), ("not gated", ~rows["gated"].astype(bool))]
    subsets += [(f"background {kind}", rows["background"] == kind) for kind in sorted(rows["background"].unique())]
    for name, chosen in subsets:
        if chosen.any():
            print(f"  {name:<20} {int(chosen.sum()):>5}   {error[chosen].mean():9.4f}   {floor[chosen].mean():9.4f}   "
                  f"{error[chosen].mean() / floor[chosen].mean():6.2f}")


if __name__ == "__main__":
    main()
