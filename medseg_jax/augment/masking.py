"""Block masks for masked image modelling (`medseg pretrain`): which voxels of a patch the network must reconstruct.

The patch is tiled by blocks of `block` voxels; exactly round(ratio x blocks) of them, drawn without replacement from
the key, are masked (1) and the rest visible (0). A fixed count per sample (rather than a coin per block) keeps every
sample's loss over the same number of voxels, as MAE does. The masked blocks' voxels are set to zero in the input
(the normalised images' mean), and the loss counts only them (losses/reconstruction.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medseg_jax.errors import MedsegError


def check_block(patch_size: Sequence[int], block: Sequence[int], key: str = "pretrain.mask_block") -> tuple[int, ...]:
    """The mask block for `patch_size` (a 2D patch takes the first two of three sizes); refuses one that does not
    tile the patch."""
    block = tuple(int(b) for b in block)[: len(patch_size)]
    if len(block) != len(patch_size):
        raise MedsegError(f"config key '{key}': {block} needs {len(patch_size)} sizes, one per patch axis")
    for axis, (p, b) in enumerate(zip(patch_size, block)):
        if b < 1 or int(p) % b:
            raise MedsegError(f"config key '{key}': block size {b} does not divide the patch's axis {axis} ({p})")
    return block


def num_masked_blocks(patch_size: Sequence[int], block: Sequence[int], ratio: float) -> int:
    blocks = 1
    for p, b in zip(patch_size, block):
        blocks *= p // int(b)
    return min(blocks, max(1, round(ratio * blocks)))


def block_mask(key: jax.Array, patch_size: Sequence[int], block: Sequence[int], ratio: float) -> jax.Array:
    """A float32 mask of `patch_size`: 1 on exactly `num_masked_blocks(...)` blocks of `block` voxels, 0 elsewhere."""
    grid = tuple(int(p) // int(b) for p, b in zip(patch_size, block))
    count = 1
    for g in grid:
        count *= g
    chosen = jax.random.permutation(key, count) < num_masked_blocks(patch_size, block, ratio)
    mask = chosen.reshape(grid).astype(jnp.float32)
    for axis, b in enumerate(block):
        mask = jnp.repeat(mask, int(b), axis=axis)
    return mask


def mask_batch(key: jax.Array, image: jax.Array, block: Sequence[int], ratio: float) -> tuple[jax.Array, jax.Array]:
    """(masked image, mask (N, *spatial, 1)) for a channels-last batch: one mask per sample (all channels alike)."""
    keys = jax.random.split(key, image.shape[0])
    masks = jax.vmap(lambda k: block_mask(k, image.shape[1:-1], block, ratio))(keys)[..., None]
    return image * (1.0 - masks), masks
