"""Dataset fingerprint and preprocessing plan (the data half of nnU-Net's experiment planning).

The fingerprint is gathered one case at a time while the dataset is validated, so memory stays bounded by the largest
case: spacings, shapes before and after cropping to the nonzero region, per-channel intensity samples of foreground
voxels (label > 0; at most 10,000 per case, as nnU-Net) and voxel counts per class.

The plan turns it into preprocessing decisions, each overridable in the experiment config's `data` section:

- target spacing: the median spacing per axis; for strongly anisotropic data (the coarsest axis more than 3x the
  finest other axis *and* fewer than a third as many voxels along it) that axis gets the 10th percentile of its
  spacings instead, so thick-slice scans are not upsampled to the thinnest slices of the dataset (nnU-Net's rule);
- normalisation per channel by modality: CT clips to the foreground 0.5-99.5 percentiles of the whole training set and
  z-scores with its foreground mean and std; MRI (and anything unknown) z-scores each case inside its nonzero mask;
  ultrasound maps each case's 0.5-99.5 percentile range to [0, 1];
- resampling: images cubic, labels nearest (or linear per class then argmax).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import ml_collections
import numpy as np

from medseg_jax.errors import MedsegError

FOREGROUND_SAMPLES_PER_CASE = 10_000
SCHEMES = ("ct", "zscore", "percentile", "none")
LABEL_RESAMPLING = ("nearest", "linear")


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` config keys that planning and preparation read, with their defaults."""
    config = ml_collections.ConfigDict()
    config.dataset = ""
    config.store = ""
    # the store's version to train on (`medseg dataset add` makes a new one each time): 0 the newest; a run records
    # the one it used (RUN/data_version.json) and keeps it when resumed
    config.store_version = 0
    config.target_spacing = ()  # mm per canonical axis; empty: planned from the fingerprint
    config.anisotropy_threshold = 3.0
    config.normalization = "auto"  # auto (by each channel's modality) | ct | zscore | percentile | none, or per
    # channel: "zscore,percentile"
    config.label_resampling = "nearest"  # nearest | linear (per class, then argmax)
    config.chunk_shape = (32, 32, 32)  # zarr inner chunk (voxels per axis) of the stored volumes
    return config


def channel_scheme(channel_name: str) -> str:
    """nnU-Net-style choice of normalisation from a channel's name ("CT", "T2", "ADC", "US", ...)."""
    name = channel_name.lower()
    words = set(re.split(r"[^a-z0-9]+", name))
    if "ct" in words:
        return "ct"
    if "us" in words or "ultrasound" in name:
        return "percentile"
    if name in ("nonorm", "none"):
        return "none"
    return "zscore"


# --- per case -------------------------------------------------------------------------------------------------------

