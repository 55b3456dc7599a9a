"""KFP component for step 4: validation scored from audio, metrics, the quality gate, the report (see ``coughreg.evaluation.evaluate``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    spectrograms: Input[Dataset],
    dataset: Input[Dataset],
    evaluate_config: str,
    max_mae_to_median_baseline: float,
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Dataset],
) -> NamedTuple("EvaluateOutputs", gate=str):
    """Validation MAE, RMSE and R² beside the mean and median baselines; ``gate``: 'passed' or 'failed'."""
    from collections import namedtuple

    from coughreg.config.given import Given
    from coughreg.steps.evaluate import evaluate_step

    given = Given.parameter("evaluate_config", evaluate_config, {"max_mae_to_median_baseline": max_mae_to_median_baseline})
    values = evaluate_step(model.path, spectrograms.path, dataset.path, evaluation.path, given, metrics=metrics, html=report.path,
                           artifact_uri=evaluation.uri)
    return namedtuple("EvaluateOutputs", ["gate"])(values["quality_gate"]["verdict"])
