"""KFP component for step 3: training on the GPU (see ``coughreg.training``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from coughreg.runtime.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    spectrograms: Input[Dataset],
    train_config: str,
    backbone: str,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    weights_uri: str,
    weights_sha256: str,
    model: Output[Model],
    training: Output[Metrics],
):
    """Group k-fold split, timm backbone, the config's optimisation; weights, folds and validation predictions."""
    from coughreg.config.given import Given
    from coughreg.steps.train import train_step

    typed = {"backbone": backbone, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    given = Given.parameter("train_config", train_config, typed)
    if weights_uri:  # the pretrained weights the preflight step fetched, and their SHA-256
        given = given.with_keys({"architecture": {"pretrained_weights": weights_uri, "pretrained_sha256": weights_sha256}})
    train_step(spectrograms.path, model.path, given, metrics=training, identity=model.uri)
