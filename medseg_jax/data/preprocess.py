"""Preprocessing one case by a plan (see `data/fingerprint.py`), and mapping results back to the case's own grid.

    canonical image (X, Y, Z, C) [+ label]  --crop to nonzero-->  --normalise-->  --resample to target spacing-->

The plan is the JSON dict saved in the store and in every run (`plans.json`), so prediction applies exactly the
preprocessing training saw. Normalisation schemes: `ct` clips to dataset-wide foreground percentiles and z-scores with
the dataset's foreground mean and std; `zscore` uses each case's own mean and std over its nonzero voxels;
`percentile` maps each case's 0.5-99.5 percentile range to [0, 1]; `none` leaves values as they are.
Resampling uses the voxel-area alignment of `scipy.ndimage.zoom(grid_mode=True)`: voxel i of n maps to the interval
[i, i+1) * (old/new), so going there and back is consistent, and `map_back` is its exact inverse up to interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from medseg_jax.data.fingerprint import crop, nonzero_box
from medseg_jax.errors import MedsegError


def normalize(image: np.ndarray, normalization: Sequence[dict]) -> np.ndarray:
    """(X, Y, Z, C) -> float32, each channel by its scheme."""
    out = np.empty(image.shape, np.float32)
    for channel, norm in enumerate(normalization):
        x = image[..., channel].astype(np.float32)
        scheme = norm["scheme"]
        if scheme == "ct":
            x = (np.clip(x, *norm["clip"]) - norm["mean"]) / norm["std"]
        elif scheme == "zscore":  # statistics inside the nonzero mask, or over the whole crop ("mask": "all")
            mask = x != 0 if norm.get("mask", "nonzero") == "nonzero" else np.ones(x.shape, bool)
            values = x[mask] if mask.any() else x
            x = (x - values.mean()) / max(float(values.std()), 1e-8)
        elif scheme == "rescale01":  # nnU-Net's RescaleTo01Normalization: per-case min-max
            x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        elif scheme == "percentile":
            low, high = np.percentile(x, [0.5, 99.5])
            x = np.clip((x - low) / max(float(high - low), 1e-8), 0.0, 1.0)
        out[..., channel] = x
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple:
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing))


def resize(array: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resizes the leading spatial axes of `array` ((X, Y, Z) or (X, Y, Z, C)) to `new_shape`."""
    spatial = array.shape[:len(new_shape)]
    if tuple(spatial) == tuple(new_shape):
        return array
    zoom = [n / s for n, s in zip(new_shape, spatial)]
    if array.ndim == len(new_shape):
        return scipy.ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)
    channels = [scipy.ndimage.zoom(array[..., c], zoom, order=order, mode="nearest", grid_mode=True)
                for c in range(array.shape[-1])]
    return np.stack(channels, axis=-1)


def resize_label(label: np.ndarray, new_shape: Sequence[int], method: str = "nearest",
                 classes: Sequence[int] | None = None) -> np.ndarray:
    """Nearest-neighbour, or nnU-Net's linear interpolation of each class's mask followed by argmax."""
    if tuple(label.shape) == tuple(new_shape):
        return label
    if method == "nearest":
        return resize(label, new_shape, order=0)
    classes = sorted(np.unique(label).tolist()) if classes is None else list(classes)
    best = np.full(tuple(new_shape), -1.0, np.float32)
    out = np.zeros(tuple(new_shape), label.dtype)
    for value in classes:
        score = resize((label == value).astype(np.float32), new_shape, order=1)
        better = score > best
        out[better] = value
        best[better] = score[better]
    return out


@dataclass
class Preprocessed:
    image: np.ndarray  # (X', Y', Z', C) float32 on the target grid
    label: np.ndarray | None  # (X', Y', Z') on the target grid
    crop_box: list[list[int]]  # [[lo, hi) per canonical axis] of the original canonical grid
    canonical_shape: tuple[int, int, int]  # the original canonical shape


def preprocess_case(image: np.ndarray, spacing: Sequence[float], plan: dict,
                    label: np.ndarray | None = None) -> Preprocessed:
    """Canonical image (X, Y, Z, C) [+ label (X, Y, Z)] -> cropped, normalised, resampled to the target spacing."""
    if image.shape[-1] != len(plan["normalization"]):
        raise MedsegError(f"image has {image.shape[-1]} channels, the plan expects {len(plan['normalization'])}")
    box = nonzero_box(image, label) if plan.get("crop", "nonzero") == "nonzero" else [[0, s] for s in image.shape[:3]]
    cropped = normalize(crop(image, box), plan["normalization"])
    new_shape = resampled_shape(cropped.shape[:3], spacing, plan["target_spacing"])
    out = resize(cropped, new_shape, order=3).astype(np.float32)
    out_label = None
    if label is not None:
        classes = [int(k) for k in plan["labels"]]
        out_label = resize_label(crop(label, box), new_shape, plan.get("label_resampling", "nearest"), classes)
        out_label = out_label.astype(np.uint8 if max(classes) < 256 else np.int16)
    return Preprocessed(out, out_label, box, tuple(int(s) for s in image.shape[:3]))


def paste(inside: np.ndarray, crop_box, canonical_shape, fill=0) -> np.ndarray:
    """`inside` (the crop box's content) placed in a volume of `canonical_shape` filled with `fill`."""
    out = np.full(tuple(canonical_shape) + inside.shape[3:], fill, dtype=inside.dtype)
    out[tuple(slice(lo, hi) for lo, hi in crop_box)] = inside
    return out


def map_back(array: np.ndarray, crop_box: Sequence[Sequence[int]], canonical_shape: Sequence[int], order: int,
             fill=0) -> np.ndarray:
    """Preprocessed-grid array (X', Y', Z'[, K]) -> the original canonical grid (X, Y, Z[, K]).

    Resized onto the crop box (order 0: nearest, 1: linear) and placed in a volume of `canonical_shape` filled with
    `fill` outside it."""
    box_shape = [hi - lo for lo, hi in crop_box]
    return paste(resize(array, box_shape, order=order), crop_box, canonical_shape, fill)
