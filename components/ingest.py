"""KFP component for step 1: ingest the data set, at the version the preflight step resolved (see ``coughreg.ingest.manifest``)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    source_uri: str,
    source_version: str,
    ingest_config: str,
    dataset: Output[Dataset],
    quality: Output[Metrics],
    quality_report: Output[HTML],
):
    """Fetch the data set at ``source_uri`` (that version); write manifest.parquet, the accepted audio, a data-quality report."""
    from coughreg.config.given import Given
    from coughreg.steps.ingest import ingest_step

    ingest_step(source_uri, dataset.path, Given.parameter("ingest_config", ingest_config), source_version=source_version,
                metrics=quality, html=quality_report.path)
