"""Segmentation losses: pure functions of (logits, labels) -> scalar, channels-last.

`logits` is (N, *spatial, K) float, `labels` is (N, *spatial) integer in [0, K).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def soft_dice_loss(logits, labels, *, batch_dice: bool = False, include_background: bool = False,
                   smooth: float = 1e-5) -> jax.Array:
    """1 - mean soft Dice over classes, as nnU-Net's SoftDiceLoss (do_bg=False, smooth=1e-5).

    Per class: (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth) with p the softmax probability and g the one-hot
    label, summed over the spatial axes (and the batch when `batch_dice`). A class absent from both prediction and label
    scores ~1 thanks to `smooth`, so empty classes do not dominate.
    """
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    axes = tuple(range(0 if batch_dice else 1, logits.ndim - 1))
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return 1.0 - jnp.mean(dice)


def cross_entropy_loss(logits, labels) -> jax.Array:
    """Mean softmax cross-entropy. Written with a one-hot product rather than optax's integer-label gather: the
    gather's gradient is a scatter-add over the whole volume that XLA tries to constant-fold for seconds at compile
    time (and scatters are slow on GPUs); the product's gradient is elementwise."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return -jnp.mean(jnp.sum(log_probs * onehot, axis=-1))


def dice_ce_loss(logits, labels, *, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 batch_dice: bool = False) -> jax.Array:
    return (dice_weight * soft_dice_loss(logits, labels, batch_dice=batch_dice)
            + ce_weight * cross_entropy_loss(logits, labels))


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, the lowest resolution output dropped, normalised to sum to 1."""
    weights = [1.0 / (2 ** i) for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_labels(labels, shape: Sequence[int]):
    """Nearest-neighbour labels for a coarser output: every `factor`-th voxel on each axis."""
    factors = [full // small for full, small in zip(labels.shape[1:], shape)]
    index = (slice(None),) + tuple(slice(None, None, f) for f in factors)
    return labels[index]


def deep_supervision_loss(outputs, labels, loss_fn) -> jax.Array:
    """Weighted sum of `loss_fn` over the deep-supervision outputs (full resolution first)."""
    if not isinstance(outputs, (list, tuple)):
        return loss_fn(outputs, labels)
    weights = deep_supervision_weights(len(outputs))
    total = 0.0
    for weight, output in zip(weights, outputs):
        if weight == 0.0:
            continue
        total = total + weight * loss_fn(output, downsample_labels(labels, output.shape[1:-1]))
    return total
