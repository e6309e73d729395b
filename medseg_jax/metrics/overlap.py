"""Overlap metrics on label maps: Dice, IoU, precision, recall, volumes.

Per class, with P and R the numbers of predicted and reference voxels, TP = the number in both, and v the voxel volume
in mm³ (the product of the spacing):

| metric                       | formula             | ref empty, pred not | pred empty, ref not | both empty |
|------------------------------|---------------------|---------------------|---------------------|------------|
| `dice`                       | 2 TP / (P + R)      | 0                   | 0                   | NaN        |
| `iou`                        | TP / (P + R - TP)   | 0                   | 0                   | NaN        |
| `precision`                  | TP / P              | 0                   | NaN                 | NaN        |
| `recall`                     | TP / R              | NaN                 | 0                   | NaN        |
| `volume_difference_mm3`      | (P - R) v           | P v                 | -R v                | 0          |
| `relative_volume_difference` | (P - R) / R         | NaN                 | -1                  | NaN        |

NaN means undefined (0/0), as nnU-Net does for Dice when the class is absent from both masks: means skip it and
reports count it. Both volume differences are signed: positive when the prediction is larger.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NAN = float("nan")


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


def _ratio(numerator: float, denominator: float) -> float:
    return NAN if denominator == 0 else float(numerator) / float(denominator)


def overlap_from_counts(true_positive: int, pred_voxels: int, ref_voxels: int, voxel_volume_mm3: float = 1.0) -> dict:
    """Overlap metrics (table in the module docstring) from voxel counts, as plain Python floats."""
    tp, n_pred, n_ref = int(true_positive), int(pred_voxels), int(ref_voxels)
    return {
        "dice": _ratio(2 * tp, n_pred + n_ref),
        "iou": _ratio(tp, n_pred + n_ref - tp),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_ref),
        "volume_difference_mm3": float((n_pred - n_ref) * float(voxel_volume_mm3)),
        "relative_volume_difference": _ratio(n_pred - n_ref, n_ref),
        "pred_volume_mm3": float(n_pred * float(voxel_volume_mm3)),
        "ref_volume_mm3": float(n_ref * float(voxel_volume_mm3)),
    }


def overlap_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray, voxel_volume_mm3: float = 1.0) -> dict:
    """Overlap metrics of two binary masks of one shape (see the module docstring), plus voxel counts."""
    pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from reference shape {ref_mask.shape}")
    tp = int(np.count_nonzero(pred_mask & ref_mask))
    n_pred, n_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
    return {**overlap_from_counts(tp, n_pred, n_ref, voxel_volume_mm3), "ref_voxels": n_ref, "pred_voxels": n_pred}
