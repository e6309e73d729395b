"""The forward pass of a model over the device mesh, shared by validation during training and `medseg predict`.

`make_forward(model, layout, window_shape, params_template)` returns `forward(params, windows) -> logits` for host
(numpy) windows; it is what `sliding_window.sliding_window_inference` calls for each batch of windows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from medseg_jax.infer.tta import mirrored
from medseg_jax.parallel import mesh as mesh_lib

if TYPE_CHECKING:  # (flax is imported by the model code; an exported model predicts without it)
    import flax.linen as nn


def make_forward(model: nn.Module, layout: mesh_lib.MeshLayout, window_shape, params_template=None,
                 mirror_axes=()) -> Callable:
    """`forward(params, windows) -> logits` for host windows of `window_shape` (B, *patch, C), returning host
    (numpy) logits of the full-resolution output. The jitted function inside splits the windows over `data` and the
    spatial mesh axes, pins activations as in training and gathers the logits, so every process can call it with the
    same windows (the validation pass of a multi-process run). `params` should carry `layout.tree_shardings`.
    `mirror_axes` (spatial axes of the windows) averages the logits over every combination of their flips, all in
    the same compiled call (infer/tta.py)."""

    def forward(params, images):
        with mesh_lib.activation_layout(layout):
            gathered = {"params": mesh_lib.gather_params(params)}
            apply = lambda windows: model.apply(gathered, mesh_lib.constrain(windows), train=False)
            return mirrored(apply, mirror_axes)(images)

    window_sharding = layout.array_sharding(window_shape)
    params_sharding = layout.replicated() if params_template is None else layout.tree_shardings(params_template)
    jitted = jax.jit(forward, in_shardings=(params_sharding, window_sharding), out_shardings=layout.replicated())

    def dispatch(params, windows):  # the device array, not waited for
        return jitted(params, mesh_lib.to_global(windows, window_sharding))

    def run(params, windows):
        return mesh_lib.to_host(dispatch(params, windows))

    run.jitted, run.dispatch = jitted, dispatch
    return run
