"""A scorer folder, loaded with torch alone, and one row per recording scored.

The folder (written by the export step) holds the trained model(s) with the mel front end inside, as a
frozen TorchScript module (``scorer.ts``, the fast path on CPUs) and a ``torch.export`` program
(``scorer.pt2``); ``scorer.json`` says how to score (rate, chunking) and records each file's SHA-256.
A program is code (TorchScript and torch.export files run what they hold), so one is loaded only after
every file the folder's ``scorer.json`` lists matches its SHA-256 (the program among them; another
program, which is not loaded, is not read). That catches a damaged or changed copy; it does not make a
folder from an untrusted source safe (whoever can write the folder can write its ``scorer.json``): load
scorers from where only the pipeline writes. Neither program needs timm or the training package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .decode import Decoded, decode
from .errors import AudioDecodeError, CoughPipelineError
from .folder import PROGRAMS, SCORER_FORMAT, SCORER_INFO, read_info, sha256_file, verify_files  # noqa: F401 - their home
from .policy import Policy, score_samples
from .table import failed_row

log = logging.getLogger(__name__)

# Worker processes take a second or two to start, and gain most where threads are held back by decoding
# (which holds the GIL) the most: many workers. Measured on 2 CPUs (10 s Opus clips): threads 51, processes
# 57 clips/s, +1.7 s to start; threads stop scaling at ~65 clips/s, processes do not.
PROCESS_WORK = 800  # recordings x (workers - 1) from which processes are used


def load_torchscript(path: str | Path):
    """A frozen TorchScript scorer, optimized for inference on this machine."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export; still the fastest on CPUs
        return torch.jit.optimize_for_inference(torch.jit.load(str(path), map_location="cpu"))


