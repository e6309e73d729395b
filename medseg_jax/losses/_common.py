"""Shared pieces of the losses: float32 probabilities, one-hot targets, the ignore-label mask, reduction axes.

Conventions for every loss in this package: `logits` are channels-last `(N, *spatial, K)` (any float dtype; the math is
float32), `labels` are `(N, *spatial)` integers. A label value outside [0, K) one-hot encodes to all zeros, so an
ignore label is usually K (or 255, or -1) and then needs no channel of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_float32(logits) -> jax.Array:
    return jnp.asarray(logits).astype(jnp.float32)


def spatial_axes(ndim: int, batch: bool) -> tuple[int, ...]:
    """Axes summed for a per-class statistic of an `ndim`-dimensional channels-last array: the spatial axes, plus the
    batch axis when `batch` (one statistic per class over the whole batch, as MONAI's `batch=True`)."""
    return tuple(range(0 if batch else 1, ndim - 1))


def valid_mask(labels, ignore_label) -> jax.Array | None:
    """(N, *spatial, 1) float32: 1 where the voxel counts, 0 where it carries `ignore_label`; None without one."""
    if ignore_label is None:
        return None
    return (labels != ignore_label).astype(jnp.float32)[..., None]


def softmax_and_onehot(logits, labels, ignore_label=None) -> tuple[jax.Array, jax.Array]:
    """Softmax probabilities and one-hot labels, both float32 `(N, *spatial, K)`, ignored voxels zeroed in both (as
    MONAI's `ignore_index` and nnU-Net's loss mask: such voxels then add nothing to any sum)."""
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(as_float32(logits), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    mask = valid_mask(labels, ignore_label)
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    return probs, onehot


def class_weight_vector(class_weights, num_classes: int, include_background: bool = True) -> jax.Array:
    """`class_weights` (K values, background first) as a float32 vector, the background's dropped unless
    `include_background`."""
    weights = jnp.asarray(class_weights, jnp.float32).reshape(-1)
    if weights.shape[0] != num_classes:
        raise ValueError(f"class_weights has {weights.shape[0]} values for {num_classes} classes "
                         "(one per output channel, background first)")
    return weights if include_background else weights[1:]


def safe_divide(numerator, denominator) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0, with finite gradients on both branches."""
    nonzero = denominator > 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)
