"""KFP component for step 4: metrics beside baselines and the HTML report (see ``coughreg.evaluate``)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from coughreg.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    spectrograms: Input[Dataset],
    evaluate_config: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Dataset],
):
    """Validation MAE, RMSE and R² beside the mean and median baselines; predicted-vs-true report."""
    from coughreg.steps import Given, evaluate_step

    evaluate_step(model.path, spectrograms.path, evaluation.path, Given.parameter("evaluate_config", evaluate_config),
                  metrics=metrics, html=report.path)
