"""Device memory of the train step for a mesh, measured by compiling it (nothing is allocated or run).

`compile_train_step(config, num_classes, in_channels, layout)` lowers the actual step of an experiment, as
`train/experiment.build_experiment` sets it up for training (model, loss, optimizer, the augmentation inside the step at
its input size, the mesh's shardings and activation constraints), on abstract shapes and compiles it;
`memory_stats(compiled)` reads XLA's memory analysis of the per-device program: arguments (params, optimizer state, the
batch shard), outputs, temporaries, less the donated buffers XLA reuses.
`medseg memory` prints it as JSON so meshes and patch sizes can be chosen before booking a cluster; `medseg plan` uses
the same measurement on one device.
"""

from __future__ import annotations

import math
import time

import jax
import ml_collections

from medseg_jax.errors import MedsegError
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.experiment import build_experiment


def compile_train_step(config: ml_collections.ConfigDict, num_classes: int, in_channels: int,
                       layout: mesh_lib.MeshLayout):
    """The compiled train step of `config` over `layout` and the train state's abstract template (checks: batch over
    `data`, patch over the spatial axes)."""
    experiment = build_experiment(config, num_classes, in_channels, layout)
    return experiment.compile_train_step(), experiment.state_template


def memory_stats(compiled) -> dict:
    """XLA's memory analysis of a compiled (per-device) program, in bytes; `peak` = arguments + outputs +
    temporaries - aliased (donated) buffers, or XLA's own peak figure where it reports a larger one."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise MedsegError(f"the {jax.default_backend()} backend reports no memory analysis; measure on another device")
    breakdown = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
                 "temporaries": int(stats.temp_size_in_bytes), "aliased": int(stats.alias_size_in_bytes),
                 "generated_code": int(stats.generated_code_size_in_bytes)}
    total = breakdown["arguments"] + breakdown["outputs"] + breakdown["temporaries"] - breakdown["aliased"]
    xla_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return {"peak": max(total, xla_peak), **breakdown}


def step_memory(config: ml_collections.ConfigDict, num_classes: int, in_channels: int, layout: mesh_lib.MeshLayout,
                simulated: bool = False) -> dict:
    """The `medseg memory` report for `config` on `layout`."""
    started = time.time()
    compiled, state = compile_train_step(config, num_classes, in_channels, layout)
    stats = memory_stats(compiled)
    device = layout.mesh.devices.flat[0]
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params))
    return {
        "mesh": layout.describe(),
        "per_device_peak_bytes": stats["peak"],
        "per_device_peak_gib": round(stats["peak"] / 1024 ** 3, 3),
        "breakdown_bytes": {k: v for k, v in stats.items() if k != "peak"},
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", device.platform),
        "simulated_devices": simulated,
        "model": config.model.name,
        "parameters": int(params),
        "params_sharding": layout.params,
        "space_axes": {name: axis for axis, name in layout.space_axes},
        "space_levels": layout.space_levels,
        "patch_size": [int(p) for p in config.train.patch_size],
        "batch_size": int(config.train.batch_size),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "dtype": config.model.get("dtype", "float32"),
        "remat": bool(config.model.get("remat", False)),
        "augment": config.augment.get("preset", "custom") if "augment" in config else "none",
        "compile_seconds": round(time.time() - started, 1),
    }
