"""KFP components for step 2, fanned out: plan -> ParallelFor feature parts -> collect (see ``coughreg.features.extract``)."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_feature_parts(parts: int) -> List[int]:
    """The part numbers the ParallelFor fans out over (each part takes every parts-th shard)."""
    if parts < 1:
        raise ValueError(f"feature_parts must be at least 1, got {parts}")
    return list(range(parts))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def feature_part(dataset: Input[Dataset], features_config: str, part: int, parts: int, spectrograms: Output[Dataset]):
    """Decode, resample and log-mel one slice of the recordings into Parquet spectrogram shards."""
    from coughreg.config.given import Given
    from coughreg.steps.features import feature_part_step

    feature_part_step(dataset.path, spectrograms.path, Given.parameter("features_config", features_config), part, parts)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def collect_features(
    dataset: Input[Dataset], parts: Input[List[Dataset]], features_config: str, spectrograms: Output[Dataset], stats: Output[Metrics]
):
    """Gather every part's shards into one artifact and write the shard index."""
    from coughreg.config.given import Given
    from coughreg.steps.features import collect_features_step

    collect_features_step(dataset.path, [p.path for p in parts], spectrograms.path,
                          Given.parameter("features_config", features_config), metrics=stats)
