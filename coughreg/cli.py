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


class _ArtifactFolders:
    """Step inputs and outputs may be s3:// artifact URIs (from a pipeline run): inputs are mirrored
    into the download cache, outputs written locally and uploaded when the step succeeds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.uploads: list[tuple[Path, str]] = []

    def input(self, value) -> Path:
        from coughreg.sources import download_prefix
        from coughreg.storage import DEFAULT_CACHE, is_s3_uri

        if is_s3_uri(str(value)):
            return download_prefix(str(value), _s3_options(self.args), Path(self.args.cache_dir or DEFAULT_CACHE))
        return Path(value)

    def output(self, value) -> Path:
        import tempfile

        from coughreg.storage import is_s3_uri

        if is_s3_uri(str(value)):
            local = Path(tempfile.mkdtemp(prefix="coughreg-step-"))
            self.uploads.append((local, str(value)))
            return local
        return Path(value)

    def __enter__(self) -> _ArtifactFolders:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:  # only a step that succeeded publishes its outputs
            self.publish()

    def publish(self) -> None:
        import shutil

        from coughreg.storage import upload_folder

        for local, uri in self.uploads:
            upload_folder(local, uri, _s3_options(self.args))
            shutil.rmtree(local, ignore_errors=True)
            print(f"uploaded to {uri}")


def cmd_config(args: argparse.Namespace) -> int:
    from coughreg.config import config_to_yaml

    sys.stdout.write(config_to_yaml(_config(args)))
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from coughreg.config import config_reference

    sys.stdout.write(config_reference())
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

    with _ArtifactFolders(args) as folders:
        result = ingest(args.input, folders.output(args.out), _config(args), _s3_options(args), args.cache_dir, args.workers)
        print(f"manifest: {result.manifest_path} ({result.counts.get('ok', 0)} ok, {result.counts.get('rejected', 0)} rejected)")
    return 0


def cmd_step_features(args: argparse.Namespace) -> int:
    from coughreg.features import extract_features

    with _ArtifactFolders(args) as folders:
        result = extract_features(folders.input(args.input), folders.output(args.out), _config(args), args.workers)
        print(f"shards: {result.index_path} ({result.rows} recordings in {len(result.shards)} shards, {len(result.failures)} failed)")
    return 0


def cmd_step_train(args: argparse.Namespace) -> int:
    from coughreg.train import train

    with _ArtifactFolders(args) as folders:
        result = train(folders.input(args.input), folders.output(args.out), _config(args))
        print(f"model: {args.out} ({len(result.members)} model(s)); validation predictions: {result.predictions_path}")
    return 0


def cmd_step_evaluate(args: argparse.Namespace) -> int:
    from coughreg.evaluate import evaluate

    with _ArtifactFolders(args) as folders:
        result = evaluate(folders.input(args.model), folders.input(args.features), folders.output(args.out), _config(args))
        _print_summary(result.metrics, result.report_path, result.metrics_path, None)
    return 0


def cmd_step_export(args: argparse.Namespace) -> int:
    from coughreg.export import export

    with _ArtifactFolders(args) as folders:
        result = export(folders.input(args.model), folders.output(args.out), _config(args))
        print(f"scorer: {result.scorer_dir}\npipeline: {result.pipeline_path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from coughreg.export import load_pipeline_module

    path = load_pipeline_module().compile_pipeline(args.output, _config(args), args.data or "")
    print(f"compiled pipeline: {path}")
    return 0


def _print_summary(metrics: dict, report, metrics_path, scorer) -> None:
    print()
    print(f"validation {metrics['metric']}: {metrics['metric_value']:.4f}")
    print(f"validation MAE:          {metrics['validation_mae']:.4f}")
    print(f"median-baseline MAE:     {metrics['baseline_median_mae']:.4f}")
    print(f"mean-baseline MAE:       {metrics['baseline_mean_mae']:.4f}")
    print(f"report:  {Path(report).resolve()}")
    print(f"metrics: {Path(metrics_path).resolve()}")
    if scorer is not None:
        print(f"scorer:  {Path(scorer).resolve()}")


def cmd_run_local(args: argparse.Namespace) -> int:
    from coughreg.local_run import run_local

    if not args.data:
        raise CoughPipelineError("run-local needs --data (s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder); `make demo` runs it on generated data")
    result = run_local(args.data, _config(args), args.out)
    print(f"\nwhole pipeline through kfp.local in {result.seconds:.0f} s")
    _print_summary(result.values, result.report, result.metrics, result.scorer)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from coughreg.submit import Submission, submit

    options = Submission(
        host=args.host, namespace=args.namespace, experiment=args.experiment, run_name=args.run_name,
        pipeline_root=args.pipeline_root, token=args.token, service_account=args.service_account,
        enable_caching=False if args.no_cache else None, feature_parts=args.feature_parts, wait=args.wait,
        timeout_s=args.timeout, schedule=args.schedule,
    )
    outcome = submit(_config(args), args.data, options)
    for key, value in outcome.items():
        print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coughreg.demo import run_demo

    return run_demo(args)


def cmd_score(args: argparse.Namespace) -> int:
    from coughreg.score import load_scorer

    table = load_scorer(args.scorer).score_files(args.files)
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.to_csv(index=False), end="")
    return 0 if (table["status"] == "ok").all() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.py", description="Cough-audio regression pipeline (KFP v2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved experiment config")
    _add_config_options(config)
    config.set_defaults(func=cmd_config)

    reference = commands.add_parser("config-reference", help="every config key with type, default and meaning (Markdown)")
    reference.set_defaults(func=cmd_config_reference)

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
    ingest.add_argument("--out", required=True, help="a folder or an s3:// URI")
    ingest.add_argument("--workers", type=int, default=None)
    _add_config_options(ingest)
    _add_s3_options(ingest)
    ingest.set_defaults(func=cmd_step_ingest)

    features = steps.add_parser("features", help="ingest folder -> log-mel Parquet shards")
    features.add_argument("--input", required=True, help="the ingest step's output folder or s3:// artifact URI")
    features.add_argument("--out", required=True, help="a folder or an s3:// URI")
    _add_s3_options(features)
    features.add_argument("--workers", type=int, default=None)
    _add_config_options(features)
    features.set_defaults(func=cmd_step_features)

    train = steps.add_parser("train", help="spectrogram shards -> trained model(s) and validation predictions")
    train.add_argument("--input", required=True, help="the features step's output folder or s3:// artifact URI")
    train.add_argument("--out", required=True, help="a folder or an s3:// URI")
    _add_s3_options(train)
    _add_config_options(train)
    train.set_defaults(func=cmd_step_train)

    evaluate = steps.add_parser("evaluate", help="validation predictions -> metrics and the HTML report")
    evaluate.add_argument("--model", required=True, help="the train step's output folder or s3:// artifact URI")
    evaluate.add_argument("--features", required=True, help="the features step's output folder or s3:// artifact URI")
    evaluate.add_argument("--out", required=True, help="a folder or an s3:// URI")
    _add_s3_options(evaluate)
    _add_config_options(evaluate)
    evaluate.set_defaults(func=cmd_step_evaluate)

    export = steps.add_parser("export", help="trained model -> scorer folder and compiled pipeline")
    export.add_argument("--model", required=True, help="the train step's output folder or s3:// artifact URI")
    export.add_argument("--out", required=True, help="a folder or an s3:// URI")
    _add_s3_options(export)
    _add_config_options(export)
    export.set_defaults(func=cmd_step_export)

    compile_ = commands.add_parser("compile", help="compile the DAG to KFP IR YAML")
    compile_.add_argument("-o", "--output", type=Path, required=True)
    compile_.add_argument("--data", default=None, help="default value of the source_uri parameter")
    _add_config_options(compile_)
    compile_.set_defaults(func=cmd_compile)

    run_local = commands.add_parser("run-local", help="run the whole DAG through kfp.local")
    run_local.add_argument("--data", default=None, help="s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder")
    run_local.add_argument("--out", type=Path, default=Path("out"), help="where the run's artifacts go (default: out/)")
    _add_config_options(run_local)
    run_local.set_defaults(func=cmd_run_local)

    submit = commands.add_parser("submit", help="submit the pipeline to Kubeflow Pipelines on a cluster")
    submit.add_argument("--host", default=None, help="KFP API endpoint (default: in-cluster or kube config)")
    submit.add_argument("--namespace", default="kubeflow")
    submit.add_argument("--experiment", default="cough-regression")
    submit.add_argument("--run-name", default=None)
    submit.add_argument("--data", required=True, help="s3:// URI of the data set as the cluster sees it")
    submit.add_argument("--pipeline-root", default=None, help="s3://bucket/prefix for artifacts (default: kfp-launcher's)")
    submit.add_argument("--token", default=None, help="bearer token (default: KF_PIPELINES_TOKEN or the service account)")
    submit.add_argument("--service-account", default=None, help="Kubernetes service account the pods run as")
    submit.add_argument("--feature-parts", type=int, default=2, help="feature extraction pods (ParallelFor)")
    submit.add_argument("--no-cache", action="store_true", help="rerun every step; per step: --set cluster.cache={train: false}")
    submit.add_argument("--wait", action="store_true", help="follow the run to its end")
    submit.add_argument("--timeout", type=int, default=24 * 3600, help="seconds --wait waits")
    submit.add_argument("--schedule", default=None, metavar="CRON", help="create a recurring run, e.g. '0 0 3 * * 1'")
    _add_config_options(submit)
    submit.set_defaults(func=cmd_submit)

    demo = commands.add_parser("demo", help="generate data, serve it from a local S3 endpoint, run the whole DAG")
    demo.add_argument("-n", type=int, default=1200, help="recordings to generate")
    demo.add_argument("--seed", type=int, default=2021)
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--config", type=Path, default=None, help="default: configs/demo.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    demo.set_defaults(func=cmd_demo)

    score = commands.add_parser("score", help="score recordings with an exported scorer")
    score.add_argument("--scorer", type=Path, required=True, help="the export step's scorer folder")
    score.add_argument("--out", type=Path, default=None, help="also write the scores as CSV")
    score.add_argument("files", nargs="+", type=Path)
    score.set_defaults(func=cmd_score)
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
