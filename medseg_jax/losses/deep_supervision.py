"""Deep supervision as nnU-Net: one loss per decoder output, weighted 1/2^i, the lowest resolution dropped."""

from __future__ import annotations

from collections.abc import Sequence

import jax


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, the lowest resolution output dropped, normalised to sum to 1."""
    weights = [1.0 / (2 ** i) for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_labels(labels, shape: Sequence[int]):
    """Nearest-neighbour labels for a coarser output: every `factor`-th voxel on each axis (an ignore label stays an
    ignore label)."""
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
