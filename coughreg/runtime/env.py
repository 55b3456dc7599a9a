"""Every environment variable the product reads, named once.

The pipeline sets most of them on its tasks at compile time (``pipeline.py``): how a step runs (its CPUs,
worker counts, where checkpoints go, the image) travels as env, which no KFP cache key holds. The rest are
the user's (the cache folder, image names).
"""

from coughreg.scoring.cpus import CPU_REQUEST_ENV  # noqa: F401 - the task's CPU request; the scoring package ships alone

# Set on tasks by the pipeline.
PIPELINE_ENV = "COUGHREG_PIPELINE"  # the pipeline's name, on every task
IMAGE_ENV = "COUGHREG_IMAGE"  # the task's image reference, on every task
GPU_NODE_SELECTOR_ENV = "COUGHREG_GPU_NODE_SELECTOR"  # the train task's node selector (JSON), on preflight
GPUS_REQUESTED_ENV = "COUGHREG_GPUS_REQUESTED"  # the nvidia.com/gpu the train task asked for
CACHE_ENV = "COUGHREG_CACHE"  # the download cache (ingest's is on its scratch volume)
ERROR_FILE_ENV = "COUGHREG_ERROR_FILE"  # where a failing step writes its message (run-local reads it back)

# Runtime settings of the config (``coughreg.config.ownership.RUNTIME``): never part of a cache key.
S3_RETRY_BUDGET_ENV = "COUGHREG_S3_RETRY_BUDGET"
FEATURE_WORKERS_ENV = "COUGHREG_FEATURE_WORKERS"
LOADER_WORKERS_ENV = "COUGHREG_LOADER_WORKERS"
CHECKPOINT_URI_ENV = "COUGHREG_CHECKPOINT_URI"
WEIGHTS_URI_ENV = "COUGHREG_WEIGHTS_URI"
TRACKING_LOGGER_ENV = "COUGHREG_TRACKING_LOGGER"
NEPTUNE_PROJECT_ENV = "COUGHREG_NEPTUNE_PROJECT"
MLFLOW_EXPERIMENT_ENV = "COUGHREG_MLFLOW_EXPERIMENT"

# The user's, for building and naming images (``coughreg.runtime.images``).
REGISTRY_ENV = "COUGHREG_REGISTRY"
IMAGE_TAG_ENV = "COUGHREG_IMAGE_TAG"
CPU_IMAGE_ENV = "COUGHREG_CPU_IMAGE"
GPU_IMAGE_ENV = "COUGHREG_GPU_IMAGE"

__all__ = [name for name in dir() if name.endswith("_ENV")]
