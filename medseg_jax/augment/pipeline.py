"""Augmentation pipelines built from the experiment config.

`make_pipeline(preset, patch_size)` returns `fn(key, image, label) -> (image, label)` on one sample
(`image` (X, Y, Z, C) float32, `label` (X, Y, Z) int). Each sample draws its own parameters from its key, so the same key
gives the same output, and the function runs under `jax.jit` and `jax.vmap`.

Presets so far: `none`, and `intensity` (multiplicative brightness, contrast and Gaussian noise: cheap, and
orientation-preserving, which keeps left/right context such as liver vs spleen intact).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from medseg_jax.errors import MedsegError

PRESETS = ("none", "intensity")


def _identity(key, image, label):
    return image, label


def _intensity(key, image, label):
    brightness_key, contrast_key, noise_key, sigma_key, apply_key = jax.random.split(key, 5)
    apply = jax.random.uniform(apply_key, (3,)) < jnp.array([0.15, 0.15, 0.1])  # nnU-Net's probabilities
    brightness = jnp.where(apply[0], jax.random.uniform(brightness_key, (), minval=0.75, maxval=1.25), 1.0)
    image = image * brightness
    contrast = jnp.where(apply[1], jax.random.uniform(contrast_key, (), minval=0.75, maxval=1.25), 1.0)
    mean = jnp.mean(image, axis=tuple(range(image.ndim - 1)), keepdims=True)
    minimum = jnp.min(image, axis=tuple(range(image.ndim - 1)), keepdims=True)
    maximum = jnp.max(image, axis=tuple(range(image.ndim - 1)), keepdims=True)
    image = jnp.clip((image - mean) * contrast + mean, minimum, maximum)
    sigma = jnp.where(apply[2], jax.random.uniform(sigma_key, (), minval=0.0, maxval=0.1), 0.0)
    image = image + sigma * jax.random.normal(noise_key, image.shape, image.dtype)
    return image, label


def make_pipeline(preset: str, patch_size: Sequence[int]) -> Callable:
    if preset == "none":
        return _identity
    if preset == "intensity":
        return _intensity
    raise MedsegError(f"config key 'augment.preset': unknown preset '{preset}' (known: {', '.join(PRESETS)})")
