"""Step 3, training, one idea per file:

- ``folds``: group k-fold from the run's seed, selected folds, subsampling;
- ``data``: shard rows as length-bucketed, padded batches;
- ``factories``: loss, optimizer, schedule, mixed precision, device;
- ``mixing``: Mixup and Cutmix;
- ``loop``: one epoch, inference;
- ``checkpoints``: per-epoch checkpoints that resume exactly and never run code;
- ``member``: one model (fold x seed), fitted, validated, saved;
- ``distributed``: DistributedDataParallel ranks;
- ``run``: the run's seed, every member, the model folder.
"""

from coughreg.training.run import TrainResult, load_members, run_seed, train

__all__ = ["TrainResult", "load_members", "run_seed", "train"]
