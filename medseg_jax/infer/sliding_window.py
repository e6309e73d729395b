"""Sliding-window inference with Gaussian importance weighting (nnU-Net v2 / MONAI style): pure array functions.

The volume is covered by windows of `patch_size` whose starts are spaced at most `patch * (1 - overlap)` apart
(nnU-Net's
rule: the fewest steps that achieve the overlap, spread evenly so the last window ends at the border). Each window's
logits are multiplied by a Gaussian importance map (sigma = `sigma_scale` * patch size, peak 1, zeros raised to the
smallest nonzero value) and accumulated; the result is the weighted average of the logits at every voxel. A volume
smaller than the patch is zero-padded (symmetrically) and the padding cropped from the output.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import scipy.ndimage


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    max_stride = patch * (1.0 - overlap)
    if max_stride <= 0:
        raise ValueError(f"overlap must be < 1, got {overlap}")
    num_steps = int(np.ceil((size - patch) / max_stride)) + 1
    positions = np.linspace(0, size - patch, num_steps)
    return [int(round(p)) for p in positions]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    impulse = np.zeros(patch_size, np.float64)
    impulse[tuple(p // 2 for p in patch_size)] = 1.0
    weights = scipy.ndimage.gaussian_filter(impulse, [p * sigma_scale for p in patch_size], mode="constant", cval=0)
    weights = weights / weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def sliding_window_inference(predict_fn: Callable[[np.ndarray], np.ndarray], volume: np.ndarray,
                             patch_size: Sequence[int], num_classes: int, *, overlap: float = 0.5,
                             batch_size: int = 2, gaussian: bool = True,
                             sigma_scale: float = 0.125, fetch: Callable = np.asarray) -> np.ndarray:
    """Logits for `volume` (X, Y, Z, C) -> (X, Y, Z, K) float32.

    `predict_fn` maps a (batch_size, *patch_size, C) float32 array to (batch_size, *patch_size, K) logits; it always
    gets exactly `batch_size` windows (the last batch is padded with zeros), so a jitted function compiles once. It
    may return a not-yet-computed jax array: `fetch` (to numpy) is called one batch later, so the host cuts the next
    windows and adds up the last logits while the device computes.

    A 2D `patch_size` (a 2D network) slides over the volume's slices: its windows are (X, Y, 1) boxes, handed to
    `predict_fn` as (batch_size, X, Y, C) pictures, so a 2D picture (Z = 1) and a volume (nnU-Net's 2d configuration,
    slice by slice) are predicted alike.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) == 2:
        planar_fn = predict_fn
        predict_fn = lambda windows: planar_fn(windows[:, :, :, 0])[:, :, :, None]
        patch_size = (*patch_size, 1)
    spatial = volume.shape[:-1]
    pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch_size)]
    padded = np.pad(volume, pad + [(0, 0)], mode="constant") if any(sum(p) for p in pad) else volume
    padded_shape = padded.shape[:-1]

    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded_shape, patch_size))))
    weights = gaussian_importance_map(patch_size, sigma_scale) if gaussian else np.ones(patch_size, np.float32)
    accumulated = np.zeros(padded_shape + (num_classes,), np.float32)
    normaliser = np.zeros(padded_shape, np.float32)

    def accumulate(chunk, result):
        logits = np.asarray(fetch(result), dtype=np.float32)
        for i, start in enumerate(chunk):
            region = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
            accumulated[region] += logits[i] * weights[..., None]
            normaliser[region] += weights

    pending = None
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        windows = np.zeros((batch_size,) + patch_size + (volume.shape[-1],), np.float32)
        for i, start in enumerate(chunk):
            windows[i] = padded[tuple(slice(s, s + p) for s, p in zip(start, patch_size))]
        result = predict_fn(windows)
        if pending is not None:
            accumulate(*pending)
        pending = (chunk, result)
    accumulate(*pending)

    result = accumulated / normaliser[..., None]
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pad, spatial))
    return result[crop]
