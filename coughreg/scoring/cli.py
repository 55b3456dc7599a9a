"""The scorer folder's command line (its ``score.py``), which ``pipeline.py score`` and ``serve`` share.

    python score.py INPUT... [--out FILE.csv|FILE.parquet] [--workers N]
    python score.py serve [--host H] [--port P] [--workers N] [--max-body-mb MB]

INPUT is a file, a folder (every non-hidden file below it, one row each) or a quoted glob. Without
``--out`` the table goes to standard output as CSV; progress always goes to standard error. Exit
status: 0 every recording scored, 1 some could not be (their rows say why), 2 unusable arguments
(nothing scored).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cpus import plan_threads
from .errors import CoughPipelineError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_SOME_FAILED, EXIT_UNUSABLE = 0, 1, 2


def score_table(scorer, items: list[tuple[str, str | Path]], out: str | Path | None, workers: int | None = None) -> int:
    """Score ``(name, local path)`` items into one table (``out``, or CSV on standard output); the exit status."""
    from .table import check_target, frame, write

    check_target(out)
    if not items:
        raise CoughPipelineError("the inputs name no file to score")
    workers = plan_threads(workers)
    log.info("scoring %d recording(s) with %s (%s program, %d at once)", len(items), scorer.folder, scorer.program_name, workers)
    rows = scorer.score_paths(items, workers)
    write(frame(rows, scorer.label_columns), out)
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        log.warning("not scored: %s", row["reason"])
    log.info("%d scored, %d failed%s", len(rows) - len(failed), len(failed), f" -> {out}" if out else "")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def serve_scorer(scorer, host: str, port: int, workers: int | None, max_body_mb: float) -> int:
    from .server import serve

    serve(scorer, host, port, plan_threads(workers), max_body_mb)
    return EXIT_OK


def add_score_arguments(parser: argparse.ArgumentParser, location=None) -> None:
    """``INPUT...``, ``--out``, ``--workers``; ``location`` checks each input (the product's URI check)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=location, help="recordings: files, folders (recursive), quoted globs")
    parser.add_argument("--out", default=None, help="write the table here (.csv or .parquet; default: CSV on standard output)")
    parser.add_argument("--workers", type=int, default=None, help="recordings scored at once (default: one per CPU)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=None, help="recordings scored at once (default: one per CPU)")
    parser.add_argument("--max-body-mb", type=float, default=50.0, help="larger request bodies are refused (413)")


def setup_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def main(argv: list[str] | None = None, folder: str | Path | None = None) -> int:
    """``score.py``: score recordings, or ``serve`` them over HTTP, with the scorer in ``folder`` (default:
    the folder this package sits in)."""
    from .inputs import expand
    from .scorer import Scorer

    argv = sys.argv[1:] if argv is None else list(argv)
    serving = bool(argv) and argv[0] == "serve"
    parser = argparse.ArgumentParser(prog="score.py" + (" serve" if serving else ""),
                                     description="Serve the scorer over HTTP." if serving else "Score recordings with this scorer.")
    parser.add_argument("--scorer", type=Path, default=Path(folder or Path(__file__).resolve().parents[1]),
                        help="the scorer folder (default: the one this script is in)")
    parser.add_argument("--program", choices=["torchscript", "export"], default="torchscript",
                        help="which of the folder's programs runs (default: torchscript, the faster on CPUs)")
    (add_serve_arguments if serving else add_score_arguments)(parser)
    args = parser.parse_args(argv[1:] if serving else argv)
    setup_logging()
    try:
        scorer = Scorer(args.scorer, args.program)
        if serving:
            return serve_scorer(scorer, args.host, args.port, args.workers, args.max_body_mb)
        return score_table(scorer, expand(args.inputs), args.out, args.workers)
    except CoughPipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
