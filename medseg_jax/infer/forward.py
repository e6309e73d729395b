"""The forward pass of a model over the device mesh, shared by validation during training and `medseg predict`.

`make_forward(model, layout, window_shape, params_template)` returns `forward(params, windows) -> logits` for host
(numpy) windows; it is what `sliding_window.sliding_window_inference` calls for each batch of windows.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from medseg_jax.parallel import mesh as mesh_lib


def make_forward(model: nn.Module, layout: mesh_lib.MeshLayout, window_shape, params_template=None) -> Callable:
    """`forward(params, windows) -> logits` for host windows of `window_shape` (B, *patch, C), returning host
    (numpy) logits of the full-resolution output. The jitted function inside splits the windows over `data` and the
    spatial mesh axes, pins activations as in training and gathers the logits, so every process can call it with the
    same windows (the validation pass of a multi-process run). `params` should carry `layout.tree_shardings`."""

    def forward(params, images):
        with mesh_lib.activation_layout(layout):
            return model.apply({"params": mesh_lib.gather_params(params)}, mesh_lib.constrain(images), train=False)

    window_sharding = layout.array_sharding(window_shape)
    params_sharding = layout.replicated() if params_template is None else layout.tree_shardings(params_template)
    jitted = jax.jit(forward, in_shardings=(params_sharding, window_sharding), out_shardings=layout.replicated())

    def run(params, windows):
        return mesh_lib.to_host(jitted(params, mesh_lib.to_global(windows, window_sharding)))

    run.jitted = jitted
    return run
