"""Convolution benchmark: XLA's `lax.conv_general_dilated` against `medseg_jax.models.conv` (XLA's forward, im2col
gradients on CPU), side by side in one run, layer by layer and for the whole train step.

    .venv/bin/python scripts/bench_conv.py                  # the demo's U-Net: 48x48x32 patches, batch 2
    .venv/bin/python scripts/bench_conv.py --patch 128,128,128 --features 32,64,128,256,320 --batch 2
    .venv/bin/python scripts/bench_conv.py --tiny           # seconds; what the test suite runs

Layers: every 3x3x3 conv of a PlainConvUNet at the given patch (encoder: first conv, then a stride-2 conv per stage;
decoder: the conv after the skip concatenation), forward alone and forward + gradient (input and kernel), median of
--repeats calls after compilation. Step: the demo experiment's jitted train step (augmentation, deep supervision,
Dice+CE, AdamW) built twice, once with XLA's convolution in every ConvNormAct, once with ours, same batch.
Writes JSON (default docs/bench_conv_<platform>.json) and prints a Markdown table with the ratios XLA / ours.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_augment import machine  # noqa: E402  (scripts/ is sys.path[0] when a script runs)
from jax import lax  # noqa: E402

from medseg_jax.models import conv as conv_lib  # noqa: E402
from medseg_jax.models import layers  # noqa: E402

IMPLEMENTATIONS = {"xla": lax.conv_general_dilated, "medseg": conv_lib.conv_general_dilated}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def unet_convs(patch, features, in_channels=1):
    """(name, spatial, c_in, c_out, stride) of each distinct 3x3x3 conv of a PlainConvUNet (strides 1, 2, 2, ...)."""
    convs, spatial, previous = [], tuple(patch), in_channels
    for stage, width in enumerate(features):
        stride = 1 if stage == 0 else 2
        convs.append((f"enc{stage}.conv0", spatial, previous, width, stride))
        spatial = tuple(-(-s // stride) for s in spatial)
        convs.append((f"enc{stage}.conv1", spatial, width, width, 1))
        if stage < len(features) - 1:
            convs.append((f"dec{stage}.conv0", spatial, 2 * width, width, 1))
        previous = width
    return convs


def bench_layers(patch, features, batch, repeats):
    rng = np.random.default_rng(0)
    rows = []
    for name, spatial, c_in, c_out, stride in unet_convs(patch, features):
        x = jnp.asarray(rng.normal(size=(batch, *spatial, c_in)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(3, 3, 3, c_in, c_out)).astype(np.float32))
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NDHWC", "DHWIO", "NDHWC"))
        row = {"layer": name, "input": [batch, *spatial, c_in], "c_out": c_out, "stride": stride}
        for impl, fn in IMPLEMENTATIONS.items():
            apply = functools.partial(fn, window_strides=(stride,) * 3, padding=[(1, 1)] * 3, dimension_numbers=dn)
            forward = jax.jit(apply)
            gradient = jax.jit(jax.grad(lambda x, w, apply=apply: jnp.sum(jnp.sin(apply(x, w))), argnums=(0, 1)))
            row[f"{impl}_forward_ms"] = 1e3 * median_seconds(functools.partial(forward, x, w), repeats)
            row[f"{impl}_gradient_ms"] = 1e3 * median_seconds(functools.partial(gradient, x, w), repeats)
        rows.append(row)
        print(f"  {name} {row['input']} -> {c_out} stride {stride}: forward xla {row['xla_forward_ms']:.1f} ms, "
              f"ours {row['medseg_forward_ms']:.1f} ms; forward+gradient xla {row['xla_gradient_ms']:.1f} ms, "
              f"ours {row['medseg_gradient_ms']:.1f} ms", flush=True)
    return rows


def bench_step(patch, features, batch, repeats):
    from medseg_jax.config import load_config
    from medseg_jax.parallel import mesh as mesh_lib
    from medseg_jax.train.experiment import build_experiment

    overrides = [f"--config.train.patch_size={tuple(patch)}", f"--config.train.batch_size={batch}",
                 f"--config.model.features={tuple(features)}"]
    config = load_config(str(REPO / "experiments" / "demo_ct.py"), overrides)
    layout = mesh_lib.make_mesh_layout(config.get("mesh"), spatial_dims=3)
    result = {}
    for impl, fn in IMPLEMENTATIONS.items():
        layers.conv_general_dilated = fn  # ConvNormAct looks the name up when the step is traced
        try:
            experiment = build_experiment(config, 5, 1, layout)
            state = experiment.init_state(jax.random.key(0))
            shapes = experiment.batch_shapes
            rng = np.random.default_rng(0)
            batch_arrays = {"image": jnp.asarray(rng.normal(size=shapes["image"]).astype(np.float32)),
                            "label": jnp.asarray(rng.integers(0, 5, size=shapes["label"]).astype(np.int32))}
            start = time.perf_counter()
            state, metrics = experiment.train_step(state, batch_arrays, jax.random.key(1))
            jax.block_until_ready(metrics)
            result[f"{impl}_compile_and_first_step_s"] = time.perf_counter() - start
            holder = {"state": state}

            def one_step(holder=holder, experiment=experiment, batch_arrays=batch_arrays):
                holder["state"], metrics = experiment.train_step(holder["state"], batch_arrays, jax.random.key(2))
                return metrics

            result[f"{impl}_step_s"] = median_seconds(one_step, repeats)
        finally:
            layers.conv_general_dilated = conv_lib.conv_general_dilated
        print(f"  train step with {impl} conv: {result[f'{impl}_step_s']:.3f} s "
              f"(compile + first step {result[f'{impl}_compile_and_first_step_s']:.1f} s)", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=ints, default=(48, 48, 32))
    parser.add_argument("--features", type=ints, default=(8, 16, 32, 64))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="16^3 patches, 2 repeats (seconds; for the test suite)")
    parser.add_argument("--out", help="JSON file (default docs/bench_conv_<platform>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.patch, args.features, args.batch, args.repeats = (16, 16, 16), (4, 8), 1, 2
    platform_name = jax.devices()[0].platform
    out = Path(args.out or REPO / "docs" / f"bench_conv_{platform_name}.json")
    print(f"bench_conv: patch {args.patch}, batch {args.batch}, features {args.features}, {machine()}", flush=True)
    print("layers:", flush=True)
    rows = bench_layers(args.patch, args.features, args.batch, args.repeats)
    print("whole train step:", flush=True)
    step = bench_step(args.patch, args.features, args.batch, args.repeats)
    report = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "patch": list(args.patch), "batch": args.batch,
              "features": list(args.features), "layers": rows, "step": step}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)

    print("\n| layer | input | stride | forward xla / ours (ms) | forward+gradient xla / ours (ms) | gradient ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['layer']} | {'x'.join(map(str, row['input']))} -> {row['c_out']} | {row['stride']} | "
              f"{row['xla_forward_ms']:.1f} / {row['medseg_forward_ms']:.1f} | "
              f"{row['xla_gradient_ms']:.1f} / {row['medseg_gradient_ms']:.1f} | "
              f"{row['xla_gradient_ms'] / row['medseg_gradient_ms']:.2f}x |")
    print(f"\nwhole train step: xla {step['xla_step_s']:.3f} s, ours {step['medseg_step_s']:.3f} s "
          f"(xla / ours = {step['xla_step_s'] / step['medseg_step_s']:.2f}x); compile + first step "
          f"{step['xla_compile_and_first_step_s']:.1f} s vs {step['medseg_compile_and_first_step_s']:.1f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
