"""KFP component: the test table (``dataset.test_dataframe``) scored with the exported scorer (see ``coughreg.export.score_test_table``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def score_test_table(scorer: Input[Model], dataset: Input[Dataset], test_predictions: Output[Dataset], test_metrics: Output[Metrics]):
    """One row per test recording: pred_<label>, duration, chunks, status and reason (Parquet)."""
    from coughreg.steps.score_test_table import score_test_table_step

    score_test_table_step(scorer.path, dataset.path, test_predictions.path, metrics=test_metrics)
