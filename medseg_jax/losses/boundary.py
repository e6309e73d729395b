"""Boundary loss (Kervadec et al. 2019, "Boundary loss for highly unbalanced segmentation"), computable inside the step.

The loss is mean(p_c * phi_c) over voxels and (foreground) classes, phi_c the signed distance map of class c's label:
negative inside (0 on the inner boundary voxels, -(d - 1) at Euclidean depth d), positive outside (the Euclidean
distance to the nearest voxel of the class), 0 for a class absent from (or filling) the patch. MONAI's BoundaryLoss uses
the same map, computed with an exact distance transform on the host.

Choice made here: the train step sees labels only after on-device augmentation (rotations, scaling, crops), so maps
computed on the host before augmentation would no longer match them, and scipy's distance transform does not run
inside a jitted step. `capped_signed_distance` computes the map on the device instead, as the separable squared
Euclidean distance transform (a min-plus convolution with t^2 along each axis in turn, as in Felzenszwalb &
Huttenlocher's algorithm) restricted to offsets |t| <= `max_distance`. Within that cap it is the exact Euclidean map,
the same as MONAI's; its limits:

* magnitudes are capped: the map is clip(exact, -max_distance, max_distance) (inside: depth capped at max_distance + 1),
  so beyond the cap false positives are pushed down with a constant weight instead of one growing with their
  distance (Kervadec et al. use the uncapped map);
* spacing is ignored (voxel units), as the exact map with default sampling;
* cost: 2 x 3 x 2 x max_distance shifted minima over the one-hot labels per output resolution (no gradient flows
  through them), so a large cap costs time and fused memory traffic.

Host maps (`signed_distance_maps`, scipy, uncapped, optionally with spacing) go in through
`boundary_loss(..., distance_maps=...)`, e.g. for evaluation or a pipeline without geometric augmentation.
Kervadec et al. combine the boundary term with a regional loss whose weight they move over training; here the weight
is fixed (`loss.boundary_weight`), the loss function not knowing the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medseg_jax.losses._common import as_float32, spatial_axes, valid_mask
from medseg_jax.losses.dice import soft_dice_loss

_FAR = 1e9  # squared distance of "no feature voxel in reach"


def _min_plus_pass(f, axis: int, reach: int) -> jax.Array:
    """g(x) = min over |t| <= reach of f(x + t) + t^2 along `axis` (positions outside the array are out of reach)."""
    n = f.shape[axis]
    reach = min(reach, n - 1)
    pad = [(0, 0)] * f.ndim
    pad[axis] = (reach, reach)
    padded = jnp.pad(f, pad, constant_values=_FAR)
    out = f
    for t in range(-reach, reach + 1):
        if t:
            out = jnp.minimum(out, lax.slice_in_dim(padded, reach + t, reach + t + n, axis=axis) + float(t * t))
    return out


def _capped_distance(features, reach: int) -> jax.Array:
    """Euclidean distance to the nearest voxel where `features` > 0.5 (channels-last, per channel), exact up to
    `reach` voxels and `reach` beyond."""
    squared = jnp.where(features > 0.5, 0.0, _FAR)
    for axis in range(1, features.ndim - 1):
        squared = _min_plus_pass(squared, axis, reach)
    return jnp.sqrt(jnp.minimum(squared, float(reach * reach)))


def capped_signed_distance(masks, max_distance: int = 10) -> jax.Array:
    """Signed Euclidean distance maps of channels-last {0, 1} masks (N, *spatial, C), jit-able: -(depth - 1) inside
    (depth: distance to the nearest voxel outside), the distance to the mask outside, in voxels, clipped to
    [-max_distance, max_distance]; 0 for a channel that is empty or full in its sample. Equal to
    clip(signed_distance_maps(...), -max_distance, max_distance); see the module docstring."""
    masks = lax.stop_gradient(as_float32(masks))
    outside = _capped_distance(masks, max_distance)
    depth = _capped_distance(1.0 - masks, max_distance + 1)
    signed = jnp.where(masks > 0.5, 1.0 - depth, outside)
    axes = spatial_axes(masks.ndim, batch=False)
    interface = (jnp.max(masks, axis=axes, keepdims=True) > 0.5) & (jnp.min(masks, axis=axes, keepdims=True) < 0.5)
    return jnp.where(interface, signed, 0.0)


def signed_distance_maps(labels, num_classes: int, sampling=None) -> np.ndarray:
    """Exact signed distance maps on the host (scipy), channels-last float32 (N, *spatial, K), as MONAI's
    BoundaryLoss.compute_distance_map: -(EDT inside - 1) inside class k, EDT to class k outside, 0 where class k is
    absent from or fills the sample. `sampling`: voxel spacing for the EDT (default: 1 along each axis)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    maps = np.zeros(labels.shape + (num_classes,), np.float32)
    for n in range(labels.shape[0]):
        for k in range(num_classes):
            mask = labels[n] == k
            if not mask.any() or mask.all():
                continue
            inside = ndimage.distance_transform_edt(mask, sampling=sampling)
            outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
            maps[n, ..., k] = np.where(mask, -(inside - 1.0), outside)
    return maps


def boundary_loss(logits, labels, *, distance_maps=None, max_distance: int = 10, include_background: bool = False,
                  ignore_label: int | None = None) -> jax.Array:
    """mean over voxels, classes and samples of softmax p_c * phi_c (MONAI's BoundaryLoss with `softmax=True`).

    `distance_maps`: (N, *spatial, K) precomputed maps (e.g. `signed_distance_maps`); without them the maps are
    `capped_signed_distance(one_hot(labels), max_distance)`. The minimum is negative: a perfect prediction scores
    mean(g * phi), the (negative) mean inner depth. Ignored voxels count as background for the maps and add nothing.
    """
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(as_float32(logits), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    mask = valid_mask(labels, ignore_label)
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    if distance_maps is None:
        phi = capped_signed_distance(onehot, max_distance)
    else:
        phi = lax.stop_gradient(as_float32(distance_maps))
    if not include_background:
        probs, phi = probs[..., 1:], phi[..., 1:]
    return jnp.mean(probs * phi)


def dice_boundary_loss(logits, labels, *, boundary_weight: float = 0.01, dice_weight: float = 1.0,
                       max_distance: int = 10, distance_maps=None, batch_dice: bool = False,
                       include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                       squared_pred: bool = False, ignore_label: int | None = None) -> jax.Array:
    """dice_weight * soft Dice + boundary_weight * boundary loss (Kervadec et al. pair a regional Dice with the
    boundary term; their alpha starts at 0.01)."""
    dice = soft_dice_loss(logits, labels, batch_dice=batch_dice, include_background=include_background,
                          smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred,
                          ignore_label=ignore_label)
    boundary = boundary_loss(logits, labels, distance_maps=distance_maps, max_distance=max_distance,
                             include_background=include_background, ignore_label=ignore_label)
    return dice_weight * dice + boundary_weight * boundary
