"""Random training patches from preprocessed cases held in memory, with nnU-Net's foreground oversampling.

The batch for step `s` is a pure function of (seed, s): a resumed run sees exactly the batches it would have seen.
In a batch of B, samples with index >= round(B * (1 - oversample)) are centred on a voxel of a foreground class drawn
evenly among the classes present in the case (so small structures are seen as often as large ones); the others are
centred on a uniformly random voxel. Patches reaching past the volume are zero-padded (label 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class TrainingCase:
    case_id: str
    image: np.ndarray  # (X, Y, Z, C) float32, preprocessed
    label: np.ndarray  # (X, Y, Z) int16
    class_locations: dict[int, np.ndarray]  # class -> (n, 3) voxel indices (subsampled)


def class_locations(label: np.ndarray, max_per_class: int = 10000, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    locations = {}
    for value in np.unique(label):
        if value <= 0:
            continue
        coords = np.argwhere(label == value)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        locations[int(value)] = coords.astype(np.int32)
    return locations


def extract_patch(array: np.ndarray, center: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """The `patch_size` window of `array` centred at `center` (leading axes), zero-padded where it leaves the array."""
    out = np.zeros(tuple(patch_size) + array.shape[len(patch_size):], array.dtype)
    src, dst = [], []
    for c, p, size in zip(center, patch_size, array.shape):
        start = int(c) - p // 2
        lo, hi = max(start, 0), min(start + p, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


def is_foreground_sample(index: int, batch_size: int, oversample: float) -> bool:
    return index >= int(round(batch_size * (1.0 - oversample)))


def sample_batch(cases: Sequence[TrainingCase], patch_size: Sequence[int], batch_size: int, step: int, seed: int,
                 oversample: float = 0.33, sample_indices: Sequence[int] | None = None) -> dict:
    """Returns {"image": (n, *patch, C) float32, "label": (n, *patch) int32} for the samples `sample_indices`
    (default: the whole batch; a process in a multi-host run asks for its own slice)."""
    indices = range(batch_size) if sample_indices is None else sample_indices
    images, labels = [], []
    for index in indices:
        rng = np.random.default_rng([seed, step, index])
        case = cases[rng.integers(len(cases))]
        if is_foreground_sample(index, batch_size, oversample) and case.class_locations:
            classes = sorted(case.class_locations)
            coords = case.class_locations[classes[rng.integers(len(classes))]]
            center = coords[rng.integers(len(coords))]
        else:
            center = [rng.integers(size) for size in case.label.shape]
        images.append(extract_patch(case.image, center, patch_size))
        labels.append(extract_patch(case.label, center, patch_size))
    return {"image": np.stack(images).astype(np.float32), "label": np.stack(labels).astype(np.int32)}
