"""Cross-entropy (softmax, optionally class-weighted), binary cross-entropy on logits, and Dice + CE."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medseg_jax.losses._common import as_float32, class_weight_vector, safe_divide, valid_mask
from medseg_jax.losses.dice import soft_dice_loss


def cross_entropy_loss(logits, labels, *, class_weights: Sequence[float] | None = None,
                       ignore_label: int | None = None) -> jax.Array:
    """Mean softmax cross-entropy. Written with a one-hot product rather than optax's integer-label gather: the
    gather's gradient is a scatter-add over the whole volume that XLA tries to constant-fold for seconds at compile
    time (and scatters are slow on GPUs); the product's gradient is elementwise.

    `class_weights` (K values): the weighted mean sum(w_y * nll) / sum(w_y), as torch's CrossEntropyLoss(weight=...)
    (and so MONAI's DiceCELoss). `ignore_label`: voxels with this label are left out of both sums (torch's
    `ignore_index`); a batch with nothing but ignored voxels gives 0.
    """
    log_probs = jax.nn.log_softmax(as_float32(logits), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if class_weights is None and ignore_label is None:
        return -jnp.mean(jnp.sum(log_probs * onehot, axis=-1))
    mask = valid_mask(labels, ignore_label)
    if mask is not None:
        onehot = onehot * mask
    nll = -jnp.sum(log_probs * onehot, axis=-1)
    if class_weights is None:
        return safe_divide(jnp.sum(nll), jnp.sum(mask))
    weights = class_weight_vector(class_weights, logits.shape[-1])
    voxel_weights = jnp.sum(onehot * weights, axis=-1)  # w_y, 0 where ignored
    return safe_divide(jnp.sum(voxel_weights * nll), jnp.sum(voxel_weights))


def binary_cross_entropy_loss(logits, targets, mask=None) -> jax.Array:
    """Mean sigmoid binary cross-entropy of logits against {0, 1} (or soft) targets of the same shape, in the stable
    form max(x, 0) - x t + log(1 + exp(-|x|)) (torch's BCEWithLogitsLoss). `mask` (broadcastable, 0/1) leaves voxels
    out of the mean."""
    x = as_float32(logits)
    loss = jnp.maximum(x, 0.0) - x * targets + jnp.log1p(jnp.exp(-jnp.abs(x)))
    if mask is None:
        return jnp.mean(loss)
    mask = jnp.broadcast_to(mask, loss.shape)
    return safe_divide(jnp.sum(loss * mask), jnp.sum(mask))


def dice_ce_loss(logits, labels, *, dice_weight: float = 1.0, ce_weight: float = 1.0, batch_dice: bool = False,
                 include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 squared_pred: bool = False, class_weights: Sequence[float] | None = None,
                 ignore_label: int | None = None) -> jax.Array:
    """dice_weight * soft Dice + ce_weight * cross-entropy (nnU-Net's default loss; MONAI's DiceCELoss with
    lambda_dice, lambda_ce). `class_weights` weigh both terms, as MONAI's `weight`."""
    dice = soft_dice_loss(logits, labels, batch_dice=batch_dice, include_background=include_background,
                          smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred,
                          class_weights=class_weights, ignore_label=ignore_label)
    ce = cross_entropy_loss(logits, labels, class_weights=class_weights, ignore_label=ignore_label)
    return dice_weight * dice + ce_weight * ce