def load_exported(path: str | Path):
    """A torch.export scorer program, as a module."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "No complete tensor found in the group": CPU weights, as saved
        return torch.export.load(str(path)).module()


class Scorer:
    """Score raw audio with a scorer folder (or, for the evaluation step, any predict function).

    Args:
        folder: the scorer folder.
        program: ``torchscript`` (the default, fastest on CPUs) or ``export`` (the torch.export program).
    """

    def __init__(self, folder: str | Path, program: str = "torchscript") -> None:

        self.folder = Path(folder)
        self.info = read_info(self.folder)
        available = [name for name in (program, *PROGRAMS) if name in PROGRAMS and self.info.get("programs", {}).get(name)]
        if not available:
            raise CoughPipelineError(f"{self.folder / SCORER_INFO}: names no program; export the scorer again")
        name = available[0]
        path = self.folder / str(self.info["programs"][name])
        verify_files(self.folder, self.info, str(self.info["programs"][name]))
        try:
            module = load_torchscript(path) if name == "torchscript" else load_exported(path)
        except Exception as exc:  # noqa: BLE001 - a file that torch cannot read is one message, not a traceback
            raise CoughPipelineError(f"{path}: torch cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
        self.program_name = name
        self._setup(self._runner(module), Policy.from_info(self.info), list(self.info["label_columns"]))

    @classmethod
    def from_predict(cls, predict: Callable[[np.ndarray], np.ndarray], policy: Policy, label_columns: list[str]) -> Scorer:
        """A scorer around any batch predict function (the evaluation step's eager model)."""
        scorer = cls.__new__(cls)
        scorer.folder, scorer.info, scorer.program_name = None, {}, "function"
        scorer._setup(predict, policy, label_columns)
        return scorer

    def _setup(self, predict, policy: Policy, label_columns: list[str]) -> None:
        self.predict = predict
        self.policy = policy
        self.label_columns = label_columns

    @staticmethod
    def _runner(module) -> Callable[[np.ndarray], np.ndarray]:
        import torch

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).float().numpy()

        return predict

    def score_samples(self, samples: np.ndarray) -> tuple[np.ndarray, int]:
        """Mono float32 samples at the scorer's rate -> ((labels,) values, number of chunks)."""
        return score_samples(self.predict, samples, self.policy)

    def score_decoded(self, decoded: Decoded, path: str) -> dict:
        values, chunks = self.score_samples(decoded.samples)
        notes = []
        if decoded.beyond_limit:
            notes.append(f"only the first {self.policy.max_seconds:g} s are scored (prediction.max_inference_chunk_seconds)")
        if decoded.cut_short:
            notes.append(f"the file ends in an error after {decoded.seconds:.2f} s, which are scored ({decoded.cut_short})")
        return {"path": path, **dict(zip(self.label_columns, values.tolist(), strict=True)), "duration_s": round(decoded.seconds, 4),
                "n_chunks": chunks, "truncated": bool(notes), "status": "ok", "reason": "; ".join(notes)}

    def score_source(self, source: str | Path | bytes, path: str) -> dict:
        """One row for a file or its bytes: the scores, or ``status`` failed with the reason (never an exception)."""
        try:
            return self.score_decoded(decode(source, self.policy.sample_rate, self.policy.max_seconds), path)
        except AudioDecodeError as exc:
            return self.failed_row(path, str(exc))
        except (ValueError, RuntimeError) as exc:  # a waveform the network cannot take
            return self.failed_row(path, f"{path}: cannot be scored: {str(exc).strip().splitlines()[0][:200]}")

    def failed_row(self, path: str, reason: str) -> dict:
        return failed_row(path, reason, self.label_columns)

    def score_item(self, name: str, source) -> dict:
        """A row for a local path, or for ``source()``: a context manager that fetches the recording (an object
        in S3) and yields a local path; a recording that cannot be fetched is a failed row too."""
        if not callable(source):
            return self.score_source(Path(source), name)
        try:
            with source() as local:
                return self.score_source(Path(local), name)
        except CoughPipelineError as exc:
            return self.failed_row(name, str(exc))

    def score_file(self, path: str | Path) -> dict[str, float]:
        """Label values of one recording (raises when it cannot be scored)."""
        row = self.score_source(Path(path), str(path))
        if row["status"] != "ok":
            raise AudioDecodeError(row["reason"])
        return {label: row[label] for label in self.label_columns}

    def score_paths(self, paths: Iterable[tuple[str, object]], workers: int = 1, progress_every: float = 5.0,
                    processes: bool | None = None) -> list[dict]:
        """One row per ``(name, local path or fetcher)`` (see ``score_item``), in order, with progress (clips/s,
        ETA) on the log. Each clip is scored alone (no padding from another clip reaches it), ``workers`` at once:
        in worker processes (``coughscore.processes``: decoding cannot run in two threads at once) when
        ``processes``, by default when this is a scorer folder and there are enough recordings to pay for
        starting them; else in threads."""
        items = list(paths)
        workers = max(1, workers)
        if processes is None:
            processes = self.folder is not None and workers > 1 and len(items) * (workers - 1) >= PROCESS_WORK
        pool = None
        if processes:
            from .processes import ProcessPool

            pool = ProcessPool(type(self), self.folder, self.program_name, workers)

        def one(name: str, source) -> dict:
            if pool is None:
                return self.score_item(name, source)
            if not callable(source):
                return pool.score(name, source)
            try:
                with source() as local:  # fetched here, scored there
                    return pool.score(name, local)
            except CoughPipelineError as exc:
                return self.failed_row(name, str(exc))

        rows: list[dict | None] = [None] * len(items)
        started = last = time.perf_counter()
        try:
            with ThreadPoolExecutor(workers * (2 if pool else 1)) as threads:  # with processes, threads fetch and wait
                futures = [threads.submit(one, name, source) for name, source in items]
                for done, (k, future) in enumerate(enumerate(futures), start=1):
                    rows[k] = future.result()
                    now = time.perf_counter()
                    if now - last >= progress_every or done == len(items):
                        rate = done / max(now - started, 1e-9)
                        log.info("scored %d/%d recordings (%.1f clips/s, ETA %.0f s)", done, len(items), rate, (len(items) - done) / rate)
                        last = now
        finally:
            if pool is not None:
                pool.close()
        return rows
