"""One entry point per step: what ``pipeline.py step X``, the KFP component and the training ranks call.

- ``harness``: the wrapper every step shares (errors, logging, KFP metrics, S3 staging) and the steps.
"""
