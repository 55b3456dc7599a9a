"""KFP component for step 3: training on the GPU (see ``coughreg.training``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from coughreg.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE)
def train(
    spectrograms: Input[Dataset],
    train_config: str,
    backbone: str,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    model: Output[Model],
    training: Output[Metrics],
):
    """Group k-fold split, timm backbone, the config's optimisation; weights, folds and validation predictions."""
    from coughreg.steps import Given, train_step

    typed = {"backbone": backbone, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    train_step(spectrograms.path, model.path, Given.parameter("train_config", train_config, typed), metrics=training,
               identity=model.uri)
