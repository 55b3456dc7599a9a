"""KFP component for step 5: the scorer folder that stands alone, and its provenance (see ``coughreg.export.scorer_folder``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(model: Input[Model], evaluation: Input[Dataset], export_config: str,
           scorer: Output[Model]) -> NamedTuple("ExportOutputs", scorer_uri=str):
    """A scorer that takes raw audio (mel front end inside) and needs only torch, numpy and PyAV; ``scorer_uri``: where it is."""
    from collections import namedtuple

    from coughreg.config.given import Given
    from coughreg.steps.export import export_step

    export_step(model.path, evaluation.path, scorer.path, Given.parameter("export_config", export_config), artifact_uri=scorer.uri)
    return namedtuple("ExportOutputs", ["scorer_uri"])(scorer.uri)
