"""Network outputs -> label maps: softmax outputs by argmax, region (sigmoid) outputs by painting the regions in order;
and preprocessed-grid logits back onto a scan's original (canonical) grid.

Region-based models (nnU-Net's regions, BraTS style) have one sigmoid output per possibly overlapping region, e.g.
whole tumour {1, 2, 3}, tumour core {2, 3}, enhancing {3}. A voxel belongs to a region where its logit is > 0
(probability > 0.5); regions are painted in the order given, each with the label it adds over the regions after it
(`region_labels`: {1, 2, 3} -> 1, {2, 3} -> 2, {3} -> 3), so nested regions end as the innermost label, as nnU-Net's
`regions_class_order` does.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from medseg_jax.data.preprocess import logits_to_box, paste
from medseg_jax.errors import MedsegError
from medseg_jax.io.datasets import region_labels  # (the painting rule dataset.json's regions_class_order must match)


def to_labels(logits: np.ndarray, regions=None) -> np.ndarray:
    """(..., K) logits -> (...) integer labels."""
    if not regions:
        return np.argmax(logits, axis=-1)
    labels = np.zeros(logits.shape[:-1], np.int32)
    for channel, value in enumerate(region_labels(regions)):
        labels[logits[..., channel] > 0] = value
    return labels


def probabilities(logits: np.ndarray, regions=None) -> np.ndarray:
    """(..., K) logits -> class probabilities (softmax), or per-region probabilities (sigmoid) for region models."""
    logits = np.asarray(logits, np.float32)
    if regions:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def labels_of_probabilities(probs: np.ndarray, regions=None) -> np.ndarray:
    """The labels `to_labels` gives for the logits these probabilities came from (sigmoid > 0.5 is logit > 0)."""
    if not regions:
        return np.argmax(probs, axis=-1)
    return to_labels(probs - 0.5, regions)


def label_dtype(labels: np.ndarray):
    """The smallest integer type a label map is written in (uint8, or int16 beyond 255)."""
    return np.uint8 if labels.max(initial=0) < 256 else np.int16


def logits_to_original(logits: np.ndarray, crop_box, canonical_shape, regions=None,
                       with_probabilities: bool = False, plan: dict | None = None, spacing=None):
    """Preprocessed-grid logits (X', Y', Z', K) -> label map on the canonical original grid (background outside the
    crop box). The logits are resized onto the crop box (linear, or as the `plan`'s `resampling` says from its target
    spacing to the scan's `spacing`) and turned into labels there (`to_labels`), so only one channel is ever full
    size. `with_probabilities` also returns (X, Y, Z, K) float16 probabilities on that grid
    (background certain outside the crop box), whose labels are the map's."""
    box_shape = [hi - lo for lo, hi in crop_box]
    box_logits = logits_to_box(logits, box_shape, plan, spacing)
    labels = to_labels(box_logits, regions)
    label_map = paste(labels.astype(label_dtype(labels)), crop_box, canonical_shape)
    if not with_probabilities:
        return label_map
    inside = probabilities(box_logits, regions).astype(np.float16)
    outside = np.zeros(inside.shape[-1], np.float16)
    if not regions:
        outside[0] = 1
    full = np.broadcast_to(outside, tuple(canonical_shape) + outside.shape).copy()
    full[tuple(slice(lo, hi) for lo, hi in crop_box)] = inside
    return label_map, full


# --- connected-component postprocessing (nnU-Net's, chosen on cross-validation by `medseg results --find-best`) -------

def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    import cc3d

    if not mask.any():
        return mask
    return cc3d.largest_k(mask.astype(np.uint8), k=1, connectivity=26) > 0


def without_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """The mask without its 26-connected components of fewer than `min_voxels` voxels."""
    import cc3d

    if not mask.any() or min_voxels <= 1:
        return mask
    return cc3d.dust(mask.astype(np.uint8), threshold=int(min_voxels), connectivity=26) > 0


def filled_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its enclosed holes filled (scipy's binary_fill_holes: regions not connected to the border)."""
    if not mask.any():
        return mask
    return scipy.ndimage.binary_fill_holes(mask)


RULE_KEYS = {"largest_component", "min_voxels", "min_volume_mm3", "fill_holes"}


def check_rules(rules, where: str) -> None:
    """Raises a one-line MedsegError naming `where` for postprocessing rules `postprocess` cannot apply."""
    if rules is None:
        return
    unknown_top = set(rules) - {"foreground_largest_component", "classes"} if isinstance(rules, dict) else None
    if not isinstance(rules, dict) or unknown_top:
        raise MedsegError(f"{where}: postprocessing must be {{'foreground_largest_component': bool, 'classes': "
                          f"{{label: {{{', '.join(sorted(RULE_KEYS))}}}}}}} (unknown: {sorted(unknown_top or [])})")
    for label, rule in (rules.get("classes") or {}).items():
        if not str(label).isdigit() or not isinstance(rule, dict) or set(rule) - RULE_KEYS:
            raise MedsegError(f"{where}: postprocessing rule for class {label!r} must be a dict with keys from "
                              f"{sorted(RULE_KEYS)}, got {rule!r}")


def postprocess(labels: np.ndarray, rules: dict | None, spacing=None) -> np.ndarray:
    """Applies postprocessing `rules` to a label map:
    {"foreground_largest_component": bool, "classes": {"<label>": {"largest_component": bool, "min_voxels": int,
    "min_volume_mm3": float, "fill_holes": bool}}}.
    The foreground rule first (removed voxels become background), then each class's in label order: its largest
    component, its components under `min_voxels` voxels or `min_volume_mm3` (with `spacing`, mm per axis) removed,
    then background voxels enclosed by the class filled with it. nnU-Net's steps are the first two; hole filling is
    MONAI's FillHoles."""
    if not rules:
        return labels
    labels = labels.copy()
    if rules.get("foreground_largest_component"):
        foreground = labels > 0
        labels[foreground & ~largest_component(foreground)] = 0
    for label, rule in sorted((rules.get("classes") or {}).items(), key=lambda item: int(item[0])):
        mask = labels == int(label)
        kept = mask
        if rule.get("largest_component"):
            kept = largest_component(kept)
        if rule.get("min_voxels"):
            kept = without_small_components(kept, int(rule["min_voxels"]))
        if rule.get("min_volume_mm3"):
            if spacing is None:
                raise MedsegError("postprocessing by min_volume_mm3 needs the scan's spacing")
            voxel_mm3 = float(np.prod(np.asarray(spacing, np.float64)))
            kept = without_small_components(kept, int(np.ceil(float(rule["min_volume_mm3"]) / voxel_mm3)))
        labels[mask & ~kept] = 0
        if rule.get("fill_holes"):
            labels[filled_holes(labels == int(label)) & (labels == 0)] = int(label)
    return labels
