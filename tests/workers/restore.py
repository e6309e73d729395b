"""Run in a subprocess with N fake CPU devices: restores a run's latest checkpoint onto a mesh of this process's
devices (`python restore.py RUN data=..,space=..[,params=sharded]`), checks every array against the values as saved,
and prints JSON."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from medseg_jax import runs
from medseg_jax.models.registry import build_network
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train import step as step_lib


def main(run_dir: str, mesh_text: str) -> None:
    mesh_lib.MIN_SHARDED_PARAM = 64  # tiny test net: split its kernels too under params=sharded
    run = runs.RunDir(run_dir)
    config, plans = run.load_config(), run.load_plans()
    section = dict(config.mesh)
    for item in mesh_text.split(","):
        key, value = item.split("=")
        section[key] = value if key == "params" else int(value)
    patch = tuple(config.train.patch_size)
    layout = mesh_lib.make_mesh_layout(section, spatial_dims=len(patch))
    model = build_network(config, len(plans["labels"]), len(plans["normalization"]))
    tx = step_lib.make_optimizer(config.train)
    template = step_lib.create_train_state(model, tx, (1, *patch, len(plans["normalization"])), jax.random.key(1),
                                           layout)
    latest, _ = run.checkpoint_managers()
    step = latest.latest_step()
    restored = runs.restore_into(latest, step, template.to_dict())
    saved = runs.restore_raw(latest, step)
    leaves = jax.tree.leaves(restored)
    saved_leaves = jax.tree.leaves(saved)
    equal = len(leaves) == len(saved_leaves) and all(
        np.array_equal(mesh_lib.to_host(a), np.asarray(b)) for a, b in zip(leaves, saved_leaves))
    shardings_match = all(a.sharding == t.sharding for a, t in zip(leaves, jax.tree.leaves(template.to_dict())))
    print("RESULT " + json.dumps({
        "devices": len(jax.devices()), "mesh": layout.describe(), "step": int(step), "arrays": len(leaves),
        "equal_to_saved": bool(equal), "shardings_match_template": bool(shardings_match),
        "split_arrays": sum(not a.sharding.is_fully_replicated for a in leaves)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
