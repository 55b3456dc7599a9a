"""The project's command line (``python pipeline.py ...``): config, data generation, single steps, runs.

``pipeline.py`` passes itself (the module that defines the DAG) to ``main``; the commands that
compile (``compile``, ``run-local``, ``submit``, ``demo``) take the DAG from there, so no library
code imports ``pipeline.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

from coughreg.runtime.errors import CoughPipelineError
from coughreg.runtime.names import PIPELINE_NAME

log = logging.getLogger("coughreg")


def location(text: str) -> str:
    """An argument that names a place (an ``s3://`` or other URI, or a path): refused when it carries
    credentials (``coughreg.io.storage.checked_uri``); argparse names the argument and exits with status 2."""
    from coughreg.io.storage import checked_uri

    try:
        return checked_uri(text)
    except CoughPipelineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_config_options(parser: argparse.ArgumentParser, step: bool = False) -> None:
    default = (
        "the keys the input artifact was made with, and configs/coughvid_ht.yaml's for this step's own keys" if step
        else "configs/coughvid_ht.yaml"
    )
    parser.add_argument("--config", type=Path, default=None, help=f"experiment YAML (default: {default})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set training.epochs=1",
    )


def _add_s3_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", type=location, default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL)")
    parser.add_argument("--region", default=None, help="S3 region (default: the AWS chain)")
    parser.add_argument("--no-sign-request", action="store_true", help="anonymous access to a public bucket")
    parser.add_argument("--cache-dir", type=Path, default=None, help="download cache (default: ~/.cache/coughreg)")


def _config(args: argparse.Namespace):
    from coughreg.config.loading import load_resolved_config

    return load_resolved_config(args.config, args.overrides)


def _given(args: argparse.Namespace):
    from coughreg.config.given import Given

    given = Given.command_line(args.config, args.overrides)
    log.info("config: %s", given.described)  # which config a step started from, on its first line
    return given


def _s3(args: argparse.Namespace) -> dict:
    from coughreg.io.storage import S3Options

    options = S3Options(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.no_sign_request)
    return {"s3": options, "cache_dir": args.cache_dir}


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from coughreg.config.loading import config_to_yaml
    from coughreg.config.ownership import step_arguments

    config = _config(args)
    if args.step:
        sys.stdout.write(yaml.safe_dump(step_arguments(config, args.step), sort_keys=False, width=10**6))
    else:
        sys.stdout.write(config_to_yaml(config))
    return 0


CONFIG_REFERENCE_PAGE = Path("docs") / "config-reference.md"  # under the project root
CONFIG_REFERENCE_START = "<!-- config-reference:start -->\n"
CONFIG_REFERENCE_END = "<!-- config-reference:end -->"


def cmd_config_reference(args: argparse.Namespace) -> int:
    """Print the config reference table, or (``--write``) put it between the markers of docs/config-reference.md."""
    from coughreg.config.reference import config_reference

    table = config_reference()
    if not args.write:
        sys.stdout.write(table)
        return 0
    from coughreg.config.loading import PROJECT_ROOT
    from coughreg.io.storage import atomic_write_text

    page = PROJECT_ROOT / CONFIG_REFERENCE_PAGE
    if not page.is_file():
        raise CoughPipelineError(f"{page}: missing; --write replaces the table in that page of the project's checkout")
    text = page.read_text(encoding="utf-8")
    head, start, rest = text.partition(CONFIG_REFERENCE_START)
    _, end, tail = rest.partition(CONFIG_REFERENCE_END)
    if not start or not end:
        raise CoughPipelineError(f"{page}: no {CONFIG_REFERENCE_START.strip()} ... {CONFIG_REFERENCE_END} section; "
                                 "put those two lines where the table goes and run it again")
    written = head + start + table + end + tail
    if written != text:
        atomic_write_text(page, written)
    print(f"{page}: {'written' if written != text else 'already up to date'}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from coughreg.runtime.resources import available_cpus
    from coughreg.scoring.outputs import output_file
    from coughreg.synth.coughvid import generate_coughvid_zip

    with contextlib.suppress(OSError):  # a fresh clone has no data/ folder; a file in the way is named just below
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out)

    report = generate_coughvid_zip(
        args.out, args.n, seed=args.seed, workers=args.workers or available_cpus(), folder=args.folder, with_json=not args.no_json
    )
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({args.n} recordings); noise floor (best reachable MAE): {report['noise_floor_mae_expected']}")
    return 0


def cmd_step_ingest(args: argparse.Namespace) -> int:
    from coughreg.steps.ingest import ingest_step

    report = ingest_step(args.input, args.out, _given(args), workers=args.workers, **_s3(args))
    print(f"manifest: {args.out} ({report['ok']} ok, {report['rejected']} rejected); data version: {report['source_version']}")
    return 0


def cmd_step_features(args: argparse.Namespace) -> int:
    from coughreg.steps.features import features_step

    report = features_step(args.input, args.out, _given(args), workers=args.workers, **_s3(args))
    print(f"shards: {args.out} ({report['rows']} recordings in {report['shards']} shards, {len(report['failures'])} failed)")
    return 0


def cmd_step_train(args: argparse.Namespace) -> int:
    from coughreg.steps.train import train_step

    summary = train_step(args.input, args.out, _given(args), **_s3(args))
    if summary:  # one line from rank 0 when ranks were started by hand (torchrun)
        print(f"model: {args.out} ({summary['members']} model(s), seed {summary['seed']})")
    return 0


def cmd_step_evaluate(args: argparse.Namespace) -> int:
    from coughreg.steps.evaluate import evaluate_step

    metrics = evaluate_step(args.model, args.features, args.dataset, args.out, _given(args), **_s3(args))
    _print_summary(metrics, {"report": f"{args.out}/report.html", "metrics": f"{args.out}/metrics.json"})
    print(f"quality gate {metrics['quality_gate']['verdict']}: {metrics['quality_gate']['message']}")
    return 0


def cmd_step_export(args: argparse.Namespace) -> int:
    from coughreg.steps.export import export_step

    outcome = export_step(args.model, args.evaluation, args.out, _given(args), **_s3(args))
    print(f"scorer: {outcome['scorer']} ({', '.join(outcome['programs'].values()) or 'training.build_scoring_pipelines is false'})")
    return 0


def cmd_step_score_test_table(args: argparse.Namespace) -> int:
    from coughreg.steps.score_test_table import score_test_table_step

    summary = score_test_table_step(args.scorer, args.input, args.out, **_s3(args))
    print(f"test predictions: {args.out}/test_predictions.parquet ({summary['test_scored']} scored, {summary['test_failed']} failed)")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from coughreg.config.given import givens_of
    from coughreg.steps.preflight import preflight_step

    outcome = preflight_step(args.data or "", givens_of(_config(args)), s3=_s3(args)["s3"])
    for key, value in outcome.items():
        print(f"{key}: {value}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    path = args.pipeline.compile_pipeline(args.output, _config(args), args.data or "", args.feature_parts)
    print(f"compiled pipeline: {path}")
    return 0


def cmd_cache_diff(args: argparse.Namespace) -> int:
    from coughreg.app.cache_keys import compare, format_comparison, read_spec

    print(format_comparison(compare(read_spec(args.before), read_spec(args.after))))
    return 0


def _print_summary(metrics: dict, paths: dict[str, object]) -> None:
    print()
    print(f"validation {metrics['metric']}: {metrics['metric_value']:.4f}")
    print(f"validation MAE:          {metrics['validation_mae']:.4f}")
    print(f"median-baseline MAE:     {metrics['baseline_median_mae']:.4f}")
    print(f"mean-baseline MAE:       {metrics['baseline_mean_mae']:.4f}")
    for name, path in paths.items():
        print(f"{name + ':':<8} {path}")


def print_run(result) -> None:
    """A local run's figures, where its results are and, when the model failed the quality gate, why."""
    _print_summary(result.values, {"report": result.report, "metrics": result.metrics, "model": result.model})
    if result.scorer is None:
        print(f"quality gate failed: {result.gate.get('message', 'see the report')}")
        print("scorer:  none exported (the model did not pass the quality gate)")
    else:
        print(f"scorer:  {result.scorer}")
        print(f"score:   python {result.scorer / 'score.py'} RECORDING_OR_FOLDER... --out scores.csv")
        print(f"serve:   python {result.scorer / 'score.py'} serve --port 8080")


def cmd_run_local(args: argparse.Namespace) -> int:
    from coughreg.app.local_run import run_local
    from coughreg.scoring.outputs import output_folder

    output_folder(args.out)

    if not args.data:
        raise CoughPipelineError("run-local needs --data (s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder); `make demo` runs it on generated data")
    result = run_local(args.pipeline, args.data, _config(args), args.out, cache=not args.no_cache, feature_parts=args.feature_parts)
    print(f"\nwhole pipeline through kfp.local in {result.seconds:.0f} s (compiled: {result.pipeline})")
    print_run(result)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from coughreg.app.submit import Submission, submit
    from coughreg.scoring.outputs import output_folder

    output_folder(args.out)

    options = Submission(
        host=args.host, namespace=args.namespace, experiment=args.experiment, run_name=args.run_name,
        pipeline_root=args.pipeline_root, token=args.token, service_account=args.service_account,
        enable_caching=False if args.no_cache else None, feature_parts=args.feature_parts, wait=args.wait,
        timeout_s=args.timeout, schedule=args.schedule, out=args.out,
    )
    outcome = submit(args.pipeline, _config(args), args.data, options)
    for key, value in outcome.items():
        print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coughreg.app.demo import run_demo
    from coughreg.scoring.outputs import output_folder

    output_folder(args.out)

    return run_demo(args.pipeline, args)


def _scorer(args: argparse.Namespace):
    from coughreg.app.batch_score import open_scorer

    return open_scorer(args.scorer, args.program, **_s3(args))


def cmd_score(args: argparse.Namespace) -> int:
    from coughreg.app.batch_score import expand_inputs
    from coughreg.scoring.cli import score_table
    from coughreg.scoring.table import check_target

    check_target(args.out)  # before anything is downloaded
    logging.getLogger("coughreg.io.storage").setLevel(logging.WARNING)  # not a line per object fetched
    scorer = _scorer(args)
    return score_table(scorer, expand_inputs(args.inputs, _s3(args)["s3"]), args.out, args.workers)


def cmd_serve(args: argparse.Namespace) -> int:
    from coughreg.scoring.cli import serve_scorer

    return serve_scorer(_scorer(args), args.host, args.port, args.workers, args.max_body_mb)


def _scorer_parser(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("--scorer", type=location, required=True, help="the export step's scorer: a folder or its s3:// artifact URI")
    parser.add_argument("--program", choices=["torchscript", "export"], default="torchscript",
                        help="which of the folder's programs runs (default: torchscript, the faster on CPUs)")
    _add_s3_options(parser)
    return parser


def _step_parser(steps, name: str, help_text: str, inputs: list[tuple[str, str]]) -> argparse.ArgumentParser:
    parser = steps.add_parser(name, help=help_text)
    for flag, what in inputs:
        parser.add_argument(flag, type=location, required=True, help=f"{what}: a folder or an s3:// artifact URI")
    parser.add_argument("--out", type=location, required=True, help="a folder or an s3:// URI (uploaded when the step succeeds)")
    _add_s3_options(parser)
    _add_config_options(parser, step=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.py", description="Cough-audio regression pipeline (KFP v2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved experiment config (or one step's parameter)")
    config.add_argument("--step", choices=["ingest", "features", "train", "evaluate", "export"], default=None,
                        help="print only the keys this step receives (its <step>_config parameter)")
    _add_config_options(config)
    config.set_defaults(func=cmd_config)

    reference = commands.add_parser("config-reference", help="every config key with type, default and meaning (Markdown)")
    reference.add_argument("--write", action="store_true",
                           help=f"write it into {CONFIG_REFERENCE_PAGE.as_posix()} between its markers instead of printing it")
    reference.set_defaults(func=cmd_config_reference)

    generate = commands.add_parser("generate", help="write a generated COUGHVID-format zip")
    generate.add_argument("--out", type=Path, required=True, help="the zip to write")
    generate.add_argument("-n", type=int, default=200, help="number of recordings")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    generate.add_argument("--folder", default="public_dataset", help="folder inside the zip ('' for the root)")
    generate.add_argument("--no-json", action="store_true", help="omit the <uuid>.json files")
    generate.set_defaults(func=cmd_generate)

    step = commands.add_parser("step", help="run one step outside KFP (the same code the pipeline's component runs)")
    steps = step.add_subparsers(dest="step", required=True)
    ingest = steps.add_parser("ingest", help="data set (s3://, zip, folder) -> manifest.parquet + audio")
    ingest.add_argument("--input", type=location, required=True, help="s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder")
    ingest.add_argument("--out", type=location, required=True, help="a folder or an s3:// URI")
    ingest.add_argument("--workers", type=int, default=None)
    _add_config_options(ingest, step=True)
    _add_s3_options(ingest)
    ingest.set_defaults(func=cmd_step_ingest)
    features = _step_parser(steps, "features", "ingest output -> log-mel Parquet shards", [("--input", "the ingest output")])
    features.add_argument("--workers", type=int, default=None)
    features.set_defaults(func=cmd_step_features)
    train = _step_parser(steps, "train", "spectrogram shards -> trained model(s) and validation predictions",
                         [("--input", "the features output")])
    train.set_defaults(func=cmd_step_train)
    evaluate = _step_parser(steps, "evaluate", "validation recordings scored from audio -> metrics, quality gate, HTML report",
                            [("--model", "the train output"), ("--features", "the features output it was trained on"),
                             ("--dataset", "the ingest output those features were made from")])
    evaluate.set_defaults(func=cmd_step_evaluate)
    export = _step_parser(steps, "export", "evaluated model -> scorer folder",
                          [("--model", "the train output"), ("--evaluation", "the evaluate output of that model")])
    export.set_defaults(func=cmd_step_export)
    score_step = steps.add_parser("score-test-table", aliases=["score"],
                                  help="step 6: the test table (dataset.test_dataframe) scored with an exported scorer")
    score_step.add_argument("--scorer", type=location, required=True, help="the export output: a folder or an s3:// artifact URI")
    score_step.add_argument("--input", type=location, required=True, help="the ingest output holding the test rows: a folder or an s3:// URI")
    score_step.add_argument("--out", type=location, required=True, help="a folder or an s3:// URI (uploaded when the step succeeds)")
    _add_s3_options(score_step)
    score_step.set_defaults(func=cmd_step_score_test_table)

    check = commands.add_parser("preflight", help="the pipeline's first step here: config, data, locations, GPUs, weights")
    check.add_argument("--data", type=location, default=None, help="s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder")
    _add_s3_options(check)
    _add_config_options(check)
    check.set_defaults(func=cmd_preflight)

    compile_ = commands.add_parser("compile", help="compile the DAG to KFP IR YAML")
    compile_.add_argument("-o", "--output", type=Path, required=True)
    compile_.add_argument("--data", type=location, default=None, help="default value of the source_uri parameter")
    compile_.add_argument("--feature-parts", type=int, default=2, help="feature extraction pods (ParallelFor)")
    _add_config_options(compile_)
    compile_.set_defaults(func=cmd_compile)

    diff = commands.add_parser("cache-diff", help="which tasks of a compiled pipeline a resubmission would take from KFP's cache")
    diff.add_argument("before", type=Path, help="the compiled pipeline of the earlier run")
    diff.add_argument("after", type=Path, help="the compiled pipeline to submit")
    diff.set_defaults(func=cmd_cache_diff)

    run_local = commands.add_parser("run-local", help="run the whole DAG through kfp.local")
    run_local.add_argument("--data", type=location, default=None, help="s3://bucket/key.zip, s3://bucket/prefix/, a zip or a folder")
    run_local.add_argument("--out", type=Path, default=Path("out"), help="where the run's artifacts go (default: out/)")
    run_local.add_argument("--no-cache", action="store_true", help="run every step (default: reuse unchanged steps from an earlier run in --out)")
    run_local.add_argument("--feature-parts", type=int, default=2, help="branches of the features ParallelFor")
    _add_config_options(run_local)
    run_local.set_defaults(func=cmd_run_local)

    submit = commands.add_parser("submit", help="submit the pipeline to Kubeflow Pipelines on a cluster")
    submit.add_argument("--host", type=location, default=None, help="KFP API endpoint (default: in-cluster or kube config)")
    submit.add_argument("--namespace", default="kubeflow")
    submit.add_argument("--experiment", default=PIPELINE_NAME)
    submit.add_argument("--run-name", default=None)
    submit.add_argument("--data", type=location, required=True, help="s3:// URI of the data set as the cluster sees it")
    submit.add_argument("--pipeline-root", type=location, default=None, help="s3://bucket/prefix for artifacts (default: kfp-launcher's)")
    submit.add_argument("--token", default=None, help="bearer token (default: KF_PIPELINES_TOKEN or the service account)")
    submit.add_argument("--service-account", default=None, help="Kubernetes service account the pods run as")
    submit.add_argument("--feature-parts", type=int, default=2, help="feature extraction pods (ParallelFor)")
    submit.add_argument("--no-cache", action="store_true", help="rerun every step; per step: --set 'cluster.cache={train: false}'")
    submit.add_argument("--wait", action="store_true", help="follow the run to its end")
    submit.add_argument("--timeout", type=int, default=24 * 3600, help="seconds --wait waits")
    submit.add_argument("--schedule", default=None, metavar="CRON", help="create a recurring run, e.g. '0 0 3 * * 1'")
    submit.add_argument("--out", type=Path, default=Path("out/submitted"), help="where the compiled pipeline.yaml is kept")
    _add_config_options(submit)
    submit.set_defaults(func=cmd_submit)

    demo = commands.add_parser("demo", help="generate data, serve it from a local S3 endpoint, run the whole DAG")
    demo.add_argument("-n", type=int, default=600, help="recordings to generate")
    demo.add_argument("--seed", type=int, default=2021)
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--no-cache", action="store_true", help="run every step (default: reuse unchanged steps of an earlier demo)")
    demo.add_argument("--config", type=Path, default=None, help="default: configs/demo.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    demo.set_defaults(func=cmd_demo)

    from coughreg.scoring.cli import add_score_arguments, add_serve_arguments

    score = _scorer_parser(commands, "score", "score recordings (files, folders, globs, s3:// prefixes) with an exported scorer")
    add_score_arguments(score, location)
    score.set_defaults(func=cmd_score)
    serve = _scorer_parser(commands, "serve", "serve an exported scorer over HTTP (plain and KServe V1)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(pipeline: ModuleType | None = None, argv: list[str] | None = None) -> int:
    """Run one command. ``pipeline`` is the module that defines the DAG (``pipeline.py`` passes itself)."""
    from coughreg.steps.harness import setup_logging

    args = build_parser().parse_args(argv)
    args.pipeline = pipeline
    setup_logging(args.verbose)
    if pipeline is None and args.command in ("compile", "run-local", "submit", "demo"):
        raise SystemExit(f"{args.command}: run it as `python pipeline.py {args.command}` (the DAG lives there)")
    try:
        return args.func(args)
    except CoughPipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
