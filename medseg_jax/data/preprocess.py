"""Planning and preprocessing for training and prediction: target spacing, intensity normalisation, resampling.

The plan is a JSON-friendly dict saved in the run directory (`plans.json`), so prediction applies exactly the
preprocessing that training saw:

    {"target_spacing": [x, y, z], "modality": "ct", "labels": {"0": "background", ...}, "channel_names": {...},
     "normalization": [{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}, ...]  # one entry per channel}

Schemes (nnU-Net's choices by modality): `ct` clips to the 0.5-99.5 percentiles of the foreground (label > 0) voxels of
the training set and z-scores with their mean and std; `zscore` (MRI and anything else) z-scores each case with its own
mean and std over nonzero voxels; `percentile` (ultrasound) maps each case's 0.5-99.5 percentile range to [0, 1].
Resampling: images cubic, labels nearest, logits back to the original grid linear; all with the voxel-area alignment
of `scipy.ndimage.zoom(grid_mode=True)` so that going there and back is consistent.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage

from medseg_jax.errors import MedsegError

SCHEME_BY_MODALITY = {"ct": "ct", "mri": "zscore", "us": "percentile"}
SCHEMES = ("ct", "zscore", "percentile", "none")


def target_spacing_from(spacings: Sequence[Sequence[float]]) -> list[float]:
    """The median spacing per axis (nnU-Net's default target)."""
    return [float(v) for v in np.median(np.asarray(spacings, np.float64), axis=0)]


def foreground_statistics(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channel: int,
                          max_samples_per_case: int = 20000, seed: int = 0) -> dict:
    """Intensity statistics of voxels with label > 0 over the training set (subsampled per case, deterministically)."""
    rng = np.random.default_rng(seed)
    samples = []
    for image, label in zip(images, labels):
        values = image[..., channel][label > 0]
        if values.size > max_samples_per_case:
            values = rng.choice(values, max_samples_per_case, replace=False)
        samples.append(values)
    values = np.concatenate(samples) if samples else np.zeros(0)
    if values.size == 0:
        raise MedsegError("training labels contain no foreground voxels: nothing to learn")
    return {"mean": float(values.mean()), "std": float(values.std()),
            "percentile_00_5": float(np.percentile(values, 0.5)), "percentile_99_5": float(np.percentile(values, 99.5))}


def make_normalization(scheme: str, images, labels, channel: int) -> dict:
    if scheme not in SCHEMES:
        raise MedsegError(f"config key 'data.normalization': unknown scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    if scheme == "ct":
        stats = foreground_statistics(images, labels, channel)
        return {"scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                "mean": stats["mean"], "std": max(stats["std"], 1e-8)}
    return {"scheme": scheme}


def normalize(image: np.ndarray, normalization: Sequence[dict]) -> np.ndarray:
    """(X, Y, Z, C) -> float32, each channel by its scheme."""
    out = np.empty(image.shape, np.float32)
    for channel, norm in enumerate(normalization):
        x = image[..., channel].astype(np.float32)
        scheme = norm["scheme"]
        if scheme == "ct":
            x = (np.clip(x, *norm["clip"]) - norm["mean"]) / norm["std"]
        elif scheme == "zscore":
            mask = x != 0
            values = x[mask] if mask.any() else x
            x = (x - values.mean()) / max(float(values.std()), 1e-8)
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


def preprocess_case(image: np.ndarray, spacing: Sequence[float], plan: dict,
                    label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Canonical image (X, Y, Z, C) [+ label (X, Y, Z)] -> normalised, resampled to the plan's target spacing."""
    if image.shape[-1] != len(plan["normalization"]):
        raise MedsegError(f"image has {image.shape[-1]} channels, the plan expects {len(plan['normalization'])}")
    image = normalize(image, plan["normalization"])
    new_shape = resampled_shape(image.shape[:3], spacing, plan["target_spacing"])
    image = resize(image, new_shape, order=3).astype(np.float32)
    if label is not None:
        label = resize(label.astype(np.int16), new_shape, order=0).astype(np.int16)
    return image, label


def logits_to_original(logits: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Preprocessed-grid logits (X', Y', Z', K) -> label map on the canonical original grid (X, Y, Z)."""
    return np.argmax(resize(logits, tuple(shape), order=1), axis=-1)


def make_plan(spec_labels: dict, channel_names: dict, modality: str, images, labels, spacings,
              data_config) -> dict:
    """The plan from the training cases (canonical images and labels, spacings) and the `data` config section."""
    target = data_config.target_spacing
    target_spacing = [float(v) for v in target] if target else target_spacing_from(spacings)
    scheme = data_config.normalization
    if scheme == "auto":
        scheme = SCHEME_BY_MODALITY.get(modality, "zscore")
    num_channels = images[0].shape[-1]
    return {
        "target_spacing": target_spacing,
        "modality": modality,
        "labels": {str(k): v for k, v in sorted(spec_labels.items())},
        "channel_names": {str(k): v for k, v in sorted(channel_names.items())},
        "normalization": [make_normalization(scheme, images, labels, c) for c in range(num_channels)],
    }
