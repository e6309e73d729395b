"""Overlap losses on softmax probabilities: soft Dice, generalised Dice, Tversky and focal-Tversky.

Each equals its MONAI counterpart (`DiceLoss`, `GeneralizedDiceLoss`, `TverskyLoss`, with `softmax=True,
to_onehot_y=True`) for the same options, channels moved last; `tests/test_losses_monai.py` checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medseg_jax.losses._common import class_weight_vector, softmax_and_onehot, spatial_axes

GDL_WEIGHT_TYPES = ("square", "simple", "uniform")


def dice_per_class(probs, targets, axes, *, squared_pred: bool = False, smooth_nr: float = 1e-5,
                   smooth_dr: float = 1e-5) -> jax.Array:
    """(2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr) over `axes`, squares of p and g in the denominator
    when `squared_pred` (V-Net's form)."""
    intersection = jnp.sum(probs * targets, axis=axes)
    if squared_pred:
        denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(targets * targets, axis=axes)
    else:
        denominator = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    return (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)


def soft_dice_loss(logits, labels, *, batch_dice: bool = False, include_background: bool = False,
                   smooth: float = 1e-5, smooth_nr: float | None = None, smooth_dr: float | None = None,
                   squared_pred: bool = False, class_weights: Sequence[float] | None = None,
                   ignore_label: int | None = None) -> jax.Array:
    """1 - mean soft Dice over classes, as nnU-Net's SoftDiceLoss (do_bg=False, smooth=1e-5) and MONAI's DiceLoss.

    Per class: (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr) with p the softmax probability and g the
    one-hot label, summed over the spatial axes (and the batch when `batch_dice`); `smooth_nr` and `smooth_dr`
    default to `smooth`. A class absent from both prediction and label scores ~1 thanks to the smoothing, so empty
    classes do not dominate. `squared_pred`: sum(p^2) + sum(g^2) in the denominator. `class_weights` (K values,
    background first; the background's is dropped with it): mean of weight * (1 - Dice), as MONAI's `weight`.
    `ignore_label`: voxels with this label are left out of every sum.
    """
    smooth_nr = smooth if smooth_nr is None else smooth_nr
    smooth_dr = smooth if smooth_dr is None else smooth_dr
    num_classes = logits.shape[-1]
    probs, onehot = softmax_and_onehot(logits, labels, ignore_label)
    axes = spatial_axes(logits.ndim, batch_dice)
    dice = dice_per_class(probs, onehot, axes, squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    if not include_background:
        dice = dice[..., 1:]
    if class_weights is None:
        return 1.0 - jnp.mean(dice)
    return jnp.mean((1.0 - dice) * class_weight_vector(class_weights, num_classes, include_background))


def generalized_dice_loss(logits, labels, *, weight_type: str = "square", batch_dice: bool = False,
                          include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                          ignore_label: int | None = None) -> jax.Array:
    """Generalised Dice (Sudre et al. 2017), as MONAI's GeneralizedDiceLoss.

    1 - (2 * sum_c w_c * sum(p * g) + smooth_nr) / (sum_c w_c * (sum(p) + sum(g)) + smooth_dr), per sample (or once over
    the batch when `batch_dice`), with w_c = 1 / (sum g)^2 (`square`), 1 / sum g (`simple`) or 1 (`uniform`). A class
    absent from the labels (infinite weight) takes the largest finite weight of its sample (of the batch with
    `batch_dice`), as MONAI does.
    """
    if weight_type not in GDL_WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(GDL_WEIGHT_TYPES)}, got {weight_type!r}")
    probs, onehot = softmax_and_onehot(logits, labels, ignore_label)
    if not include_background:
        probs, onehot = probs[..., 1:], onehot[..., 1:]
    axes = spatial_axes(logits.ndim, batch_dice)
    intersection = jnp.sum(probs * onehot, axis=axes)
    ground = jnp.sum(onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + ground
    if weight_type == "square":
        weights = 1.0 / (ground * ground)
    elif weight_type == "simple":
        weights = 1.0 / ground
    else:
        weights = jnp.ones_like(ground)
    infinite = jnp.isinf(weights)
    weights = jnp.where(infinite, 0.0, weights)
    weights = weights + infinite * jnp.max(weights, axis=-1, keepdims=True)
    weights = jax.lax.stop_gradient(weights)
    numerator = 2.0 * jnp.sum(intersection * weights, axis=-1) + smooth_nr
    denominator = jnp.sum(denominator * weights, axis=-1) + smooth_dr
    return jnp.mean(1.0 - numerator / denominator)


def tversky_index(logits, labels, *, alpha: float = 0.5, beta: float = 0.5, batch_dice: bool = False,
                  include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                  ignore_label: int | None = None) -> jax.Array:
    """Per-class (per-sample unless `batch_dice`) Tversky index (tp + smooth_nr) / (tp + alpha fp + beta fn +
    smooth_dr), tp = sum(p g), fp = sum(p (1 - g)), fn = sum((1 - p) g)."""
    probs, onehot = softmax_and_onehot(logits, labels, ignore_label)
    if not include_background:
        probs, onehot = probs[..., 1:], onehot[..., 1:]
    axes = spatial_axes(logits.ndim, batch_dice)
    tp = jnp.sum(probs * onehot, axis=axes)
    fp = jnp.sum(probs * (1.0 - onehot), axis=axes)
    fn = jnp.sum((1.0 - probs) * onehot, axis=axes)
    return (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)


def tversky_loss(logits, labels, *, alpha: float = 0.5, beta: float = 0.5, batch_dice: bool = False,
                 include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 ignore_label: int | None = None) -> jax.Array:
    """1 - mean Tversky index (Salehi et al. 2017), as MONAI's TverskyLoss: `alpha` weighs false positives, `beta`
    false negatives (alpha = beta = 0.5 is the soft Dice; beta > alpha favours recall)."""
    index = tversky_index(logits, labels, alpha=alpha, beta=beta, batch_dice=batch_dice,
                          include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                          ignore_label=ignore_label)
    return jnp.mean(1.0 - index)


def focal_tversky_loss(logits, labels, *, alpha: float = 0.5, beta: float = 0.5, gamma: float = 4.0 / 3.0,
                       batch_dice: bool = False, include_background: bool = False, smooth_nr: float = 1e-5,
                       smooth_dr: float = 1e-5, ignore_label: int | None = None) -> jax.Array:
    """Focal-Tversky (Abraham & Khan 2019): mean over classes of (1 - TI_c)^(1/gamma), gamma = 4/3 their best value;
    gamma = 1 is the Tversky loss. 1 - TI is floored at 1e-7 before the power so that the gradient stays finite where
    a class is matched exactly (x^(1/gamma) has an infinite slope at 0 for gamma > 1)."""
    index = tversky_index(logits, labels, alpha=alpha, beta=beta, batch_dice=batch_dice,
                          include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                          ignore_label=ignore_label)
    return jnp.mean(jnp.power(jnp.maximum(1.0 - index, 1e-7), 1.0 / gamma))
