"""What this process may use: CPUs (``coughreg.scoring.cpus``, which every scorer folder carries too),
torch's thread pools sized to them, and the GPUs the pod asked for."""

from __future__ import annotations

import os

from coughreg.runtime.env import GPUS_REQUESTED_ENV
from coughreg.scoring.cpus import _cgroup_quota, available_cpus, parse_cpu  # noqa: F401 - one place


def limit_threads() -> int:
    """torch's thread pools sized to this process's CPUs (by default torch takes every core of the node)."""
    import torch

    cpus = available_cpus()
    torch.set_num_threads(cpus)
    return cpus


def gpus_requested() -> int:
    """How many GPUs the pod asked Kubernetes for (0 outside a pipeline pod)."""
    try:
        return int(os.environ.get(GPUS_REQUESTED_ENV, "0"))
    except ValueError:
        return 0
