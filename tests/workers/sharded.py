"""Run in a subprocess with 8 fake CPU devices (tests/test_sharding.py sets XLA_FLAGS): compares the train step's loss
and gradients, one full train step, and sliding-window inference on several meshes with one device. Prints JSON."""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import augment
from medseg_jax.augment.pipeline import augment_config
from medseg_jax.config import apply_overrides
from medseg_jax.errors import MedsegError
from medseg_jax.experiments.base import get_config as base_config
from medseg_jax.infer.forward import make_forward
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.models.registry import build_model, model_config
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train import step as step_lib

PATCH = (32, 16, 16)
CLASSES = 3


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_relative(a, b) -> float:
    """Relative L2 difference over all leaves together."""
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    return relative(flat(a), flat(b))


def leaf_relative(a, b, floor: float = 1e-3) -> float:
    """The largest per-leaf relative difference among leaves carrying at least `floor` of the largest leaf norm
    (conv biases followed by instance norm have a zero gradient up to rounding: no relative error is defined)."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    biggest = max(np.linalg.norm(y) for _, y in pairs)
    return max(relative(x, y) for x, y in pairs if np.linalg.norm(y) >= floor * biggest)


def count_collectives(compiled, names=("all-reduce", "all-gather", "collective-permute", "reduce-scatter")) -> dict:
    """How often each collective appears in a compiled program (sync and async forms)."""
    hlo = compiled.as_text()
    return {name: hlo.count(name + "(") + hlo.count(name + "-start(") for name in names}


def config_for(name: str, preset: str):
    config = base_config(name)
    overrides = {"plain_unet": dict(features=(4, 8, 16), deep_supervision=True),
                 "resenc_unet": dict(features=(4, 8, 16), blocks_per_stage=(1, 1, 1), deep_supervision=True),
                 "segresnet": dict(init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1), num_groups=2)}[name]
    config.model = model_config(name, **overrides)
    config.augment = augment_config(preset)
    return apply_overrides(config, ["--config.train.batch_size=2", f"--config.train.patch_size={PATCH}",
                                    "--config.train.optimizer=sgd", "--config.train.learning_rate=0.01",
                                    "--config.train.schedule=constant", "--config.train.grad_clip=0"])


def batch_for(shapes, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shapes["image"]).astype(np.float32)
    label = np.zeros(shapes["label"], np.int32)
    label[:, 4:20, 3:12, 4:12] = 1
    label[:, 10:14, 5:9, 6:10] = 2
    label = np.where(rng.random(shapes["label"]) < 0.02, 2, label).astype(np.int32)
    return {"image": image, "label": label}


def compare_step(name: str, preset: str, mesh: dict, full_step: bool = False) -> dict:
    mesh_lib.MIN_SHARDED_PARAM = 256  # the test nets are tiny: split their larger kernels too
    config = config_for(name, preset)
    model = build_model(config.model, num_classes=CLASSES, in_channels=1, patch_size=PATCH)
    augment_fn = augment.make_pipeline(config.augment, PATCH, CLASSES) if preset != "none" else None
    input_size = augment_fn.input_size if augment_fn is not None else PATCH
    shapes = step_lib.batch_shapes(2, input_size, 1)
    host_batch = batch_for(shapes)
    tx = step_lib.make_optimizer(config.train)
    loss_fn = step_lib.make_loss_fn(config.loss)
    schedule = step_lib.make_schedule(config.train)
    key = jax.random.key(7)
    results = {}
    for which, section in (("single", dict(data=1)), ("sharded", mesh)):
        devices = jax.devices()[:1] if which == "single" else jax.devices()
        layout = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(**section), devices=devices)
        mesh_lib.check_patch(layout, PATCH, model)
        state = step_lib.create_train_state(model, tx, (1, *PATCH, 1), jax.random.key(0), layout)
        shardings = step_lib.batch_shardings(layout, shapes)
        batch = {k: mesh_lib.to_global(v, shardings[k]) for k, v in host_batch.items()}
        grad_fn = step_lib.make_grad_fn(model, loss_fn, augment_fn, layout, state.params, shapes)
        compiled = grad_fn.lower(state.params, batch, key).compile()
        loss, grads = compiled(state.params, batch, key)
        result = dict(loss=float(loss), grads=jax.tree.map(np.asarray, grads),
                      split_params=sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params)),
                      collectives=count_collectives(compiled))
        if full_step:
            step = step_lib.make_train_step(model, tx, loss_fn, augment_fn, schedule, layout, state, shapes)
            new_state, metrics = step(state, batch, key)
            result.update(step_loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                          params=jax.tree.map(np.asarray, new_state.params))
        results[which] = result
    single, sharded = results["single"], results["sharded"]
    out = {"model": name, "augment": preset, "mesh": mesh,
           "loss_single": single["loss"], "loss_sharded": sharded["loss"],
           "loss_rel": abs(single["loss"] - sharded["loss"]) / abs(single["loss"]),
           "grads_rel": tree_relative(sharded["grads"], single["grads"]),
           "grads_leaf_rel": leaf_relative(sharded["grads"], single["grads"]),
           "split_params": sharded["split_params"], "collectives": sharded["collectives"]}
    if full_step:
        out.update(step_loss_rel=abs(single["step_loss"] - sharded["step_loss"]) / abs(single["step_loss"]),
                   grad_norm_rel=abs(single["grad_norm"] - sharded["grad_norm"]) / single["grad_norm"],
                   params_rel=tree_relative(sharded["params"], single["params"]))
    return out


def compare_sliding_window(mesh: dict) -> dict:
    config = config_for("plain_unet", "none")
    model = build_model(config.model, num_classes=CLASSES, in_channels=1, patch_size=PATCH)
    volume = np.random.default_rng(3).normal(size=(45, 30, 21, 1)).astype(np.float32)
    outputs = {}
    for label_, section in (("single", dict(data=1)), ("sharded", mesh)):
        devices = jax.devices()[:1] if label_ == "single" else jax.devices()
        layout = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(**section), devices=devices)
        params = model.init(jax.random.key(0), jnp.zeros((1, *PATCH, 1)))["params"]
        params = jax.device_put(params, layout.tree_shardings(params))
        forward = make_forward(model, layout, (4, *PATCH, 1), params)
        outputs[label_] = sliding_window_inference(functools.partial(forward, params), volume, PATCH, CLASSES,
                                                   overlap=0.5, batch_size=4)
        if label_ == "sharded":  # the windows really were split: halo exchanges in the compiled forward pass
            windows = jax.ShapeDtypeStruct((4, *PATCH, 1), jnp.float32, sharding=layout.array_sharding((4, *PATCH, 1)))
            compiled = forward.jitted.lower(params, windows).compile()
            halo_exchanges = count_collectives(compiled, ("collective-permute",))["collective-permute"]
    return {"mesh": mesh, "shape": list(outputs["single"].shape), "halo_exchanges": halo_exchanges,
            "max_abs": float(np.abs(outputs["single"] - outputs["sharded"]).max()),
            "rel": relative(outputs["sharded"], outputs["single"]),
            "labels_equal": bool((outputs["single"].argmax(-1) == outputs["sharded"].argmax(-1)).all())}


def patch_errors() -> list[str]:
    config = config_for("plain_unet", "none")
    model = build_model(config.model, num_classes=CLASSES, in_channels=1, patch_size=(24, 16, 16))
    messages = []
    for section in (dict(data=1, space=8), dict(data=1, space=4), dict(data=2, space=2, space2=2, space2_axis=2)):
        layout = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(**section))
        try:
            mesh_lib.check_patch(layout, (24, 16, 16), model)
            messages.append("")
        except MedsegError as exc:
            messages.append(str(exc))
    return messages


def main(which: str) -> None:
    if which == "steps":
        out = [compare_step("plain_unet", "intensity", dict(data=2, space=4), full_step=True),
               compare_step("plain_unet", "none", dict(data=1, space=8))]
    elif which == "steps-more":
        out = [compare_step("plain_unet", "none", dict(data=2, space=2, space2=2, space2_axis=1)),
               compare_step("resenc_unet", "none", dict(data=2, space=4, params="sharded")),
               compare_step("segresnet", "none", dict(data=2, space=4, space_axis=1, space_levels=2))]
    elif which == "window":
        out = [compare_sliding_window(dict(data=2, space=4)), compare_sliding_window(dict(data=1, space=8))]
    else:
        out = patch_errors()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
