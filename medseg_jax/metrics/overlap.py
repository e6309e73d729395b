"""Overlap metrics on label maps.

Dice for class c: 2|P∩R| / (|P| + |R|). When both the prediction and the reference lack the class the score is NaN
(undefined, as in nnU-Net) and means skip it; when only one of them has it the score is 0.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    scores = {}
    for label in labels:
        p, r = pred == label, ref == label
        denominator = int(p.sum()) + int(r.sum())
        scores[int(label)] = float("nan") if denominator == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denominator
    return scores


def nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
