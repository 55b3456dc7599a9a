"""The quality gate: a model ships only when it beats predicting the training median.

The evaluate step decides it from the validation MAE over the median baseline's MAE (the same rows,
the baseline from each fold's training rows); ``prediction.max_mae_to_median_baseline`` (a run
parameter, default 1.0) is the largest ratio that passes. The pipeline runs export and test scoring
only on ``passed`` (``dsl.If`` on the evaluate task's ``gate`` output).
"""

from __future__ import annotations

import math

PASSED, FAILED = "passed", "failed"


def decide(metrics: dict, threshold: float) -> dict:
    """``{"passed", "verdict", "threshold", "mae_vs_median_baseline", "message"}`` for a run's metrics."""
    model, baseline = metrics["validation_mae"], metrics["baseline_median_mae"]
    if not math.isfinite(model):
        passed, ratio = False, float("nan")
        message = "no validation recording could be scored, so the model is not shown to beat anything"
    elif baseline <= 0:  # every validation label equals the training median: only an exact model beats it
        passed, ratio = model <= 1e-9, float("nan")
        message = f"predicting the training median is exact on these validation rows (MAE 0); the model's MAE is {model:.4f}"
    else:
        ratio = model / baseline
        passed = ratio <= threshold
        message = (f"validation MAE {model:.4f} is {ratio:.3f} x the median baseline's {baseline:.4f}; "
                   f"prediction.max_mae_to_median_baseline allows {threshold:g}")
    return {"passed": bool(passed), "verdict": PASSED if passed else FAILED, "threshold": float(threshold),
            "mae_vs_median_baseline": ratio, "message": message}
