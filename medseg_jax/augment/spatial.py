"""Spatial augmentation: rotation, scaling, elastic deformation and mirroring composed into one resampling.

For each output voxel of the patch, the transforms map its coordinate (centred on the patch) back into the input
sample (which may be larger than the patch: the sampler reads a margin so rotated corners are not empty):

    input = centre_in + M @ (mirror * (x - centre_out)) + elastic(x),     M = R_z R_y R_x / scale

and the image is sampled there once, linearly (labels: nearest, or linearly per class then argmax). Outside the input
both are 0. All parameters come from the sample's key; a transform whose coin flip fails contributes the identity, so
at zero strength (or zero probability) the output is exactly the centre crop of the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates


@dataclass(frozen=True)
class SpatialParams:
    p_rotation: float = 0.2  # per sample (nnU-Net v2)
    rotation_degrees: float = 30.0  # uniform in [-r, r] about each axis
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)  # >1 zooms in (smaller field of view), as nnU-Net's scale
    p_elastic: float = 0.0  # nnU-Net v2 default: off
    elastic_magnitude: float = 4.0  # voxels (std of the displacement before smoothing)
    elastic_grid: int = 8  # control-point spacing of the smooth displacement field, in voxels
    p_mirror: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    label_interpolation: str = "nearest"  # nearest | linear (per class, then argmax)
    # Set by the pipeline for 2D patches, which it lifts to (X, Y, 1): rotation about z only (in the picture's
    # plane), no mirroring along z and no elastic displacement out of the plane, so every sample stays on the slice.
    planar: bool = False


def _rotation_matrix(angles: jax.Array) -> jax.Array:
    cx, cy, cz = jnp.cos(angles)
    sx, sy, sz = jnp.sin(angles)
    rx = jnp.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = jnp.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = jnp.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotated_extent(patch_size: Sequence[int], max_degrees: float, min_scale: float = 1.0,
                   planar: bool = False) -> tuple[int, ...]:
    """The input size whose centre crop covers a patch rotated by up to `max_degrees` about every axis (only z when
    `planar`; nnU-Net's "initial patch size" rule), for zooming out down to `min_scale`."""
    half = np.asarray(patch_size, np.float64) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    extent = np.abs(corners).max(axis=1)
    theta = np.deg2rad(max_degrees)
    for angles in np.array(np.meshgrid(*[[-theta, 0, theta]] * 3, indexing="ij")).reshape(3, -1).T:
        if planar and np.any(angles[:2]):
            continue
        rotated = np.asarray(_rotation_matrix(jnp.asarray(angles))) @ corners
        extent = np.maximum(extent, np.abs(rotated).max(axis=1))
    return tuple(int(np.ceil(2 * e / min(min_scale, 1.0))) for e in extent)


def sample_matrix(key: jax.Array, params: SpatialParams) -> tuple[jax.Array, jax.Array]:
    """(M, mirror signs) for one sample."""
    k_rot, k_angle, k_scale, k_factor, k_mirror = jax.random.split(key, 5)
    theta = np.deg2rad(params.rotation_degrees)
    angles = jax.random.uniform(k_angle, (3,), minval=-theta, maxval=theta)
    angles = jnp.where(jax.random.uniform(k_rot) < params.p_rotation, angles, 0.0)
    if params.planar:  # about z only: R = R_z
        angles = angles * jnp.array([0.0, 0.0, 1.0])
    scale = jax.random.uniform(k_factor, (), minval=params.scaling[0], maxval=params.scaling[1])
    scale = jnp.where(jax.random.uniform(k_scale) < params.p_scaling, scale, 1.0)
    flips = jax.random.uniform(k_mirror, (3,)) < params.p_mirror
    allowed = jnp.array([axis in params.mirror_axes and not (params.planar and axis == 2) for axis in range(3)])
    mirror = jnp.where(flips & allowed, -1.0, 1.0)
    return _rotation_matrix(angles) / scale, mirror


def elastic_field(key: jax.Array, patch_size: Sequence[int], params: SpatialParams) -> jax.Array:
    """A smooth random displacement (3, *patch_size) in voxels: Gaussian control points, trilinearly upsampled."""
    k_apply, k_field = jax.random.split(key)
    grid = tuple(max(2, int(np.ceil(p / params.elastic_grid)) + 1) for p in patch_size)
    coarse = params.elastic_magnitude * jax.random.normal(k_field, (3, *grid))
    field = jax.image.resize(coarse, (3, *patch_size), method="linear")
    if params.planar:
        field = field.at[2].set(0.0)
    return jnp.where(jax.random.uniform(k_apply) < params.p_elastic, field, 0.0)


def coordinates(key: jax.Array, in_shape: Sequence[int], patch_size: Sequence[int],
                params: SpatialParams) -> jax.Array:
    """Input coordinates (3, *patch_size) at which to sample the output patch."""
    k_matrix, k_elastic = jax.random.split(key)
    matrix, mirror = sample_matrix(k_matrix, params)
    centre_out = (jnp.asarray(patch_size, jnp.float32) - 1) / 2
    centre_in = (jnp.asarray(in_shape, jnp.float32) - 1) / 2
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(p, dtype=jnp.float32) for p in patch_size], indexing="ij"))
    offsets = (grid - centre_out[:, None, None, None]) * mirror[:, None, None, None]
    coords = jnp.einsum("ij,j...->i...", matrix, offsets) + centre_in[:, None, None, None]
    if params.p_elastic > 0:
        coords = coords + elastic_field(k_elastic, patch_size, params)
    return coords


def resample(image: jax.Array, label: jax.Array, coords: jax.Array, num_classes: int | None,
             label_interpolation: str) -> tuple[jax.Array, jax.Array]:
    """Samples image (X, Y, Z, C) linearly and label (X, Y, Z) by nearest (or per-class linear + argmax)."""
    channels = [map_coordinates(image[..., c], list(coords), order=1, mode="constant", cval=0.0)
                for c in range(image.shape[-1])]
    out_image = jnp.stack(channels, axis=-1)
    if label_interpolation == "linear" and num_classes:
        scores = jnp.stack([map_coordinates((label == k).astype(jnp.float32), list(coords), order=1,
                                            mode="constant", cval=float(k == 0)) for k in range(num_classes)])
        out_label = jnp.argmax(scores, axis=0).astype(label.dtype)
    else:
        out_label = map_coordinates(label, list(coords), order=0, mode="constant", cval=0).astype(label.dtype)
    return out_image, out_label


def spatial_transform(key, image, label, patch_size: Sequence[int], params: SpatialParams,
                      num_classes: int | None = None):
    coords = coordinates(key, image.shape[:3], patch_size, params)
    return resample(image, label, coords, num_classes, params.label_interpolation)


def center_crop(image, label, patch_size: Sequence[int]):
    """The centred `patch_size` window (what the spatial transform gives at zero strength)."""
    starts = [(s - p) // 2 for s, p in zip(image.shape[:3], patch_size)]
    window = tuple(slice(s, s + p) for s, p in zip(starts, patch_size))
    return image[window], label[window]
