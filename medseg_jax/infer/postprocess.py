"""Network outputs -> label maps: softmax outputs by argmax, region (sigmoid) outputs by painting the regions in order;
and preprocessed-grid logits back onto a scan's original (canonical) grid.

Region-based models (nnU-Net's regions, BraTS style) have one sigmoid output per possibly overlapping region, e.g.
whole tumour {1, 2, 3}, tumour core {2, 3}, enhancing {3}. A voxel belongs to a region where its logit is > 0
(probability > 0.5); regions are painted in the order given, each with the label it adds over the regions after it
(`region_labels`: {1, 2, 3} -> 1, {2, 3} -> 2, {3} -> 3), so nested regions end as the innermost label, as nnU-Net's
`regions_class_order` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg_jax.data.preprocess import paste, resize


def region_labels(regions: Sequence[Sequence[int]]) -> list[int]:
    """The label each region paints: the smallest of its values that no later region contains (else its largest)."""
    labels = []
    for index, region in enumerate(regions):
        later = set().union(*[set(r) for r in regions[index + 1:]])
        own = sorted(set(int(v) for v in region) - later)
        labels.append(own[0] if own else max(int(v) for v in region))
    return labels


def to_labels(logits: np.ndarray, regions=None) -> np.ndarray:
    """(..., K) logits -> (...) integer labels."""
    if not regions:
        return np.argmax(logits, axis=-1)
    labels = np.zeros(logits.shape[:-1], np.int32)
    for channel, value in enumerate(region_labels(regions)):
        labels[logits[..., channel] > 0] = value
    return labels


def logits_to_original(logits: np.ndarray, crop_box, canonical_shape, regions=None) -> np.ndarray:
    """Preprocessed-grid logits (X', Y', Z', K) -> label map on the canonical original grid (background outside the
    crop box). The logits are resized onto the crop box (linear) and turned into labels there (`to_labels`), so only
    one channel is ever full size."""
    box_shape = [hi - lo for lo, hi in crop_box]
    labels = to_labels(resize(logits, box_shape, order=1), regions)
    return paste(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int16), crop_box, canonical_shape)
