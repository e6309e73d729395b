"""Mirror test-time augmentation (nnU-Net's): the network sees every combination of flips of `mirror_axes`, each
output is flipped back, and the logits are averaged.

The flipped copies are concatenated to the window batch, so one call of the compiled forward pass runs them all
(sharded over the mesh like the windows themselves) instead of 2^len(axes) calls from the host.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax.numpy as jnp


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `mirror_axes` (the empty one, i.e. the original, first), as nnU-Net enumerates them."""
    axes = sorted(set(int(a) for a in mirror_axes))
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def mirrored(apply: Callable, mirror_axes: Sequence[int]) -> Callable:
    """`apply(windows) -> logits` for channels-last windows (B, *spatial, C) -> the mean of `apply` over all flips of
    the spatial `mirror_axes` (0-based, the batch axis not counted), each flipped back before averaging."""
    combos = mirror_combinations(mirror_axes)
    if len(combos) == 1:
        return apply

    def averaged(windows):
        batch = windows.shape[0]
        flipped = [jnp.flip(windows, [a + 1 for a in combo]) if combo else windows for combo in combos]
        logits = apply(jnp.concatenate(flipped, axis=0))
        total = None
        for index, combo in enumerate(combos):
            part = logits[index * batch:(index + 1) * batch]
            part = jnp.flip(part, [a + 1 for a in combo]) if combo else part
            total = part if total is None else total + part
        return total / len(combos)

    return averaged
