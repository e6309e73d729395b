"""Per-device peak memory of a 3D U-Net train step split over `space` devices, from XLA's memory analysis of the
compiled step (nothing is run, so sizes far beyond this machine's memory can be measured).

    python scripts/bench_memory.py [--patches 128 256] [--spaces 1 2 4 8] [--budget-gb 16] [--out docs/...json]

Network: nnU-Net's default 3D full-resolution PlainConvUNet (6 stages, features 32..320, 3x3x3 kernels, deep
supervision, 3 classes, 1 channel), batch 1, SGD (nnU-Net), Dice + CE, float32, no augmentation inside the step. The
patch is split along its first axis over `space` devices; U-Net levels whose slabs would be thinner than the next
stride stay whole (`mesh.space_levels`, chosen automatically here). A mesh gets the machine's accelerators where there
are enough of them, else simulated CPU devices (XLA_FLAGS is set before JAX starts; as `medseg memory` does): each
row records its platform, and CPU rows are the CPU program's figures. On one GPU, run `--spaces 1` for its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from medseg_jax.augment.pipeline import augment_config  # noqa: E402
from medseg_jax.errors import MedsegError  # noqa: E402
from medseg_jax.experiments.base import get_config as base_config  # noqa: E402
from medseg_jax.models.registry import build_model, model_config  # noqa: E402
from medseg_jax.parallel import mesh as mesh_lib  # noqa: E402
from medseg_jax.train.memory import step_memory  # noqa: E402

GIB = 1024 ** 3
STAGES = 6


def mesh_label(space: int, space2: int) -> str:
    return f"space={space}" + (f" x space2={space2}" if space2 > 1 else "")


def config_for(patch: int, space: int, params: str = "replicated", space2: int = 1):
    """(config, layout, simulated) for the patch split over space x space2 devices."""
    config = base_config("plain_unet")
    config.model = model_config("plain_unet", features=tuple(min(32 * 2 ** i, 320) for i in range(STAGES)),
                                strides=((1, 1, 1),) + ((2, 2, 2),) * (STAGES - 1),
                                kernel_sizes=((3, 3, 3),) * STAGES, deep_supervision=True)
    config.augment = augment_config("none")
    config.train.batch_size, config.train.patch_size = 1, (patch,) * 3
    config.mesh = mesh_lib.mesh_config(data=1, space=space, space2=space2, space2_axis=1, params=params)
    model = build_model(config.model, num_classes=3, in_channels=1, patch_size=config.train.patch_size)
    devices, simulated = mesh_lib.devices_for_compile(space * space2)
    # the most levels that split evenly (every level when they all do)
    for levels in [-1] + list(range(STAGES - 1, 0, -1)):
        config.mesh.space_levels = levels
        layout = mesh_lib.make_mesh_layout(config.mesh, devices=devices)
        try:
            mesh_lib.check_patch(layout, config.train.patch_size, model)
            return config, layout, simulated
        except MedsegError:
            continue
    raise MedsegError(f"patch {patch} cannot be split over {space} devices")


def measure(patch: int, space: int, params: str = "replicated", space2: int = 1) -> dict:
    config, layout, simulated = config_for(patch, space, params, space2)
    started = time.time()
    report = step_memory(config, 3, 1, layout, simulated=simulated)
    return {"patch": patch, "space": space * space2, "platform": report["platform"], "mesh": mesh_label(space, space2),
            "params": params, "space_levels": layout.space_levels,
            "bytes": report["per_device_peak_bytes"], "gib": report["per_device_peak_bytes"] / GIB,
            "breakdown": report["breakdown_bytes"], "parameters": report["parameters"],
            "compile_seconds": round(time.time() - started, 1)}


def largest_patch(space: int, budget: float, step: int = 32, low: int = 64, high: int = 1024,
                  cache: dict | None = None, space2: int = 1) -> dict:
    """The largest cubic patch (a multiple of `step`) whose step fits `budget` bytes per device. Memory is not
    monotone in the patch (a size whose coarse levels cannot split keeps them whole), so sizes are scanned upwards
    until one needs more than 1.5x the budget."""
    cache = {} if cache is None else cache
    best, scanned = None, []
    for patch in range(low, high + 1, step):
        if (patch, space, space2) not in cache:
            cache[(patch, space, space2)] = measure(patch, space, space2=space2)
        row = cache[(patch, space, space2)]
        scanned.append({"patch": patch, "gib": row["gib"], "space_levels": row["space_levels"]})
        if row["bytes"] <= budget:
            best = row
        elif row["bytes"] > 1.5 * budget:
            break
    return {"mesh": mesh_label(space, space2), "space": space * space2, "patch": best and best["patch"],
            "gib": best and best["gib"], "space_levels": best and best["space_levels"], "scanned": scanned}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--spaces", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument("--no-search", action="store_true", help="skip the largest-patch search")
    parser.add_argument("--out", help="raw figures (default: docs/bench_memory_<backend>.json)")
    args = parser.parse_args(argv)

    cache: dict = {}
    rows = []
    # one split axis for each S, and S = 8 also as 4 x 2 over two axes (coarse levels split further)
    meshes = [(s, 1) for s in args.spaces] + ([(4, 2)] if 8 in args.spaces else [])
    jobs = [(p, s, t) for p in args.patches for s, t in meshes]
    for patch, space, space2 in tqdm(jobs, desc="compiling", unit="step"):
        cache[(patch, space, space2)] = measure(patch, space, space2=space2)
        rows.append(cache[(patch, space, space2)])
    fsdp = [measure(p, max(args.spaces), "sharded") for p in args.patches]
    searches = [] if args.no_search else [largest_patch(s, args.budget_gb * GIB, cache=cache, space2=t)
                                          for s, t in tqdm(meshes, desc="largest patch", unit="mesh")]
    device = jax.devices()[0]
    result = {"date": date.today().isoformat(), "backend": jax.default_backend(),
              "device": getattr(device, "device_kind", device.platform), "simulated_devices": len(jax.devices("cpu")),
              "rows": rows, "params_sharded": fsdp, "largest_patch": searches, "budget_gb": args.budget_gb}
    args.out = args.out or f"docs/bench_memory_{jax.default_backend()}.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"\n{result['date']}, {result['backend']} ({result['device']}), {DEVICES} simulated CPU devices\n")
    print("| patch | S | mesh | platform | levels split | params | per-device peak GiB | / (unsharded / S) | <= 1.25 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows + fsdp:
        base = cache.get((row["patch"], 1, 1))
        base = base if base and base["platform"] == row["platform"] else None  # ratios within one platform only
        ratio = row["bytes"] / (base["bytes"] / row["space"]) if base else float("nan")
        levels = "all" if row["space_levels"] < 0 else f"0-{row['space_levels'] - 1}"
        print(f"| {row['patch']}^3 | {row['space']} | {row['mesh']} | {row['platform']} | {levels} | {row['params']} | "
              f"{row['gib']:.2f} | {ratio:.2f} | {'yes' if ratio <= 1.25 else 'no'} |")
    if searches:
        print(f"\nlargest cubic patch (multiple of 32) within {args.budget_gb:g} GiB per device:")
        for s in searches:
            levels = "all levels split" if s["space_levels"] == -1 else f"levels 0-{s['space_levels'] - 1} split"
            print(f"  {s['mesh']}: {s['patch']}^3 ({s['gib']:.2f} GiB, {levels})")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
