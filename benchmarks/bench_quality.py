"""How well the demo recipe learns on the CPU and how far its scores move with the recording chain, before and
after the recording-chain recipe, on the same generated data.

    python benchmarks/bench_quality.py [-n 5000] [--config configs/robust.yaml] [--set training.epochs=14]...
                                       [--recipes before after] [--robustness-recordings 300] [--tag _gem]

Generates N COUGHVID-format recordings (the generator's fixed mapping, whose nuisances are independent of the
label), ingests them once, and for each recipe runs features, train and evaluate as plain Python. It prints,
side by side: the validation MAE beside the generator's noise floor (the best any model can do, expected and
realized on the very validation rows) and the predict-the-median baseline; the error on the clips the
generator gated or band-limited; and, per recording-chain transform (``coughreg.audio.recording_chain.STANDARD``),
the mean and largest change of the score over the measured validation recordings. Then the REAL recordings'
scores under each recipe, as they come out (nothing is tuned on them).

Recipes (``--set`` applies to both):
    after:  the config as given (``configs/robust.yaml``: per-clip normalisation, recording-chain copies, each clip
            paired with a copy under a consistency penalty)
    before: the same without recording-chain copies, with data-set normalisation (the recipe before them)
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

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from coughreg.audio.recording_chain import STANDARD, slug
from coughreg.config.loading import load_resolved_config
from coughreg.evaluation.evaluate import evaluate
from coughreg.features.extract import extract_features
from coughreg.ingest.manifest import ingest
from coughreg.synth.coughvid import generate_coughvid_zip, posterior_median
from coughreg.training import train

RECIPES = {
    "after": [],
    "before": ["augmentation.recording_chain_views=0", "augmentation.recording_chain_probability=0",
               "augmentation.recording_chain_consistency=0", "audio.spectrogram_normalization=Dataset"],
}
REAL = PROJECT / "tests" / "data" / "real_coughs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--config", type=Path, default=PROJECT / "configs" / "robust.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--recipes", nargs="+", default=["before", "after"], choices=sorted(RECIPES))
    parser.add_argument("--robustness-recordings", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/coughreg-quality"))
    parser.add_argument("--tag", default="", help="suffix of the recipes' folders: variants (--set) side by side on one data set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work = args.workdir
    archive = work / f"coughvid_{args.n}_{args.seed}.zip"
    generator_path = archive.with_suffix(".generator.json")
    if archive.exists():
        from coughreg.synth.coughvid import MAPPING_VERSION

        if json.loads(generator_path.read_text()).get("mapping_version") != MAPPING_VERSION:
            archive.unlink()  # made under another mapping: not the data this code describes
    if not archive.exists():
        generate_coughvid_zip(archive, args.n, seed=args.seed, workers=os.cpu_count() or 1, progress_every=500)
    generator = json.loads(generator_path.read_text())
    first = load_resolved_config(args.config, args.overrides)
    ingest(str(archive), work / "ingest", first)
    results = {}
    for name in args.recipes:
        overrides = [*args.overrides, *RECIPES[name], f"prediction.robustness_recordings={args.robustness_recordings}"]
        results[name] = run_recipe(load_resolved_config(args.config, overrides), work, name + args.tag)
    print_table(results, generator, archive.with_suffix(".truth.csv"), first.dataset.label_columns[0], args)


def run_recipe(config, work: Path, name: str) -> dict:
    folder = work / name
    started = time.perf_counter()
    extract_features(work / "ingest", folder / "features", config)
    features_s = time.perf_counter() - started
    shutil.rmtree(folder / "model", ignore_errors=True)  # train afresh: a finished model folder would be reused
    started = time.perf_counter()
    train(folder / "features", folder / "model", config)
    train_s = time.perf_counter() - started
    result = evaluate(folder / "model", folder / "features", work / "ingest", folder / "evaluation", config)
    return {"config": config, "metrics": result.metrics, "features_s": features_s, "train_s": train_s,
            "predictions": result.predictions_path, "model": folder / "model", "report": result.report_path}


def subset_errors(predictions_path: Path, truth_path: Path, label: str) -> dict[str, tuple[float, float, int]]:
    """(model MAE, floor MAE, rows) on the validation rows, overall and by what made a clip hard."""
    predictions = pd.read_parquet(predictions_path)
    truth = pd.read_csv(truth_path).rename(columns={label: "truth"})
    rows = predictions.merge(truth, left_on="id", right_on="uuid", how="inner")
    error = (rows[f"pred_{label}"] - rows["truth"]).abs()
    floor = (rows["truth"] - posterior_median(rows["evidence"].to_numpy())).abs()
    subsets = {"all": np.ones(len(rows), dtype=bool), "gated": rows["gated"].astype(bool).to_numpy(),
               "band-limited": (rows["band_limit_hz"] > 0).to_numpy(),
               "as clean as it comes": (~rows["gated"].astype(bool) & (rows["band_limit_hz"] == 0)).to_numpy()}
    return {k: (float(error[m].mean()), float(floor[m].mean()), int(m.sum())) for k, m in subsets.items() if m.any()}


def real_scores(model_dir: Path, config) -> dict[str, float]:
    """The REAL recordings scored by the first fold's models, through the scoring pipeline's own code."""
    import torch

    from coughreg.audio.frontend import LogMel
    from coughreg.evaluation.evaluate import scoring_policy
    from coughreg.model.network import CoughScorer
    from coughreg.scoring.scorer import Scorer
    from coughreg.training import load_members

    members = load_members(model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    fold = info["members"][0]["fold"]
    ensemble = CoughScorer(LogMel.from_config(config.audio),
                           [m for m, meta in zip(members, info["members"], strict=True) if meta["fold"] == fold]).eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return ensemble(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()

    scorer = Scorer.from_predict(predict, scoring_policy(config), info["label_columns"])
    return {path.name: scorer.score_file(path)[info["label_columns"][0]] for path in sorted(REAL.glob("*.mp3"))}


def print_table(results: dict, generator: dict, truth_path: Path, label: str, args) -> None:
    names = list(results)
    floor = generator["noise_floor_mae_expected"]
    any_metrics = results[names[0]]["metrics"]

    def row(title: str, values: list[str]) -> None:
        print(f"| {title} | " + " | ".join(values) + " |")

    print()
    print(f"{args.n} generated recordings (mapping version {generator['mapping_version']}), "
          f"{any_metrics['validation_rows']} validation, {results[names[0]]['config'].architecture.backbone} on the CPU; "
          f"robustness on {any_metrics.get('robustness', {}).get('recordings', 0)} validation recordings")
    print()
    row("", names)
    row("---", ["---"] * len(names))
    row("features / training time", [f"{r['features_s']:.0f} s / {r['train_s'] / 60:.1f} min" for r in results.values()])
    row("validation MAE", [f"{r['metrics']['validation_mae']:.4f}" for r in results.values()])
    row("MAE / expected noise floor", [f"{r['metrics']['validation_mae'] / floor:.2f}x (floor {floor:.4f})" for r in results.values()])
    subsets = {name: subset_errors(r["predictions"], truth_path, label) for name, r in results.items()}
    for subset in subsets[names[0]]:
        row(f"MAE / floor on these rows: {subset}",
            [f"{subsets[n][subset][0] / subsets[n][subset][1]:.2f}x ({subsets[n][subset][2]} rows)" for n in names])
    row("MAE / median baseline", [f"{r['metrics']['mae_vs_median_baseline']:.2f}" for r in results.values()])
    for transform in STANDARD:
        key = slug(transform)
        cells = []
        for result in results.values():
            numbers = result["metrics"]["robustness"]["transforms"][key]["labels"][label]
            cells.append("n/a" if numbers["mean_change"] is None else f"{numbers['mean_change']:.3f} / {numbers['max_change']:.3f}")
        row(f"{transform.name}: mean / largest change", cells)
    reals = {name: real_scores(r["model"], r["config"]) for name, r in results.items()}
    for recording in reals[names[0]]:
        row(f"REAL {recording}", [f"{reals[n][recording]:.3f}" for n in names])
    for name, result in results.items():
        print(f"report ({name}): {result['report']}")


if __name__ == "__main__":
    main()
