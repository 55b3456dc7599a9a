"""Experiment tracking: what a pipeline run made, also sent to MLflow or Neptune (``logging.logger``).

- ``tracker``: the trackers, the run key and what each step logs.
"""
