"""KFP component: where the scorer would be when the model failed the quality gate, a note saying why."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from coughreg.runtime.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate_failed(evaluation: Input[Dataset], scorer: Output[Model]) -> NamedTuple("GateOutputs", scorer_uri=str):
    """No scorer: the quality gate's verdict, in words, and an empty ``scorer_uri``."""
    from collections import namedtuple

    from coughreg.steps.gate_failed import gate_failed_step

    gate_failed_step(evaluation.path, scorer.path)
    return namedtuple("GateOutputs", ["scorer_uri"])("")
