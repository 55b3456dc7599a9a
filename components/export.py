"""KFP component for step 5: the scoring pipeline and the compiled KFP pipeline (see ``coughreg.export``)."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from coughreg.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def export(model: Input[Model], config_yaml: str, scorer: Output[Model]):
    """A scorer that takes raw audio (mel front end inside), its config, and pipeline.yaml beside it."""
    from coughreg.steps import run_export_step

    run_export_step(model.path, config_yaml, scorer.path)
