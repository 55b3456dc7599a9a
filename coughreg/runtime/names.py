"""The product's names, each written once."""

from coughreg.scoring.folder import MODEL_NAME  # the served model's name; the scoring package ships alone

PIPELINE_NAME = MODEL_NAME  # the KFP pipeline, the default KFP experiment, the tracker's pipeline

__all__ = ["MODEL_NAME", "PIPELINE_NAME"]
