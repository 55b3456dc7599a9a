"""What this process may use: CPUs from the pod's request or cgroup quota, not the node's core count.

A pod on a 64-core node that requested 4 CPUs sees 64 cores in ``os.cpu_count()``; sizing worker pools
and torch's thread pool from that starves the node and thrashes the pod. The pipeline sets
``COUGHREG_CPU_REQUEST`` on every task from the config's ``cluster`` section; the cgroup quota (the
CPU limit) and the affinity mask bound it further.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_REQUEST_ENV = "COUGHREG_CPU_REQUEST"  # the task's CPU request, set at compile time


def parse_cpu(quantity: str) -> float:
    """A Kubernetes CPU quantity ('500m', '2', '1.5') in cores."""
    text = str(quantity).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit of this cgroup in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Whole CPUs this process should plan for: the least of the affinity mask, the cgroup quota and the pod's request."""
    limits = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1]
    quota = _cgroup_quota()
    if quota is not None:
        limits.append(quota)
    if os.environ.get(CPU_REQUEST_ENV):
        try:
            limits.append(parse_cpu(os.environ[CPU_REQUEST_ENV]))
        except ValueError:
            pass
    return max(1, math.floor(min(limits)))


def plan_threads(workers: int | None) -> int:
    """Recordings scored at once (default: one per CPU this process may use). With several, each runs
    on one torch thread: clips in parallel use the cores better than one clip on all of them."""
    import torch

    workers = workers or available_cpus()
    torch.set_num_threads(1 if workers > 1 else available_cpus())
    return workers
