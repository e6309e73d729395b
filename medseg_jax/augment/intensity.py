"""Intensity augmentation on one sample (X, Y, Z, C), after nnU-Net v2's transforms (batchgeneratorsv2).

Each transform takes (key, image, params) and applies itself with its probability; a failed coin flip is the identity.
Per-channel draws follow nnU-Net (`synchronize_channels=False` where nnU-Net has it). nnU-Net's "BGContrast" range
(a, b) around 1 draws from [a, 1) or [1, b] with equal chance, so shrinking and growing are equally likely.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

_SPATIAL = (0, 1, 2)


@dataclass(frozen=True)
class IntensityParams:
    p_noise: float = 0.1
    noise_sigma: tuple[float, float] = (0.0, 0.1)  # std of additive Gaussian noise (nnU-Net's "noise_variance")
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # voxels, drawn per axis
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    p_low_resolution_per_channel: float = 0.5
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)


def _coin(key, p, shape=()):
    return jax.random.uniform(key, shape) < p


def bg_contrast(key, low: float, high: float, shape=()):
    """nnU-Net's BGContrast: [low, 1) or [1, high] with equal chance."""
    k_side, k_value = jax.random.split(key)
    below = jax.random.uniform(k_value, shape, minval=low, maxval=min(1.0, high))
    above = jax.random.uniform(k_value, shape, minval=max(1.0, low), maxval=high)
    return jnp.where(jax.random.uniform(k_side, shape) < 0.5, below, above)


def gaussian_noise(key, image, p: float, sigma_range):
    k_apply, k_sigma, k_noise = jax.random.split(key, 3)
    sigma = jax.random.uniform(k_sigma, (), minval=sigma_range[0], maxval=sigma_range[1])
    sigma = jnp.where(_coin(k_apply, p), sigma, 0.0)
    return image + sigma * jax.random.normal(k_noise, image.shape, image.dtype)


def _blur_axis(x, sigma, axis, radius: int):
    """Convolves `x` along `axis` with a normalised Gaussian of std `sigma` (edges replicated)."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
    weights = weights / weights.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    return sum(w * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i, w in enumerate(weights))


def gaussian_blur(key, image, p: float, p_per_channel: float, sigma_range):
    k_apply, k_channels, k_sigma = jax.random.split(key, 3)
    channels = image.shape[-1]
    sigmas = jax.random.uniform(k_sigma, (channels, 3), minval=sigma_range[0], maxval=sigma_range[1])
    active = _coin(k_apply, p) & _coin(k_channels, p_per_channel, (channels,))
    radius = max(1, int(np.ceil(3 * float(sigma_range[1]))))
    out = []
    for c in range(channels):
        x = image[..., c]
        blurred = x
        for axis in _SPATIAL:
            blurred = _blur_axis(blurred, sigmas[c, axis], axis, radius)
        out.append(jnp.where(active[c], blurred, x))
    return jnp.stack(out, axis=-1)


def brightness(key, image, p: float, multiplier_range):
    k_apply, k_value = jax.random.split(key)
    factor = bg_contrast(k_value, *multiplier_range, shape=(image.shape[-1],))
    return image * jnp.where(_coin(k_apply, p), factor, 1.0)


def contrast(key, image, p: float, contrast_range):
    """Scales each channel about its mean, keeping its original value range (nnU-Net preserve_range=True)."""
    k_apply, k_value = jax.random.split(key)
    factor = jnp.where(_coin(k_apply, p), bg_contrast(k_value, *contrast_range, shape=(image.shape[-1],)), 1.0)
    mean = image.mean(axis=_SPATIAL, keepdims=True)
    low, high = image.min(axis=_SPATIAL, keepdims=True), image.max(axis=_SPATIAL, keepdims=True)
    return jnp.clip((image - mean) * factor + mean, low, high)


def _low_resolution_axis(x, zoom, axis):
    """Nearest-neighbour downsampling by `zoom` then linear upsampling back, along one axis (static shapes)."""
    n = x.shape[axis]
    positions = jnp.arange(n, dtype=jnp.float32) * zoom  # coordinate on the low-resolution grid
    low = jnp.floor(positions)
    frac = positions - low
    n_low = jnp.maximum(jnp.round(n * zoom), 1.0)
    source0 = jnp.clip(jnp.round(jnp.clip(low, 0, n_low - 1) / zoom), 0, n - 1).astype(jnp.int32)
    source1 = jnp.clip(jnp.round(jnp.clip(low + 1, 0, n_low - 1) / zoom), 0, n - 1).astype(jnp.int32)
    shape = [1] * x.ndim
    shape[axis] = n
    frac = frac.reshape(shape)
    return (1 - frac) * jnp.take(x, source0, axis=axis) + frac * jnp.take(x, source1, axis=axis)


def low_resolution(key, image, p: float, p_per_channel: float, zoom_range):
    k_apply, k_channels, k_zoom = jax.random.split(key, 3)
    channels = image.shape[-1]
    zooms = jax.random.uniform(k_zoom, (channels,), minval=zoom_range[0], maxval=zoom_range[1])
    active = _coin(k_apply, p) & _coin(k_channels, p_per_channel, (channels,))
    out = []
    for c in range(channels):
        x = image[..., c]
        low = x
        for axis in _SPATIAL:
            low = _low_resolution_axis(low, zooms[c], axis)
        out.append(jnp.where(active[c], low, x))
    return jnp.stack(out, axis=-1)


def gamma(key, image, p: float, gamma_range, invert: bool):
    """x -> range * ((x - min) / range) ** gamma + min per channel, then the channel's mean and std are restored
    (nnU-Net p_retain_stats=1); `invert` applies it to -x."""
    k_apply, k_value = jax.random.split(key)
    g = bg_contrast(k_value, *gamma_range, shape=(image.shape[-1],))
    x = -image if invert else image
    mean, std = x.mean(axis=_SPATIAL, keepdims=True), x.std(axis=_SPATIAL, keepdims=True)
    low, high = x.min(axis=_SPATIAL, keepdims=True), x.max(axis=_SPATIAL, keepdims=True)
    span = high - low + 1e-7
    y = jnp.power((x - low) / span, g) * span + low
    y = (y - y.mean(axis=_SPATIAL, keepdims=True)) / (y.std(axis=_SPATIAL, keepdims=True) + 1e-7) * std + mean
    y = -y if invert else y
    return jnp.where(_coin(k_apply, p), y, image)


def intensity_transform(key, image, params: IntensityParams):
    """nnU-Net v2's intensity transforms in its order: noise, blur, brightness, contrast, low resolution, inverted
    gamma, gamma."""
    keys = jax.random.split(key, 7)
    # A transform with probability 0 is left out of the graph (exact identity, and nothing to compute).
    if params.p_noise > 0:
        image = gaussian_noise(keys[0], image, params.p_noise, params.noise_sigma)
    if params.p_blur > 0:
        image = gaussian_blur(keys[1], image, params.p_blur, params.p_blur_per_channel, params.blur_sigma)
    if params.p_brightness > 0:
        image = brightness(keys[2], image, params.p_brightness, params.brightness)
    if params.p_contrast > 0:
        image = contrast(keys[3], image, params.p_contrast, params.contrast)
    if params.p_low_resolution > 0:
        image = low_resolution(keys[4], image, params.p_low_resolution, params.p_low_resolution_per_channel,
                               params.low_resolution_zoom)
    if params.p_gamma_inverted > 0:
        image = gamma(keys[5], image, params.p_gamma_inverted, params.gamma, invert=True)
    if params.p_gamma > 0:
        image = gamma(keys[6], image, params.p_gamma, params.gamma, invert=False)
    return image
