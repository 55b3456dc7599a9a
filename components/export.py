"""KFP component for step 5: the scoring pipeline and its provenance (see ``coughreg.export``)."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from coughreg.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(model: Input[Model], export_config: str, scorer: Output[Model]):
    """A scorer that takes raw audio (mel front end inside), its config, and where it came from."""
    from coughreg.steps import Given, export_step

    export_step(model.path, scorer.path, Given.parameter("export_config", export_config), artifact_uri=scorer.uri)
