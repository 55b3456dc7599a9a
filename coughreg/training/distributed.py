"""Several GPUs: DistributedDataParallel ranks, started from the train step itself.

When ``environment.gpus`` names more than one GPU and that many are present, the train step
launches one process per GPU with torch's elastic launcher (what ``torchrun`` runs), each calling
the same training function; rank 0 writes the outputs. Started by hand under ``torchrun``, the
step finds ``WORLD_SIZE`` in its environment and trains as one rank.
"""

from __future__ import annotations

import logging
import os
import uuid

log = logging.getLogger(__name__)


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return distributed_context()[0] == 0


def launch(function, args: tuple, processes: int) -> None:
    """Run ``function(*args)`` in ``processes`` ranks on this machine and wait for all of them.

    Raises:
        coughreg.errors.CoughPipelineError: a rank failed (its error is in the log above).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from coughreg.runtime.errors import CoughPipelineError

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"coughreg-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5,
    )
    log.info("training on %d processes (DistributedDataParallel)", processes)
    try:
        elastic_launch(config, function)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        first = message.splitlines()[0].removeprefix("CoughPipelineError: ") if message else "see the log above"
        raise CoughPipelineError(f"distributed training failed on rank {rank}: {first}") from None


def start_process_group(use_cuda: bool) -> bool:
    """Join the ranks' process group when running as one of several ranks; True when this call started it."""
    import torch

    _, world, local_rank = distributed_context()
    if world <= 1 or torch.distributed.is_initialized():
        return False
    backend = "nccl" if use_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend)
    log.info("distributed training: rank %d of %d (%s)", *distributed_context()[:2], backend)
    return True


def stop_process_group() -> None:
    import torch

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
