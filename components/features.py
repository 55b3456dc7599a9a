"""KFP component for step 2: log-mel Parquet shards (see ``coughreg.features``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from coughreg.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def features(dataset: Input[Dataset], config_yaml: str, spectrograms: Output[Dataset], stats: Output[Metrics]):
    """Decode, resample and log-mel every accepted recording into Parquet spectrogram shards."""
    from coughreg.steps import run_features_step

    run_features_step(dataset.path, config_yaml, spectrograms.path, stats)
