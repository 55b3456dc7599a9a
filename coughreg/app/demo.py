"""The README's main job: generated COUGHVID-format data, served from a local S3 endpoint, through the whole DAG."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from types import ModuleType

from coughreg.app.local_run import run_local
from coughreg.config.loading import PROJECT_ROOT, load_resolved_config
from coughreg.evaluation.robustness import headline
from coughreg.io.local_s3 import LocalS3
from coughreg.synth.coughvid import generate_coughvid_zip

log = logging.getLogger(__name__)

BUCKET = "coughvid-demo"
KEY = "ht_datasets/audio_regression/covid19-cough-audio-classification.zip"


def _demo_data(out: Path, n: int, seed: int) -> tuple[Path, dict]:
    """Generate the data set once; a rerun with the same size and seed reuses it."""
    archive = out / "data" / f"coughvid_generated_{n}_{seed}.zip"
    report_path = archive.with_suffix(".generator.json")
    if archive.exists() and report_path.exists() and _current_generator(archive):
        log.info("demo data: reusing %s", archive)
        return archive, json.loads(report_path.read_text())
    log.info("demo data: generating %d COUGHVID-format recordings (seed %d) -> %s", n, seed, archive)
    report = generate_coughvid_zip(archive, n, seed=seed, workers=os.cpu_count() or 1, progress_every=200)
    return archive, report


def _current_generator(archive: Path) -> bool:
    """The archive was written by this generator version (its comment holds the law the evaluation reads)."""
    import zipfile

    from coughreg.audio.recording_chain import CHAIN_VERSION
    from coughreg.ingest.manifest import generator_of
    from coughreg.synth.coughvid import MAPPING_VERSION

    try:
        with zipfile.ZipFile(archive) as bundle:
            facts = generator_of(bundle.comment)
    except (OSError, zipfile.BadZipFile):
        return False
    return facts is not None and facts.get("mapping_version") == MAPPING_VERSION \
        and facts.get("recording_chain_version") == CHAIN_VERSION  # the generator gates and band-limits with the chain


def run_demo(pipeline: ModuleType, args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    config = load_resolved_config(args.config or PROJECT_ROOT / "configs" / "demo.yaml", args.overrides)
    archive, generator = _demo_data(out, args.n, args.seed)
    with LocalS3(enforce_auth=True) as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(archive), BUCKET, KEY)
        # The steps run as subprocesses and find the endpoint the standard way: AWS_* variables.
        os.environ.update(server.credentials.env(server.endpoint_url))
        uri = f"s3://{BUCKET}/{KEY}"
        log.info("demo data served at %s from %s (signed requests only)", uri, server.endpoint_url)
        result = run_local(pipeline, uri, config, out / "run", cache=not args.no_cache)
    metrics = result.values
    floor = generator["noise_floor_mae_expected"]
    print()
    print(f"whole pipeline through kfp.local in {result.seconds:.0f} s, data from {uri}")
    low, high = metrics.get("validation_mae_ci95_low"), metrics.get("validation_mae_ci95_high")
    interval = f"  (95% interval {low:.4f} to {high:.4f})" if low is not None and high is not None else ""
    print(f"validation MAE:      {metrics['validation_mae']:.4f}{interval}")
    print(f"median-baseline MAE: {metrics['baseline_median_mae']:.4f}  (model/baseline {metrics['mae_vs_median_baseline']:.2f})")
    print(f"noise floor MAE:     {floor:.4f}  (the best any model can do on this generated data)")
    moved = headline(metrics)
    if moved:
        print(f"recording chain:     {moved}  (how far scores move with gain, gates, codecs, knocks; see the report)")
    print(f"report:  {_shown(result.report)}")
    print(f"metrics: {_shown(result.metrics)}")
    print(f"model:   {_shown(result.model)}")
    if result.scorer is None:
        print(f"quality gate failed: {result.gate.get('message', 'see the report')}")
        return 0
    samples = _sample_recordings(archive, out / "samples")
    scorer = _shown(result.scorer)
    print(f"scorer:  {scorer}  (stands alone: torch, numpy, PyAV; see its README.md)")
    print()
    print(f"score:   python {scorer}/score.py {_shown(samples)} --out {_shown(out / 'scores.csv')}")
    print(f"serve:   python {scorer}/score.py serve --port 8080   "
          f"# then: curl --data-binary @{_shown(next(iter(sorted(samples.iterdir()))))} http://127.0.0.1:8080/score")
    return 0


def _shown(path: Path) -> str:
    """A path as short as it can be printed: relative to the working folder when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _sample_recordings(archive: Path, folder: Path, count: int = 8) -> Path:
    """A few of the demo's recordings, to try the scorer on."""
    import zipfile

    from coughreg.audio.files import is_audio_name
    from coughreg.io.storage import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as bundle:
        for name in sorted(n for n in bundle.namelist() if is_audio_name(n))[:count]:
            atomic_write_bytes(folder / Path(name).name, bundle.read(name))
    return folder
