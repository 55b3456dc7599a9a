"""KFP component for step 3: training on the GPU (see ``coughreg.train``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from coughreg.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE)
def train(spectrograms: Input[Dataset], config_yaml: str, model: Output[Model], training: Output[Metrics]):
    """Group k-fold split, timm backbone, the config's optimisation; weights, folds and validation predictions."""
    from coughreg.steps import run_train_step

    run_train_step(spectrograms.path, config_yaml, model.path, training)
