"""The masked-image-modelling loss: mean squared error over the masked voxels only (MAE; nnssl's 3D MAE for U-Nets)."""

from __future__ import annotations

import jax.numpy as jnp


def masked_mse(prediction, targets) -> jnp.ndarray:
    """`prediction` (N, *spatial, C); `targets` = (image (N, *spatial, C), mask (N, *spatial, 1), 1 where masked).
    Visible voxels count for nothing: their prediction has no effect on the value or the gradient."""
    image, mask = targets
    prediction = prediction.astype(jnp.float32)
    squared = jnp.square(prediction - image) * mask
    return squared.sum() / jnp.maximum(mask.sum() * image.shape[-1], 1.0)
