"""Preprocessing one case by a plan (see `data/fingerprint.py`), and mapping results back to the case's own grid.

    canonical image (X, Y, Z, C) [+ label]  --crop to nonzero-->  --normalise-->  --resample to target spacing-->

The plan is the JSON dict saved in the store and in every run (`plans.json`), so prediction applies exactly the
preprocessing training saw. Normalisation schemes: `ct` clips to dataset-wide foreground percentiles and z-scores with
the dataset's foreground mean and std; `zscore` uses each case's own mean and std over its nonzero voxels;
`percentile` maps each case's 0.5-99.5 percentile range to [0, 1]; `none` leaves values as they are. A `zscore` with
`"mask": "nonzero_region"` is nnU-Net's `use_mask_for_norm`: statistics over the region where any channel is nonzero
(holes filled), voxels outside it stay 0.
Resampling uses the voxel-area alignment of `scipy.ndimage.zoom(grid_mode=True)`: voxel i of n maps to the interval
[i, i+1) * (old/new), so going there and back is consistent, and `map_back` is its exact inverse up to interpolation.
By default images are cubic and logits linear on all three axes. A plan with `"resampling": {"scheme": "nnunet", ...}`
(`NNUNET_RESAMPLING`; what `medseg import nnunet` writes) resamples as nnU-Net v2's `resample_data_or_seg_to_shape`:
when the scan's or the target's spacing is anisotropic (coarsest / finest > `anisotropy_threshold`) the coarse axis is
resampled apart from the others, in-plane with `order` slice by slice and along the coarse axis with `order_z`
(nearest by default), so thick slices are not blurred into each other; each resize is clipped to its input's range as
skimage's `resize` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from medseg_jax.data.fingerprint import crop, nonzero_box
from medseg_jax.errors import MedsegError

# nnU-Net v2's default resampling (its plans' resampling_fn_data_kwargs / resampling_fn_probabilities_kwargs, and
# ANISO_THRESHOLD); "force_separate_z": null decides by the spacings, true/false forces it.
NNUNET_RESAMPLING = {"scheme": "nnunet", "order": 3, "order_z": 0, "probabilities_order": 1,
                     "probabilities_order_z": 0, "anisotropy_threshold": 3.0, "force_separate_z": None}


def nonzero_region(image: np.ndarray) -> np.ndarray:
    """(X, Y, Z, C) -> where any channel is nonzero, enclosed holes filled (nnU-Net's `create_nonzero_mask`)."""
    return scipy.ndimage.binary_fill_holes(np.any(image != 0, axis=-1))


def normalize(image: np.ndarray, normalization: Sequence[dict]) -> np.ndarray:
    """(X, Y, Z, C) -> float32, each channel by its scheme."""
    out = np.empty(image.shape, np.float32)
    region = None
    for channel, norm in enumerate(normalization):
        x = image[..., channel].astype(np.float32)
        scheme = norm["scheme"]
        if scheme == "ct":
            x = (np.clip(x, *norm["clip"]) - norm["mean"]) / norm["std"]
        elif scheme == "zscore" and norm.get("mask") == "nonzero_region":
            region = nonzero_region(image) if region is None else region
            if region.any():  # outside the region every channel is 0 and stays so
                values = x[region]
                x[region] = (values - values.mean()) / max(float(values.std()), 1e-8)
        elif scheme == "zscore":  # statistics inside this channel's nonzero voxels, or over the crop ("mask": "all")
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


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float],
                    resampling: dict | None = None) -> tuple:
    if resampling:  # nnU-Net's compute_new_shape (its order of operations, so ties round alike)
        return tuple(max(1, int(round(sp / t * s))) for s, sp, t in zip(shape, spacing, target_spacing))
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


def check_resampling(resampling, where: str = "plans.json") -> None:
    """Raises a one-line MedsegError for a plan's `resampling` entry that `resample` cannot apply."""
    if resampling is None:
        return
    keys = set(NNUNET_RESAMPLING)
    if not isinstance(resampling, dict) or resampling.get("scheme") != "nnunet" or set(resampling) - keys:
        raise MedsegError(f"{where}: 'resampling' must be absent or {{\"scheme\": \"nnunet\", ...}} with keys from "
                          f"{sorted(keys)}, got {resampling!r}")
    for key in ("order", "order_z", "probabilities_order", "probabilities_order_z"):
        if resampling.get(key, 0) not in range(6):
            raise MedsegError(f"{where}: resampling '{key}' must be a spline order 0-5, got {resampling[key]!r}")


def separate_z_axis(spacing: Sequence[float], target_spacing: Sequence[float], anisotropy_threshold: float = 3.0,
                    force_separate_z: bool | None = None) -> int | None:
    """The axis nnU-Net resamples apart from the others (`determine_do_sep_z_and_axis`), or None: the scan's coarsest
    axis if its spacing is anisotropic, else the target's if that is, and only when exactly one axis is the coarsest."""

    def coarsest(values):
        values = np.asarray(values, np.float64)
        axes = np.flatnonzero(np.max(values) / values == 1)
        return int(axes[0]) if len(axes) == 1 else None

    if force_separate_z is not None:
        return coarsest(spacing) if force_separate_z else None
    for values in (spacing, target_spacing):
        if np.max(values) / np.min(values) > anisotropy_threshold:
            return coarsest(values)
    return None


