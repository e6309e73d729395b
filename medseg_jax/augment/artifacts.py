"""Modality artifacts on one sample (X, Y, Z, C): what makes scans from another scanner, protocol or operator look
different. Pure JAX; each takes (key, image, p, ...) and is the identity when its coin flip fails.

MRI: smooth multiplicative bias field, Rician noise, Gibbs ringing (k-space truncation), k-space spikes, motion
ghosting. CT: scanner calibration shift (offset and scale), lower-dose (correlated) noise. Ultrasound: multiplicative
speckle, acoustic shadowing behind strong reflectors, depth-dependent attenuation with time-gain changes.

Images are already normalised (`data/preprocess.py`), so strengths are in normalised units: a CT offset of 0.05 is
about 0.05 * (dataset foreground std) HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

_SPATIAL = (0, 1, 2)


@dataclass(frozen=True)
class ArtifactParams:
    # MRI
    p_bias_field: float = 0.0
    bias_field_std: tuple[float, float] = (0.05, 0.3)  # std of the log field
    bias_field_grid: int = 4  # control points per axis (smoothness)
    p_rician: float = 0.0
    rician_sigma: tuple[float, float] = (0.0, 0.1)
    p_gibbs: float = 0.0
    gibbs_keep: tuple[float, float] = (0.4, 0.8)  # fraction of k-space kept per axis
    p_spike: float = 0.0
    spike_intensity: tuple[float, float] = (0.05, 0.2)  # relative to the largest k-space magnitude
    p_ghosting: float = 0.0
    ghosting_intensity: tuple[float, float] = (0.3, 0.8)
    ghosting_period: tuple[int, int] = (2, 8)
    # CT
    p_calibration: float = 0.0
    calibration_offset: tuple[float, float] = (-0.1, 0.1)
    calibration_scale: tuple[float, float] = (0.95, 1.05)
    p_low_dose: float = 0.0
    low_dose_sigma: tuple[float, float] = (0.0, 0.15)
    # Ultrasound
    depth_axis: int = 1  # canonical axis along which the beam travels
    depth_reversed: bool = True  # the probe sits at the high end of that axis (anterior in RAS: abdominal scanning)
    p_speckle: float = 0.0
    speckle_strength: tuple[float, float] = (0.1, 0.5)
    p_shadow: float = 0.0
    shadow_percentile: float = 98.0  # voxels above this percentile of the sample are reflectors
    shadow_factor: tuple[float, float] = (0.2, 0.6)
    p_attenuation: float = 0.0
    attenuation: tuple[float, float] = (0.0, 1.5)  # log-intensity loss over the full depth
    tgc_std: float = 0.2  # std of the smooth random time-gain curve (log units)


def _coin(key, p):
    return jax.random.uniform(key) < p


def _uniform(key, bounds, shape=()):
    return jax.random.uniform(key, shape, minval=bounds[0], maxval=bounds[1])


def _smooth_noise(key, shape, grid: int):
    """Zero-mean, unit-std smooth random field of `shape`: Gaussian control points, trilinearly upsampled."""
    coarse = jax.random.normal(key, tuple(max(2, grid) for _ in shape))
    field = jax.image.resize(coarse, tuple(shape), method="cubic")
    return (field - field.mean()) / (field.std() + 1e-6)


def bias_field(key, image, p, std_range, grid: int = 4):
    k_apply, k_std, k_field = jax.random.split(key, 3)
    log_field = _uniform(k_std, std_range) * _smooth_noise(k_field, image.shape[:3], grid)
    return jnp.where(_coin(k_apply, p), image * jnp.exp(log_field)[..., None], image)


def rician_noise(key, image, p, sigma_range):
    k_apply, k_sigma, k_real, k_imag = jax.random.split(key, 4)
    sigma = _uniform(k_sigma, sigma_range)
    real = image + sigma * jax.random.normal(k_real, image.shape)
    imag = sigma * jax.random.normal(k_imag, image.shape)
    return jnp.where(_coin(k_apply, p), jnp.sqrt(real ** 2 + imag ** 2), image)


def _kspace(image):
    return jnp.fft.fftshift(jnp.fft.fftn(image, axes=_SPATIAL), axes=_SPATIAL)


def _image(kspace, like):
    return jnp.real(jnp.fft.ifftn(jnp.fft.ifftshift(kspace, axes=_SPATIAL), axes=_SPATIAL)).astype(like.dtype)


def gibbs_ringing(key, image, p, keep_range):
    """Keeps the central `keep` fraction of k-space along every axis: ringing at sharp edges."""
    k_apply, k_keep = jax.random.split(key)
    keep = _uniform(k_keep, keep_range)
    mask = jnp.ones(image.shape[:3], bool)
    for axis, n in enumerate(image.shape[:3]):
        distance = jnp.abs(jnp.arange(n) - n // 2)
        shape = [1, 1, 1]
        shape[axis] = n
        mask &= (distance <= keep * n / 2).reshape(shape)
    ringing = _image(_kspace(image) * mask[..., None], image)
    return jnp.where(_coin(k_apply, p), ringing, image)


def kspace_spike(key, image, p, intensity_range):
    """One bright k-space point away from the centre: a stripe pattern over the whole image."""
    k_apply, k_pos, k_int = jax.random.split(key, 3)
    kspace = _kspace(image)
    position = tuple(jax.random.randint(k, (), 0, n) for k, n in zip(jax.random.split(k_pos, 3), image.shape[:3]))
    magnitude = _uniform(k_int, intensity_range) * jnp.abs(kspace).max()
    spiked = kspace.at[position].add(magnitude)
    return jnp.where(_coin(k_apply, p), _image(spiked, image), image)


def motion_ghosting(key, image, p, intensity_range, period_range, axis: int = 1):
    """Every `period`-th k-space plane along the phase-encoding `axis` scaled down: shifted ghost copies."""
    k_apply, k_int, k_period = jax.random.split(key, 3)
    n = image.shape[axis]
    period = jax.random.randint(k_period, (), period_range[0], period_range[1] + 1)
    planes = (jnp.arange(n) - n // 2) % period == 0
    planes = planes & (jnp.arange(n) != n // 2)  # keep the centre plane (overall intensity)
    shape = [1, 1, 1, 1]
    shape[axis] = n
    scale = jnp.where(planes, 1.0 - _uniform(k_int, intensity_range), 1.0).reshape(shape)
    return jnp.where(_coin(k_apply, p), _image(_kspace(image) * scale, image), image)


def calibration_shift(key, image, p, offset_range, scale_range):
    k_apply, k_off, k_scale = jax.random.split(key, 3)
    shifted = image * _uniform(k_scale, scale_range) + _uniform(k_off, offset_range)
    return jnp.where(_coin(k_apply, p), shifted, image)


def low_dose_noise(key, image, p, sigma_range):
    """Additive noise correlated over about a voxel (CT reconstruction kernels correlate neighbouring voxels)."""
    k_apply, k_sigma, k_noise = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, image.shape)
    smooth = (noise + sum(jnp.roll(noise, s, axis=a) for a in _SPATIAL for s in (-1, 1))) / np.sqrt(7.0)
    return jnp.where(_coin(k_apply, p), image + _uniform(k_sigma, sigma_range) * smooth, image)


def speckle(key, image, p, strength_range):
    """Multiplicative Rayleigh speckle with mean 1, mixed in with weight `strength`."""
    k_apply, k_s, k_a, k_b = jax.random.split(key, 4)
    rayleigh = jnp.sqrt(jax.random.normal(k_a, image.shape) ** 2 + jax.random.normal(k_b, image.shape) ** 2)
    rayleigh = rayleigh / np.sqrt(np.pi / 2)
    s = _uniform(k_s, strength_range)
    return jnp.where(_coin(k_apply, p), image * ((1 - s) + s * rayleigh), image)


def _along_beam(x, depth_axis: int, reversed_: bool):
    return jnp.flip(x, axis=depth_axis) if reversed_ else x


def acoustic_shadow(key, image, p, percentile, factor_range, depth_axis: int, reversed_: bool = False):
    """Beyond a strong reflector along the beam, intensity drops by `factor`. Reflectors are voxels whose local
    (3x3x3) mean is above `percentile` of the sample: structures, not single bright speckle grains."""
    k_apply, k_factor = jax.random.split(key)
    strength = image.mean(axis=-1)
    local = sum(jnp.roll(strength, (a, b, c), axis=(0, 1, 2))
                for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)) / 27.0
    reflector = _along_beam(local > jnp.percentile(local, percentile), depth_axis, reversed_)
    behind = _along_beam(jnp.cumsum(reflector, axis=depth_axis) - reflector > 0, depth_axis, reversed_)
    factor = jnp.where(behind, _uniform(k_factor, factor_range), 1.0)[..., None]
    return jnp.where(_coin(k_apply, p), image * factor, image)


def attenuation(key, image, p, attenuation_range, tgc_std: float, depth_axis: int, reversed_: bool = False):
    """exp(-alpha * depth + tgc(depth)): depth-dependent loss and a smooth random time-gain curve."""
    k_apply, k_alpha, k_tgc = jax.random.split(key, 3)
    n = image.shape[depth_axis]
    depth = jnp.linspace(0.0, 1.0, n)
    depth = depth[::-1] if reversed_ else depth
    tgc = tgc_std * jax.image.resize(jax.random.normal(k_tgc, (4,)), (n,), method="cubic")
    gain = jnp.exp(-_uniform(k_alpha, attenuation_range) * depth + tgc)
    shape = [1, 1, 1, 1]
    shape[depth_axis] = n
    return jnp.where(_coin(k_apply, p), image * gain.reshape(shape), image)


def artifact_transform(key, image, params: ArtifactParams):
    """All artifacts with probability > 0, in a fixed order (acquisition physics first, then noise)."""
    keys = jax.random.split(key, 11)
    a = params
    if a.p_attenuation > 0:
        image = attenuation(keys[0], image, a.p_attenuation, a.attenuation, a.tgc_std, a.depth_axis,
                            a.depth_reversed)
    if a.p_shadow > 0:
        image = acoustic_shadow(keys[1], image, a.p_shadow, a.shadow_percentile, a.shadow_factor, a.depth_axis,
                                a.depth_reversed)
    if a.p_bias_field > 0:
        image = bias_field(keys[2], image, a.p_bias_field, a.bias_field_std, a.bias_field_grid)
    if a.p_gibbs > 0:
        image = gibbs_ringing(keys[3], image, a.p_gibbs, a.gibbs_keep)
    if a.p_spike > 0:
        image = kspace_spike(keys[4], image, a.p_spike, a.spike_intensity)
    if a.p_ghosting > 0:
        image = motion_ghosting(keys[5], image, a.p_ghosting, a.ghosting_intensity, a.ghosting_period)
    if a.p_calibration > 0:
        image = calibration_shift(keys[6], image, a.p_calibration, a.calibration_offset, a.calibration_scale)
    if a.p_low_dose > 0:
        image = low_dose_noise(keys[7], image, a.p_low_dose, a.low_dose_sigma)
    if a.p_rician > 0:
        image = rician_noise(keys[8], image, a.p_rician, a.rician_sigma)
    if a.p_speckle > 0:
        image = speckle(keys[9], image, a.p_speckle, a.speckle_strength)
    return image
