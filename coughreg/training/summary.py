"""The training curves as the scalars KFP's UI shows."""

from __future__ import annotations

import math


def training_summary(history: list[dict], metric: str) -> dict:
    """The training curves as the scalars KFP's UI shows: each value of the last epoch (``train_loss``,
    ``validation_mae``, ...) and the validation values of the best epoch by ``metric`` (``best_validation_mae``,
    ...), averaged over the models (fold, seed) when there are several; the best epoch (``best_epoch``, or
    ``fold<k>_seed<s>_best_epoch`` for each of several models). The curves themselves are in the report and
    the experiment tracker."""

    def numbers(row: dict, prefix: str = "") -> dict:
        return {k: float(v) for k, v in row.items() if k.startswith(prefix) and k not in ("fold", "seed", "epoch")
                and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def mean(rows: list[dict]) -> dict:
        keys = sorted({key for row in rows for key in row})
        return {key: sum(r[key] for r in rows if key in r) / sum(key in r for r in rows) for key in keys}

    members: dict[tuple, list[dict]] = {}
    for row in history:
        members.setdefault((row.get("fold"), row.get("seed")), []).append(row)
    ranked, higher = f"validation_{metric.lower()}", metric.upper() == "R2"
    bests = []
    for rows in members.values():
        scored = [r for r in rows if isinstance(r.get(ranked), (int, float)) and math.isfinite(r[ranked])]
        if scored:
            bests.append((max if higher else min)(scored, key=lambda r: r[ranked]))  # the first of equals
    summary = mean([numbers(rows[-1]) for rows in members.values()])
    summary.update({f"best_{k}": v for k, v in mean([numbers(best, "validation_") for best in bests]).items()})
    if len(bests) == 1:
        summary["best_epoch"] = bests[0]["epoch"]
    else:
        summary.update({f"fold{b.get('fold')}_seed{b.get('seed')}_best_epoch": b["epoch"] for b in bests})
    return summary