def _zoom_clipped(x: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """skimage's `resize(x, new_shape, order, mode="edge", anti_aliasing=False)` as nnU-Net calls it: scipy's zoom in
    float64 with voxel-area alignment, clipped to the input's range."""
    x = x.astype(np.float64, copy=False)
    out = scipy.ndimage.zoom(x, [n / s for n, s in zip(new_shape, x.shape)], order=order, mode="nearest",
                             grid_mode=True)
    return np.clip(out, x.min(), x.max(), out=out)


def _resample_nnunet(x: np.ndarray, new_shape: Sequence[int], axis: int | None, order: int,
                     order_z: int) -> np.ndarray:
    """One channel (X, Y, Z) -> `new_shape` in float64, as nnU-Net's `resample_data_or_seg` (is_seg=False)."""
    if axis is None:
        return _zoom_clipped(x, new_shape, order)
    plane_shape = [n for a, n in enumerate(new_shape) if a != axis]
    slices = [_zoom_clipped(np.take(x, i, axis=axis), plane_shape, order) for i in range(x.shape[axis])]
    planes = np.stack(slices, axis=axis)
    old, new = x.shape[axis], int(new_shape[axis])
    if old == new:
        return planes
    # nnU-Net's map_coordinates along the coarse axis: output voxel j reads (j + 0.5) * old / new - 0.5.
    coordinates = float(old) / new * (np.arange(new, dtype=np.float64) + 0.5) - 0.5
    if order_z == 0:  # nearest: the source slice of each output slice, picked exactly as map_coordinates rounds
        source = scipy.ndimage.map_coordinates(np.arange(old, dtype=np.float64), coordinates[None], order=0,
                                               mode="nearest")
        return np.take(planes, source.astype(np.int64), axis=axis)
    zoom = [1.0] * 3
    zoom[axis] = new / old
    return scipy.ndimage.zoom(planes, zoom, order=order_z, mode="nearest", grid_mode=True)


def resample(array: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float],
             resampling: dict | None = None, kind: str = "data") -> np.ndarray:
    """(X, Y, Z[, C]) from `spacing` to `new_shape` at `new_spacing` by a plan's `resampling` (absent: `resize`,
    cubic for "data" and linear for "probabilities", i.e. logits). Keeps the array's dtype."""
    if not resampling:
        return resize(array, new_shape, order=3 if kind == "data" else 1)
    if tuple(array.shape[:3]) == tuple(new_shape):
        return array
    prefix = "" if kind == "data" else "probabilities_"
    settings = {**NNUNET_RESAMPLING, **resampling}
    axis = separate_z_axis(spacing, new_spacing, settings["anisotropy_threshold"], settings["force_separate_z"])
    order, order_z = int(settings[prefix + "order"]), int(settings[prefix + "order_z"])
    channels = array[..., None] if array.ndim == 3 else array
    out = np.empty(tuple(new_shape) + channels.shape[3:], array.dtype)
    for c in range(channels.shape[-1]):
        out[..., c] = _resample_nnunet(channels[..., c], new_shape, axis, order, order_z)
    return out[..., 0] if array.ndim == 3 else out


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
    resampling = plan.get("resampling")
    check_resampling(resampling)
    new_shape = resampled_shape(cropped.shape[:3], spacing, plan["target_spacing"], resampling)
    out = resample(cropped, new_shape, spacing, plan["target_spacing"], resampling).astype(np.float32)
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


def logits_to_box(logits: np.ndarray, box_shape: Sequence[int], plan: dict | None = None,
                  spacing: Sequence[float] | None = None) -> np.ndarray:
    """Preprocessed-grid logits (X', Y', Z', K) -> the crop box's grid: linear, or by the plan's `resampling` from its
    target spacing back to the scan's `spacing` (nnU-Net's resampling_fn_probabilities)."""
    resampling = (plan or {}).get("resampling")
    if resampling and spacing is None:
        raise ValueError("a plan with 'resampling' needs the scan's spacing to map logits back")
    target = plan["target_spacing"] if resampling else None
    return resample(logits, box_shape, target, spacing, resampling, kind="probabilities")


def map_back(array: np.ndarray, crop_box: Sequence[Sequence[int]], canonical_shape: Sequence[int], order: int,
             fill=0) -> np.ndarray:
    """Preprocessed-grid array (X', Y', Z'[, K]) -> the original canonical grid (X, Y, Z[, K]).

    Resized onto the crop box (order 0: nearest, 1: linear) and placed in a volume of `canonical_shape` filled with
    `fill` outside it."""
    box_shape = [hi - lo for lo, hi in crop_box]
    return paste(resize(array, box_shape, order=order), crop_box, canonical_shape, fill)
