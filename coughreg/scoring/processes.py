"""Recordings scored in worker processes, one per CPU.

Decoding holds Python's GIL (PyAV's decode loop), so threads cannot decode two recordings at once: with
threads, a 10 s Opus clip's ~15 ms of decoding is the ceiling however many cores there are. Worker
processes (started with ``spawn``: a fork after torch started its thread pools can hang) each load the
scorer once, on one torch thread, and decode and score in parallel. A worker that dies (a decoder crash
on a hostile file) takes down only the recordings it held: the pool is started again and each is tried
once more; a recording that kills a worker twice is a failed row naming it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from .folder import read_info
from .table import failed_row

log = logging.getLogger(__name__)

_scorer = None  # this worker process's scorer


def _load(make, folder: str, program: str) -> None:
    global _scorer
    import torch

    torch.set_num_threads(1)
    _scorer = make(folder, program)


def _ready(_: int) -> int:
    import os

    time.sleep(0.2)  # long enough that every worker is started to answer one
    return os.getpid()


def _score(name: str, source: str | bytes) -> dict:
    return _scorer.score_source(source if isinstance(source, bytes) else Path(source), name)


class ProcessPool:
    """``workers`` processes holding the scorer in ``folder``; ``score`` is safe to call from many threads.

    ``make(folder, program)`` builds each process's scorer (the ``Scorer`` class, passed by reference).
    """

    def __init__(self, make, folder: str | Path, program: str, workers: int) -> None:
        self.make, self.folder, self.program, self.workers = make, str(folder), program, max(1, workers)
        self.label_columns = list(read_info(folder)["label_columns"])
        self._lock = threading.Lock()
        self.pids: set[int] = set()  # the worker processes' ids (each answered once it had loaded the scorer)
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        started = time.perf_counter()
        pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=_load,
                                   initargs=(self.make, self.folder, self.program))
        self.pids, deadline = set(), started + 300
        while len(self.pids) < self.workers and time.perf_counter() < deadline:  # every worker has loaded the scorer:
            self.pids |= set(pool.map(_ready, range(self.workers)))  # on a busy machine one may answer for two
        log.info("%d scoring process(es) ready in %.1f s", len(self.pids), time.perf_counter() - started)
        return pool

    def score(self, name: str, source: str | Path | bytes) -> dict:
        """One row for a local file or a recording's bytes (see ``Scorer.score_source``)."""
        source = source if isinstance(source, bytes) else str(source)
        for attempt in (1, 2):
            pool = self._pool
            try:
                return pool.submit(_score, name, source).result()
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        log.warning("a scoring process died (while scoring %s among others); starting them again", name)
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = self._start()
        return failed_row(name, f"{name}: the scoring process died on this recording twice (a decoder crash?); not scored",
                          self.label_columns)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
