"""The project's command line (``python pipeline.py ...``): config, data generation and single steps."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from coughreg.errors import CoughPipelineError

log = logging.getLogger("coughreg")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML (default: configs/coughvid_ht.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set training.epochs=1",
    )


def _add_s3_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL)")
    parser.add_argument("--region", default=None, help="S3 region (default: the AWS chain)")
    parser.add_argument("--no-sign-request", action="store_true", help="anonymous access to a public bucket")
    parser.add_argument("--cache-dir", type=Path, default=None, help="download cache (default: ~/.cache/coughreg)")


def _config(args: argparse.Namespace):
    from coughreg.config import load_resolved_config

    return load_resolved_config(args.config, args.overrides)


def _s3_options(args: argparse.Namespace):
    from coughreg.storage import S3Options

    return S3Options(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.no_sign_request)


def cmd_config(args: argparse.Namespace) -> int:
    from coughreg.config import config_to_yaml

    sys.stdout.write(config_to_yaml(_config(args)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from coughreg.synth import generate_coughvid_zip

    report = generate_coughvid_zip(
        args.out, args.n, seed=args.seed, workers=args.workers, folder=args.folder, with_json=not args.no_json
    )
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({args.n} recordings); noise floor (best reachable MAE): {report['noise_floor_mae_expected']}")
    return 0


def cmd_step_ingest(args: argparse.Namespace) -> int:
    from coughreg.ingest import ingest

    result = ingest(args.input, args.out, _config(args), _s3_options(args), args.cache_dir, args.workers)
    print(f"manifest: {result.manifest_path} ({result.counts.get('ok', 0)} ok, {result.counts.get('rejected', 0)} rejected)")
    return 0


def cmd_step_features(args: argparse.Namespace) -> int:
    from coughreg.features import extract_features

    result = extract_features(args.input, args.out, _config(args), args.workers)
    print(f"shards: {result.index_path} ({result.rows} recordings in {len(result.shards)} shards, {len(result.failures)} failed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.py", description="Cough-audio regression pipeline (KFP v2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved experiment config")
    _add_config_options(config)
    config.set_defaults(func=cmd_config)

    generate = commands.add_parser("generate", help="write a generated COUGHVID-format zip")
    generate.add_argument("--out", type=Path, required=True, help="the zip to write")
    generate.add_argument("-n", type=int, default=200, help="number of recordings")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--workers", type=int, default=1)
    generate.add_argument("--folder", default="public_dataset", help="folder inside the zip ('' for the root)")
    generate.add_argument("--no-json", action="store_true", help="omit the <uuid>.json files")
    generate.set_defaults(func=cmd_generate)

    step = commands.add_parser("step", help="run one step outside KFP")
    steps = step.add_subparsers(dest="step", required=True)
    ingest = steps.add_parser("ingest", help="data set (s3://, zip, folder) -> manifest.parquet + audio")
    ingest.add_argument("--input", required=True, help="s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder")
    ingest.add_argument("--out", type=Path, required=True)
    ingest.add_argument("--workers", type=int, default=None)
    _add_config_options(ingest)
    _add_s3_options(ingest)
    ingest.set_defaults(func=cmd_step_ingest)

    features = steps.add_parser("features", help="ingest folder -> log-mel Parquet shards")
    features.add_argument("--input", type=Path, required=True, help="the ingest step's output folder")
    features.add_argument("--out", type=Path, required=True)
    features.add_argument("--workers", type=int, default=None)
    _add_config_options(features)
    features.set_defaults(func=cmd_step_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except CoughPipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
