"""KFP component for step 1: ingest a data set from S3 or disk (see ``coughreg.ingest``)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from coughreg.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def ingest(
    source_uri: str, config_yaml: str, dataset: Output[Dataset], quality: Output[Metrics], quality_report: Output[HTML]
):
    """Fetch the data set at ``source_uri``; write manifest.parquet, the accepted audio and a data-quality report."""
    from coughreg.steps import run_ingest_step

    run_ingest_step(source_uri, config_yaml, dataset.path, quality, quality_report.path)
