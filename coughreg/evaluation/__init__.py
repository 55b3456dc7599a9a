"""Step 4, evaluation: the validation recordings scored from audio, as users will score them.

- ``evaluate``: the step itself (predictions, metrics, the verdict, the report);
- ``intervals``: metrics with percentile-bootstrap intervals, overall, per label and per fold;
- ``gate``: the quality gate (beat predicting the training median);
- ``robustness``: how far scores move when only the recording chain changes;
- ``lineage``: where an evaluation came from (data, artifacts, config, software, machine);
- ``report``: the HTML report, with ``robustness_section`` and ``occlusion`` (what the model listened to).
"""
