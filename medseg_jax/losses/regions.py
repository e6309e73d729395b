"""Region-based training (nnU-Net's regions, as for BraTS): one sigmoid output per possibly overlapping region.

A region is a set of label values, e.g. BraTS whole tumour {1, 2, 3}, tumour core {2, 3}, enhancing tumour {3}. The
model has one output channel per region (in the order given); the loss turns the integer labels into the R binary
region targets and sums a sigmoid binary cross-entropy and a soft Dice over the regions (nnU-Net's DC_and_BCE_loss:
Dice over every region, none of them a background).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medseg_jax.losses._common import as_float32, spatial_axes, valid_mask
from medseg_jax.losses.ce import binary_cross_entropy_loss
from medseg_jax.losses.dice import dice_per_class


def region_targets(labels, regions: Sequence[Sequence[int]]) -> jax.Array:
    """(N, *spatial) integer labels -> (N, *spatial, R) float32, channel r 1 where the label is one of regions[r]."""
    labels = jnp.asarray(labels)
    channels = [jnp.isin(labels, jnp.asarray(tuple(region), labels.dtype)) for region in regions]
    return jnp.stack(channels, axis=-1).astype(jnp.float32)


def region_loss(logits, labels, regions: Sequence[Sequence[int]], *, dice_weight: float = 1.0,
                bce_weight: float = 1.0, batch_dice: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                squared_pred: bool = False, ignore_label: int | None = None) -> jax.Array:
    """dice_weight * (1 - mean soft Dice of sigmoid(logits) per region) + bce_weight * mean BCE over voxels and regions.

    `logits` (N, *spatial, R), one channel per region. `ignore_label`: voxels with it are left out of both terms (the
    BCE is averaged over the remaining voxels times R).
    """
    if logits.shape[-1] != len(regions):
        raise ValueError(f"{len(regions)} regions but the logits have {logits.shape[-1]} channels (one per region)")
    targets = region_targets(labels, regions)
    probs = jax.nn.sigmoid(as_float32(logits))
    mask = valid_mask(labels, ignore_label)
    if mask is not None:
        probs, targets = probs * mask, targets * mask
    dice = dice_per_class(probs, targets, spatial_axes(logits.ndim, batch_dice), squared_pred=squared_pred,
                          smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    bce = binary_cross_entropy_loss(logits, targets, mask)
    return dice_weight * (1.0 - jnp.mean(dice)) + bce_weight * bce
