"""Soft clDice for tubular structures (Shit et al. 2021, "clDice - a novel topology-preserving loss function for tubular
structure segmentation"), as MONAI's SoftclDiceLoss / SoftDiceclDiceLoss and the authors' code.

The soft skeleton is iterated morphology with pooling: soft erosion is the minimum over 3-voxel windows along each
axis separately (a cross-shaped element), soft dilation the maximum over a 3x3(x3) box, opening = dilate(erode(x)),
and skel accumulates relu(x - open(x)) over `iterations` successive erosions. clDice = 2 Tprec Tsens / (Tprec + Tsens)
with Tprec = |S(P) . G| / |S(P)| (the predicted skeleton inside the label) and Tsens = |S(G) . P| / |S(G)|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from medseg_jax.losses._common import softmax_and_onehot
from medseg_jax.losses.dice import soft_dice_loss


def _pool(x, window: tuple[int, ...], computation, init):
    """Stride-1 'same' pooling of a channels-last (N, *spatial, C) array over a spatial window; the padding takes the
    reduction's identity, so the image border neither erodes nor dilates anything."""
    dims = (1, *window, 1)
    padding = ((0, 0), *(((w - 1) // 2, (w - 1) // 2) for w in window), (0, 0))
    return lax.reduce_window(x, jnp.asarray(init, x.dtype), computation, dims, (1,) * x.ndim, padding)


def soft_erode(x) -> jax.Array:
    """Minimum over the 3-voxel line along each spatial axis (the 4/6-neighbourhood cross), per channel."""
    spatial = x.ndim - 2
    out = None
    for axis in range(spatial):
        window = tuple(3 if i == axis else 1 for i in range(spatial))
        eroded = _pool(x, window, lax.min, jnp.inf)
        out = eroded if out is None else jnp.minimum(out, eroded)
    return out


def soft_dilate(x) -> jax.Array:
    """Maximum over the 3x3(x3) box, per channel."""
    return _pool(x, (3,) * (x.ndim - 2), lax.max, -jnp.inf)


def soft_open(x) -> jax.Array:
    return soft_dilate(soft_erode(x))


def soft_skeleton(x, iterations: int = 3) -> jax.Array:
    """Soft skeleton of channels-last probabilities or masks in [0, 1] (Shit et al., Algorithm 1)."""
    skeleton = jax.nn.relu(x - soft_open(x))
    for _ in range(iterations):
        x = soft_erode(x)
        delta = jax.nn.relu(x - soft_open(x))
        skeleton = skeleton + jax.nn.relu(delta - skeleton * delta)
    return skeleton


def soft_cldice_loss(logits, labels, *, iterations: int = 3, smooth_nr: float = 1.0, smooth_dr: float = 1.0,
                     smooth: float = 1e-4, include_background: bool = False,
                     ignore_label: int | None = None) -> jax.Array:
    """1 - soft clDice, per sample over all (foreground) channels and voxels, averaged over the batch (MONAI's
    SoftclDiceLoss). `smooth_nr`/`smooth_dr` smooth Tprec and Tsens, `smooth` the harmonic mean. Ignored voxels count
    as background of both prediction and label (the skeleton is a neighbourhood operation, so this is an approximation
    next to ignored regions, but their logits never reach the loss)."""
    probs, onehot = softmax_and_onehot(logits, labels, ignore_label)
    if not include_background:
        probs, onehot = probs[..., 1:], onehot[..., 1:]
    skel_pred = soft_skeleton(probs, iterations)
    skel_true = lax.stop_gradient(soft_skeleton(onehot, iterations))
    axes = tuple(range(1, probs.ndim))
    tprec = (jnp.sum(skel_pred * onehot, axis=axes) + smooth_nr) / (jnp.sum(skel_pred, axis=axes) + smooth_dr)
    tsens = (jnp.sum(skel_true * probs, axis=axes) + smooth_nr) / (jnp.sum(skel_true, axis=axes) + smooth_dr)
    return jnp.mean(1.0 - 2.0 * (tprec * tsens) / (tprec + tsens + smooth))


def dice_cldice_loss(logits, labels, *, alpha: float = 0.5, iterations: int = 3, cldice_smooth: float = 1.0,
                     batch_dice: bool = False, include_background: bool = False, smooth_nr: float = 1e-5,
                     smooth_dr: float = 1e-5, squared_pred: bool = False,
                     ignore_label: int | None = None) -> jax.Array:
    """(1 - alpha) * soft Dice + alpha * soft clDice, the combination of Shit et al. (alpha = 0.5) and MONAI's
    SoftDiceclDiceLoss (which uses one smoothing for both terms: pass smooth_nr = smooth_dr = cldice_smooth)."""
    dice = soft_dice_loss(logits, labels, batch_dice=batch_dice, include_background=include_background,
                          smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred,
                          ignore_label=ignore_label)
    cldice = soft_cldice_loss(logits, labels, iterations=iterations, smooth_nr=cldice_smooth,
                              smooth_dr=cldice_smooth, include_background=include_background,
                              ignore_label=ignore_label)
    return (1.0 - alpha) * dice + alpha * cldice
