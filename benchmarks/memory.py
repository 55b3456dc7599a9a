"""Memory of a process tree, sampled from /proc: peak PSS summed over the tree, and peak RSS.

PSS (proportional set size) shares each page among the processes mapping it, so the sum over a
tree of workers that all import torch counts torch's libraries once, not once per process.
(``getrusage().ru_maxrss`` is no use here: a child starts with its parent's high-water mark.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        stack.extend(_children(current))
    return pids


def _field_kb(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(pid: int) -> float:
    return sum(_field_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss") for p in tree(pid)) / 1024


class TreeMemorySampler:
    """Sample a process tree every ``interval`` seconds until stopped; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_pss_mb = 0.0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.pid)
            pss = sum(_field_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss") for p in pids) / 1024
            self.peak_pss_mb = max(self.peak_pss_mb, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            time.sleep(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