def nonzero_box(image: np.ndarray, label: np.ndarray | None = None) -> list[list[int]]:
    """[[lo, hi) per axis] of the voxels that are nonzero in any channel (or foreground in `label`).

    An all-zero volume keeps its full extent."""
    mask = np.any(image != 0, axis=-1)
    if label is not None:
        mask |= label > 0
    if not mask.any():
        return [[0, int(s)] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append([int(present[0]), int(present[-1]) + 1])
    return box


def crop(array: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    return array[tuple(slice(lo, hi) for lo, hi in box)]


def case_seed(case_id: str) -> int:
    """A seed that depends on the case id only (not on its position or on which worker handles it)."""
    return zlib.crc32(case_id.encode())


def case_fingerprint(case_id: str, image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float]) -> dict:
    """Fingerprint of one canonical case; `samples` holds foreground intensities per channel (kept out of JSON). An
    unlabelled case (`label` None) samples the voxels that are nonzero in any channel instead."""
    box = nonzero_box(image, label)
    image_c = crop(image, box)
    label_c = crop(label, box) if label is not None else np.zeros(image_c.shape[:3], np.uint8)
    foreground = label_c > 0 if label is not None else np.any(image_c != 0, axis=-1)
    rng = np.random.default_rng(case_seed(case_id))
    samples = []
    for channel in range(image.shape[-1]):
        values = image_c[..., channel][foreground]
        if values.size > FOREGROUND_SAMPLES_PER_CASE:
            values = rng.choice(values, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        samples.append(np.asarray(values, np.float32))
    counts = np.bincount(label_c.ravel().astype(np.int64))
    return {
        "case_id": case_id,
        "spacing": [float(s) for s in spacing],
        "shape": [int(s) for s in image.shape[:3]],
        "shape_after_crop": [int(s) for s in image_c.shape[:3]],
        "crop_box": box,
        "class_voxels": {str(c): int(n) for c, n in enumerate(counts) if n},
        "samples": samples,
    }


# --- dataset --------------------------------------------------------------------------------------------------------

def intensity_properties(values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"num_samples": 0}
    return {"num_samples": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "median": float(np.median(values)), "min": float(values.min()), "max": float(values.max()),
            "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5))}


def aggregate(case_fingerprints: Sequence[dict], labels: dict, channel_names: dict) -> dict:
    """The dataset fingerprint (JSON-friendly) from per-case fingerprints, in case-id order."""
    cases = sorted(case_fingerprints, key=lambda f: f["case_id"])
    num_channels = len(channel_names)
    properties = {}
    for channel in range(num_channels):
        pooled = np.concatenate([f["samples"][channel] for f in cases]) if cases else np.zeros(0)
        properties[str(channel)] = intensity_properties(pooled)
    class_voxels = {str(k): 0 for k in sorted(labels)}
    cases_with_class = {str(k): 0 for k in sorted(labels)}
    for f in cases:
        for key, count in f["class_voxels"].items():
            class_voxels[key] = class_voxels.get(key, 0) + count
            cases_with_class[key] = cases_with_class.get(key, 0) + 1
    return {
        "num_cases": len(cases),
        "case_ids": [f["case_id"] for f in cases],
        "spacings": [f["spacing"] for f in cases],
        "shapes_before_crop": [f["shape"] for f in cases],
        "shapes_after_crop": [f["shape_after_crop"] for f in cases],
        "foreground_intensity_properties_per_channel": properties,
        "class_voxels": class_voxels,
        "cases_with_class": cases_with_class,
    }


def planned_target_spacing(spacings, shapes, anisotropy_threshold: float = 3.0) -> list[float]:
    """nnU-Net's full-resolution target spacing: the median, except along a strongly anisotropic axis."""
    spacings = np.asarray(spacings, np.float64)
    shapes = np.asarray(shapes, np.float64)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    anisotropic_spacing = target[worst] > anisotropy_threshold * max(target[a] for a in others)
    anisotropic_voxels = target_size[worst] * anisotropy_threshold < min(target_size[a] for a in others)
    if anisotropic_spacing and anisotropic_voxels:
        value = np.percentile(spacings[:, worst], 10)
        if value < max(target[a] for a in others):
            value = max(max(target[a] for a in others), value) + 1e-5
        target[worst] = value
    return [float(v) for v in target]


def _schemes(data_config, channel_names: dict) -> list[str]:
    """`data.normalization`: "auto", one scheme for every channel, or one per channel ("zscore,percentile")."""
    setting = data_config.normalization
    schemes = [v.strip() for v in setting.split(",")] if isinstance(setting, str) else [str(v) for v in setting]
    if schemes == ["auto"]:
        return [channel_scheme(channel_names[c]) for c in sorted(channel_names)]
    if len(schemes) == 1:
        schemes = schemes * len(channel_names)
    if len(schemes) != len(channel_names):
        raise MedsegError(f"config key 'data.normalization': {len(schemes)} schemes given for {len(channel_names)} "
                          "channels")
    for scheme in schemes:
        if scheme not in SCHEMES:
            raise MedsegError(f"config key 'data.normalization': unknown scheme '{scheme}' (known: auto, "
                              f"{', '.join(SCHEMES)})")
    return schemes


def check_resampled_size(resampled_shapes: np.ndarray, case_ids, channels: int, target) -> None:
    """Refuses a target spacing whose largest resampled case cannot be held in this machine's free memory (its image
    as float32, resampled from a float32 copy; a worker holds one case at a time)."""
    if not len(resampled_shapes):
        return
    from medseg_jax.io.nifti import available_memory, format_size

    voxels = np.prod(resampled_shapes, axis=1)
    largest = int(np.argmax(voxels))
    needed = float(voxels[largest]) * max(channels, 1) * 4 * 2
    available = available_memory()
    if needed > available:
        shape = "x".join(str(int(v)) for v in resampled_shapes[largest])
        case = case_ids[largest] if largest < len(case_ids) else f"case {largest}"
        raise MedsegError(f"config key 'data.target_spacing': {tuple(target)} mm resamples {case} to {shape} voxels, "
                          f"about {format_size(needed)} to prepare, more than the {format_size(available)} of memory "
                          "available; choose a coarser spacing")


def make_plan(fingerprint: dict, labels: dict, channel_names: dict, modality: str, data_config) -> dict:
    """The preprocessing plan (saved as plans.json in the store and in every run trained on it)."""
    if data_config.target_spacing:
        target = [float(v) for v in data_config.target_spacing]
        if len(target) != 3 or not all(v > 0 for v in target):
            raise MedsegError(f"config key 'data.target_spacing': {tuple(data_config.target_spacing)} must be three "
                              "positive spacings in mm (or empty to plan it)")
    else:
        target = planned_target_spacing(fingerprint["spacings"], fingerprint["shapes_after_crop"],
                                        data_config.anisotropy_threshold)
    if data_config.label_resampling not in LABEL_RESAMPLING:
        raise MedsegError(f"config key 'data.label_resampling': '{data_config.label_resampling}' is not one of "
                          f"{', '.join(LABEL_RESAMPLING)}")
    chunk = [int(v) for v in data_config.chunk_shape]
    if len(chunk) != 3 or not all(v > 0 for v in chunk):
        raise MedsegError(f"config key 'data.chunk_shape': {tuple(data_config.chunk_shape)} must be three positive "
                          "sizes")
    normalization = []
    for channel, scheme in enumerate(_schemes(data_config, channel_names)):
        if scheme == "ct":
            stats = fingerprint["foreground_intensity_properties_per_channel"][str(channel)]
            if not stats.get("num_samples"):
                raise MedsegError("training labels contain no foreground voxels: CT normalisation has no statistics "
                                  "(and there is nothing to learn)")
            normalization.append({"scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                                  "mean": stats["mean"], "std": max(stats["std"], 1e-8)})
        else:
            normalization.append({"scheme": scheme})
    shapes = np.asarray(fingerprint["shapes_after_crop"], np.float64)
    spacings = np.asarray(fingerprint["spacings"], np.float64)
    resampled = np.round(shapes * spacings / np.asarray(target)) if len(shapes) else np.zeros((0, 3))
    check_resampled_size(resampled, fingerprint.get("case_ids", []), len(channel_names), target)
    return {
        "target_spacing": target,
        "modality": modality,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "channel_names": {str(k): v for k, v in sorted(channel_names.items())},
        "normalization": normalization,
        "crop": "nonzero",
        "image_resampling": "cubic",
        "label_resampling": data_config.label_resampling,
        "chunk_shape": chunk,
        "median_shape_after_resampling": [int(v) for v in np.median(resampled, axis=0)] if len(shapes) else [],
    }
