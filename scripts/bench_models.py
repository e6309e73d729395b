"""Model zoo benchmark: parameters, FLOPs per sample, train-step time and compiled peak memory at one patch size, for
every registered model, plus the two formulations of the kernel = stride transposed conv side by side.

    python scripts/bench_models.py                       # CPU: patch 64^3, batch 1 (nnU-Net-sized networks)
    python scripts/bench_models.py --patch 128 --batch 2 # a GPU

FLOPs come from XLA's cost analysis of the compiled forward pass (per sample); memory from `memory_analysis()` of the
compiled train step (arguments + outputs + temporaries - donated buffers, as the planner counts it; AdamW, Dice+CE,
no augmentation, so that the model is what is measured); step time is the
median of `--steps` timed steps after one warm-up step. Results are printed as a Markdown table and written as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg_jax.experiments.base import get_config as base_config  # noqa: E402
from medseg_jax.models.layers import Upsample  # noqa: E402
from medseg_jax.models.registry import build_model, model_config  # noqa: E402
from medseg_jax.parallel import mesh as mesh_lib  # noqa: E402
from medseg_jax.train import step as step_lib  # noqa: E402
from medseg_jax.train.planner import compiled_bytes  # noqa: E402

MODELS = [  # (label, name, overrides): the libraries' default sizes
    ("plain_unet (nnU-Net default)", "plain_unet", {}),
    ("plain_unet, ConvTranspose upsampling", "plain_unet", {"upsample": "transpose"}),
    ("resenc_unet (ResEnc M/L/XL topology)", "resenc_unet", {}),
    ("unetr", "unetr", {}),
    ("swin_unetr v1", "swin_unetr", {}),
    ("swin_unetr v2", "swin_unetr", {"use_v2": True}),
    ("segresnet", "segresnet", {"init_filters": 16}),
]


def unet_topology(patch: int, stages: int = 5) -> dict:
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1)
    return {"features": tuple(min(32 * 2 ** i, 320) for i in range(stages)), "strides": tuple(map(tuple, strides)),
            "kernel_sizes": ((3, 3, 3),) * stages}


def bench_model(label, name, overrides, patch, batch, steps, num_classes=3, in_channels=1) -> dict:
    config = base_config(name)
    extra = unet_topology(patch[0]) if name in ("plain_unet", "resenc_unet") else {}
    config.model = model_config(name, **{**extra, **overrides})
    config.train.optimizer, config.train.learning_rate, config.train.schedule = "adamw", 1e-4, "constant"
    config.train.batch_size, config.train.patch_size = batch, tuple(patch)
    model = build_model(config.model, num_classes=num_classes, in_channels=in_channels, patch_size=patch)
    mesh = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(data=1))
    tx = step_lib.make_optimizer(config.train)
    state = step_lib.create_train_state(model, tx, (1, *patch, in_channels), jax.random.key(0), mesh)
    params = sum(int(np.size(v)) for v in jax.tree.leaves(state.params))

    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    sample = jax.ShapeDtypeStruct((1, *patch, in_channels), jnp.float32)
    cost = forward.lower(state.params, sample).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))

    train_step = step_lib.make_train_step(model, tx, step_lib.make_loss_fn(config.loss), None,
                                          step_lib.make_schedule(config.train), mesh, state,
                                          step_lib.batch_shapes(batch, patch, in_channels))
    rng = np.random.default_rng(0)
    batch_arrays = {"image": jnp.asarray(rng.normal(size=(batch, *patch, in_channels)), jnp.float32),
                    "label": jnp.asarray(rng.integers(0, num_classes, size=(batch, *patch)), jnp.int32)}
    key = jax.random.key(1)
    started = time.perf_counter()
    compiled = train_step.lower(state, batch_arrays, key).compile()
    compile_seconds = time.perf_counter() - started
    peak = compiled_bytes(compiled)
    state, metrics = compiled(state, batch_arrays, key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = compiled(state, batch_arrays, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return {"model": label, "name": name, "params": params, "gflops_per_sample": flops / 1e9,
            "step_seconds": statistics.median(times), "peak_memory_gb": peak / 1024 ** 3,
            "compile_seconds": compile_seconds, "loss": float(metrics["loss"])}


def bench_upsampling(size: int, channels: int, repeats: int) -> list[dict]:
    """One kernel = stride = 2 upsampling layer, forward + backward, both formulations on the same input."""
    x = jax.random.normal(jax.random.key(0), (1, size, size, size, channels))
    results = []
    for mode in ("pixel_shuffle", "transpose"):
        layer = Upsample(channels // 2, (2, 2, 2), mode=mode)
        params = layer.init(jax.random.key(1), x)

        @jax.jit
        def loss_and_grad(p, x, layer=layer):
            return jax.value_and_grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1))(p, x)

        jax.block_until_ready(loss_and_grad(params, x))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(loss_and_grad(params, x))
            times.append(time.perf_counter() - started)
        results.append({"mode": mode, "input": [1, size, size, size, channels],
                        "fwd_bwd_seconds": statistics.median(times)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated model labels' prefixes")
    parser.add_argument("--out", default="bench_models.json")
    args = parser.parse_args()
    patch = (args.patch,) * 3
    device = jax.devices()[0]
    print(f"# {datetime.date.today()} {platform.node()} {jax.default_backend()} {device.device_kind}, jax "
          f"{jax.__version__}, patch {patch}, batch {args.batch}", flush=True)
    rows = []
    for label, name, overrides in MODELS:
        if args.only and not any(label.startswith(p) for p in args.only.split(",")):
            continue
        row = bench_model(label, name, overrides, patch, args.batch, args.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    upsampling = bench_upsampling(args.patch // 2, 64, repeats=5)
    for row in upsampling:
        print(json.dumps(row), flush=True)
    print("\n| model | params (M) | GFLOPs / sample (fwd) | train step (s) | peak memory (GB) | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops_per_sample']:.1f} | {r['step_seconds']:.2f} | "
              f"{r['peak_memory_gb']:.2f} | {r['compile_seconds']:.0f} |")
    shuffle, transpose = upsampling
    print(f"\nupsampling layer {tuple(shuffle['input'])} -> 2x, forward+backward: pixel shuffle "
          f"{shuffle['fwd_bwd_seconds'] * 1e3:.1f} ms, ConvTranspose {transpose['fwd_bwd_seconds'] * 1e3:.1f} ms "
          f"(ratio {transpose['fwd_bwd_seconds'] / shuffle['fwd_bwd_seconds']:.2f}x)")
    Path(args.out).write_text(json.dumps({"date": str(datetime.date.today()), "backend": jax.default_backend(),
                                          "device": device.device_kind, "jax": jax.__version__, "patch": patch,
                                          "batch": args.batch, "models": rows, "upsampling": upsampling}, indent=2))


if __name__ == "__main__":
    main()
