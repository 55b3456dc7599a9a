"""KFP component for step 0: what can be known before a recording is downloaded (see ``coughreg.preflight.checks``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(
    source_uri: str,
    ingest_config: str,
    features_config: str,
    train_config: str,
    backbone: str,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    evaluate_config: str,
    max_mae_to_median_baseline: float,
    export_config: str,
    report: Output[Markdown],
) -> NamedTuple("PreflightOutputs", source_version=str, weights_uri=str, weights_sha256=str):
    """Config, data, output locations, GPUs, pretrained weights: one error line per failed check, before anything runs."""
    from collections import namedtuple

    from coughreg.config.given import Given
    from coughreg.steps.preflight import preflight_step

    typed = {"backbone": backbone, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    givens = {
        "ingest": Given.parameter("ingest_config", ingest_config),
        "features": Given.parameter("features_config", features_config),
        "train": Given.parameter("train_config", train_config, typed),
        "evaluate": Given.parameter("evaluate_config", evaluate_config, {"max_mae_to_median_baseline": max_mae_to_median_baseline}),
        "export": Given.parameter("export_config", export_config),
    }
    outcome = preflight_step(source_uri, givens, report=report.path, artifact_uri=report.uri)
    outputs = namedtuple("PreflightOutputs", ["source_version", "weights_uri", "weights_sha256"])
    return outputs(outcome["source_version"], outcome["weights_uri"], outcome["weights_sha256"])
