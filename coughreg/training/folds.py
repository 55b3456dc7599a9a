"""Which rows validate which model: group k-fold from the recorded seed, or a custom holdout."""

from __future__ import annotations

import numpy as np
import pandas as pd

from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import CoughPipelineError


def assign_folds(groups: pd.Series, n_folds: int, seed: int) -> np.ndarray:
    """Group k-fold: every group in exactly one fold, folds as equal in size as the groups allow.

    Groups are shuffled by the seed, then placed largest first into the currently smallest fold
    (ties keep the shuffled order), so the split is balanced and deterministic for a seed.
    """
    codes, _ = pd.factorize(groups.astype(str))
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n_groups < n_folds:
        raise CoughPipelineError(
            f"dataset.group_fold_column: {n_groups} distinct groups cannot fill {n_folds} folds "
            f"(validation_size); use fewer folds or another group column"
        )
    sizes = np.bincount(codes, minlength=n_groups)
    shuffled = np.random.default_rng(seed).permutation(n_groups)
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    load = np.zeros(n_folds, dtype=np.int64)
    for group in order:
        fold = int(np.argmin(load))
        fold_of_group[group] = fold
        load[fold] += sizes[group]
    return fold_of_group[codes]


def truncate_groups(groups: pd.Series, unit: str) -> pd.Series:
    """Group values read as times and truncated to ``unit``; values that are not times stay as they are."""
    times = pd.to_datetime(groups, utc=True, errors="coerce", format="mixed")
    frequency = {"hour": "h", "day": "D", "week": "W", "month": "M"}[unit]
    truncated = times.dt.to_period(frequency).astype(str) if unit in ("week", "month") else times.dt.floor(frequency).astype(str)
    return truncated.where(times.notna(), groups.astype(str))


def selected_folds(config: ExperimentConfig) -> list[int]:
    n_folds = config.dataset.number_of_folds
    if "-1" in config.dataset.selected_folds:
        return list(range(n_folds))
    return sorted({int(f) for f in config.dataset.selected_folds})


def subsample(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1.0:
        return rows
    rng = np.random.default_rng(seed)
    keep = max(1, int(round(len(rows) * fraction)))
    return np.sort(rng.choice(rows, size=keep, replace=False))


def split_folds(labelled: pd.DataFrame, config: ExperimentConfig, seed: int) -> tuple[np.ndarray, list[int], str]:
    """Each labelled row's fold, the folds to train, and a sentence naming the scheme.

    Rows from a ``validation_dataframe`` (split 'validation') make a custom holdout (fold 0);
    otherwise group k-fold on ``dataset.group_fold_column`` (optionally truncated in time), or, without
    one, on the recordings themselves.
    """
    if config.dataset.validation_strategy == "custom" or (labelled["split"] == "validation").any():
        return np.where(labelled["split"] == "validation", 0, -1), [0], "custom holdout (validation_dataframe)"
    if config.dataset.group_fold_column:
        groups = labelled["group"]
        grouping = f"'{config.dataset.group_fold_column}'"
        if config.dataset.group_fold_truncate:
            groups = truncate_groups(groups, config.dataset.group_fold_truncate)
            grouping += f" truncated to the {config.dataset.group_fold_truncate}"
    else:  # no group column: every recording is a group of its own
        groups, grouping = labelled["id"].astype(str), "recording (no dataset.group_fold_column)"
    folds = assign_folds(groups, config.dataset.number_of_folds, seed)
    scheme = f"group k-fold on {grouping} ({config.dataset.number_of_folds} folds, {groups.nunique()} groups)"
    return folds, selected_folds(config), scheme


def fold_rows(labelled: pd.DataFrame, fold: int, config: ExperimentConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of one fold, after ``train_validation_data`` and ``data_sample``."""
    validation_rows = labelled.index[labelled["fold"] == fold].to_numpy()
    train_rows = labelled.index[labelled["fold"] != fold].to_numpy()
    if config.training.train_validation_data:
        train_rows = labelled.index.to_numpy()
    if "Train" in config.dataset.data_sample_choice:
        train_rows = subsample(train_rows, config.dataset.data_sample, seed + 17 * fold)
    if "Validation" in config.dataset.data_sample_choice:
        validation_rows = subsample(validation_rows, config.dataset.data_sample, seed + 17 * fold + 1)
    if len(train_rows) == 0 or len(validation_rows) == 0:
        raise CoughPipelineError(f"fold {fold}: {len(train_rows)} training and {len(validation_rows)} validation rows")
    return train_rows, validation_rows
