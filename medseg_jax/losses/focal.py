"""Softmax focal loss (Lin et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medseg_jax.losses._common import as_float32, class_weight_vector, safe_divide, valid_mask


def focal_loss(logits, labels, *, gamma: float = 2.0, alpha: float | Sequence[float] | None = None,
               class_weights: Sequence[float] | None = None, ignore_label: int | None = None) -> jax.Array:
    """Mean over voxels of -a_y * w_y * (1 - p_y)^gamma * log p_y, p the softmax probability and y the label.

    `alpha` as MONAI's FocalLoss(use_softmax=True): a number gives the background 1 - alpha and every other class alpha,
    a sequence gives one factor per class; `class_weights` (K values) multiply as MONAI's `weight`. gamma = 0 with
    neither is exactly the (unweighted) cross-entropy.

    Reduction: the per-voxel loss is summed over classes (only the label's class is non-zero) and averaged over the
    voxels (the non-ignored ones with `ignore_label`), so the scale is that of the cross-entropy. MONAI's `mean`
    averages over classes too without `ignore_index` (its value is ours / K) and over voxels only with it (equal to
    ours). Background is always included: MONAI's include_background=False re-normalises the softmax over the
    foreground channels, which is not a focal loss of the model's probabilities.
    """
    num_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(as_float32(logits), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    mask = valid_mask(labels, ignore_label)
    if mask is not None:
        onehot = onehot * mask
    loss = -log_probs * onehot
    if gamma != 0:  # (1 - p)^gamma, by expm1 to stay accurate where p ~ 1, floored so the slope stays finite at p = 1
        loss = loss * jnp.power(jnp.maximum(-jnp.expm1(log_probs), 1e-30), gamma)
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            factors = jnp.asarray([1.0 - alpha] + [float(alpha)] * (num_classes - 1), jnp.float32)
        else:
            factors = class_weight_vector(alpha, num_classes)
        loss = loss * factors
    if class_weights is not None:
        loss = loss * class_weight_vector(class_weights, num_classes)
    per_voxel = jnp.sum(loss, axis=-1)
    if mask is None:
        return jnp.mean(per_voxel)
    return safe_divide(jnp.sum(per_voxel), jnp.sum(mask))
