"""The experiment planner: patch size, network topology and batch size from the dataset fingerprint and a memory budget.

Like nnU-Net's ExperimentPlanner, but memory is measured, not estimated: each candidate is compiled as the actual train
step (model, loss, optimizer and the augmentation inside the step, at the augmented input size) and XLA's
`memory_analysis()` of the compiled program is compared with the budget. Nothing is allocated: the step is lowered on
abstract shapes.

1. Initial patch: a 256^3-voxel box shaped like the target spacing's aspect (nnU-Net), clipped to the median resampled
   case shape.
2. Topology (U-Nets, nnU-Net's get_pool_and_conv_props): each stage halves the axes that are still at least
   2 x `min_feature_map` long and not much coarser than the finest axis (spacing < 2x the finest; the coarse axis of
   anisotropic data is pooled later), kernels are 1 on such coarse axes until they catch up, at most `max_stages`.
   The patch is rounded up to the total downsampling. Features double per stage from `base_features` up to 320.
3. While the compiled step needs more than the budget, shrink the axis with the largest patch / median-shape ratio (by
   its divisibility step), using the measured memory per voxel to jump, then compile again to check.
4. Batch: memory is linear in the batch, so two compiles give the fixed part (params, optimizer state) and the
   per-sample part; the batch fills the budget but covers at most 5% of the dataset's voxels, and is at least 2.

Measurement runs on the backend JAX runs on; a plan for a GPU is best made on that GPU (CPU buffers are laid out
differently, see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.models.registry import build_network
from medseg_jax.models.unet import RESENC_PRESETS
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.memory import compile_train_step, memory_stats

GB = 1024 ** 3
UNETS = ("plain_unet", "resenc_unet", "unet")
DEFAULT_BUDGET_GB = {"plain_unet": 8.0, "unet": 8.0, "unetr": 8.0, "swin_unetr": 8.0, "segresnet": 8.0}


@dataclasses.dataclass
class Topology:
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]

    @property
    def divisor(self) -> list[int]:
        return [math.prod(s[a] for s in self.strides) for a in range(len(self.patch_size))]


def initial_patch(spacing: Sequence[float], median_shape: Sequence[int], volume: int = 256 ** 3) -> list[int]:
    inverse = 1.0 / np.asarray(spacing, np.float64)
    patch = inverse * (volume / np.prod(inverse)) ** (1.0 / len(spacing))
    patch = np.round(patch).astype(int)
    if len(median_shape):
        patch = np.minimum(patch, np.asarray(median_shape, int))
    return [max(int(p), 1) for p in patch]


def topology(spacing: Sequence[float], patch: Sequence[int], min_feature_map: int = 4,
             max_stages: int = 7) -> Topology:
    """nnU-Net's get_pool_and_conv_props: per-stage strides and kernels, and the patch rounded up to fit them."""
    dims = len(patch)
    current_spacing = [float(s) for s in spacing]
    current_size = [int(p) for p in patch]
    strides = [[1] * dims]
    kernels = [[3 if s / min(current_spacing) < 2 else 1 for s in current_spacing]]
    kernel_done = [k == 3 for k in kernels[0]]
    while len(strides) < max_stages:
        finest = min(current_spacing[a] for a in range(dims) if current_size[a] >= 2 * min_feature_map) \
            if any(current_size[a] >= 2 * min_feature_map for a in range(dims)) else None
        if finest is None:
            break
        pool = [int(current_size[a] >= 2 * min_feature_map and current_spacing[a] / finest < 2) for a in range(dims)]
        if not any(pool):
            break
        stride = [2 if p else 1 for p in pool]
        current_spacing = [s * f for s, f in zip(current_spacing, stride)]
        current_size = [math.ceil(c / f) for c, f in zip(current_size, stride)]
        finest_now = min(current_spacing)
        kernel = []
        for a in range(dims):
            if not kernel_done[a] and current_spacing[a] / finest_now < 2:
                kernel_done[a] = True
            kernel.append(3 if kernel_done[a] else 1)
        strides.append(stride)
        kernels.append(kernel)
    divisor = [math.prod(s[a] for s in strides) for a in range(dims)]
    rounded = [max(d, int(math.ceil(p / d)) * d) for p, d in zip(patch, divisor)]
    return Topology(strides=strides, kernel_sizes=kernels, patch_size=rounded)


def features_per_stage(stages: int, base: int = 32, maximum: int = 320) -> list[int]:
    return [min(base * 2 ** i, maximum) for i in range(stages)]


@dataclasses.dataclass
class Measurement:
    patch_size: list[int]
    batch_size: int
    bytes: int


def compiled_step_bytes(config: ml_collections.ConfigDict, num_classes: int, in_channels: int) -> int:
    """Peak memory XLA reports for the train step of `config` (model, train.patch_size, train.batch_size, augment)
    on one device."""
    layout = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(data=1), devices=jax.devices()[:1],
                                  spatial_dims=len(config.train.patch_size))
    compiled, _ = compile_train_step(config, num_classes, in_channels, layout)
    return compiled_bytes(compiled)


def compiled_bytes(compiled) -> int:
    """Device memory a compiled program needs: its arguments, outputs and temporaries, less donated (aliased) buffers.
    XLA's own `peak_memory_in_bytes` is used when larger (on CPU it counts only part of this)."""
    return memory_stats(compiled)["peak"]


def plan_experiment(config: ml_collections.ConfigDict, plans: dict, num_cases: int, budget_gb: float | None = None,
                    *, min_batch: int = 2, max_dataset_fraction: float = 0.05, base_features: int | None = None,
                    max_features: int = 320, measure: Callable | None = None,
                    progress: Callable[[str], None] | None = None) -> tuple[ml_collections.ConfigDict, dict]:
    """Returns (config with model topology, train.patch_size and train.batch_size filled in, a report dict)."""
    measure = measure or compiled_step_bytes
    say = progress or (lambda message: None)
    config = ml_collections.ConfigDict(config.to_dict())
    name = config.model.name
    if budget_gb is None:
        budget_gb = _preset_budget(config.model) or DEFAULT_BUDGET_GB.get(name, 8.0)
    budget = float(budget_gb) * GB
    spacing = [float(s) for s in plans["target_spacing"]]
    median = [int(s) for s in plans.get("median_shape_after_resampling") or []]
    # 2D pictures (stored one slice deep), or an experiment with a 2D patch (nnU-Net's 2d configuration): plan over x
    # and y, from nnU-Net's 2D starting area of 2048^2 pixels
    planar = len(config.train.patch_size) == 2 or (len(median) == 3 and median[2] == 1)
    if planar:
        spacing, median = spacing[:2], median[:2]
    num_classes, in_channels = len(plans["labels"]), len(plans["normalization"])
    if base_features is None:  # the experiment's first-stage width (nnU-Net: 32), doubled per stage up to 320
        features = config.model.get("features")
        base_features = int(features[0]) if features else 32
    compiles: list[Measurement] = []

    def shape_for(patch):
        if name in UNETS:
            topo = topology(spacing, patch)
            features = features_per_stage(len(topo.strides), base_features, max_features)
            return topo, features
        return None, None

    def configure(patch, batch):
        topo, features = shape_for(patch)
        if topo is not None:
            config.model.features = tuple(features)
            config.model.strides = tuple(tuple(s) for s in topo.strides)
            config.model.kernel_sizes = tuple(tuple(k) for k in topo.kernel_sizes)
            patch = topo.patch_size
        else:
            patch = _round_to(patch, _fixed_divisor(config, num_classes, in_channels))
        config.train.patch_size = tuple(int(p) for p in patch)
        config.train.batch_size = int(batch)
        return list(config.train.patch_size)

    def measured(patch, batch) -> int:
        patch = configure(patch, batch)
        say(f"compiling the train step: patch {tuple(patch)}, batch {batch} ...")
        used = measure(config, num_classes, in_channels)
        compiles.append(Measurement(list(patch), batch, used))
        say(f"  {used / GB:.2f} GB")
        return used

    patch = initial_patch(spacing, median, 2048 ** 2 if planar else 256 ** 3)
    used = measured(patch, min_batch)
    # memory is linear in the batch: fixed part (params, optimizer state) + per-sample part (activations, which scale
    # with the patch's voxels); two compiles at the first patch give both
    single = measured(list(config.train.patch_size), 1)
    per_sample = max(used - single, 1) / max(min_batch - 1, 1)
    fixed = max(single - per_sample, 0)
    while used > budget:
        current = list(config.train.patch_size)
        room = (budget - fixed) / min_batch
        if room <= 0:
            raise MedsegError(f"the plan cannot fit the memory budget of {budget_gb:g} GB: the model's parameters "
                              f"and optimizer state alone need {fixed / GB:.2f} GB (raise the budget or choose a "
                              "smaller model)")
        target_voxels = math.prod(current) * room / per_sample * 0.95
        candidate = list(current)
        while math.prod(candidate) > target_voxels:
            smaller = _shrink(candidate, median, _divisor(config))
            if smaller is None:
                break
            candidate = smaller
        if candidate == current:
            raise MedsegError(f"the plan cannot fit the memory budget of {budget_gb:g} GB: even patch "
                              f"{tuple(current)} at batch {min_batch} needs {used / GB:.2f} GB (raise the budget, "
                              "use model.remat=True or model.dtype=bfloat16, or a smaller model)")
        used = measured(candidate, min_batch)
        per_sample = max(used - fixed, 1) / min_batch
    patch = list(config.train.patch_size)

    fits = int((budget - fixed) // per_sample)
    dataset_voxels = num_cases * math.prod(median) if median else math.inf
    cap = max(min_batch, int(max_dataset_fraction * dataset_voxels / math.prod(patch))) \
        if math.isfinite(dataset_voxels) else fits
    batch = max(min_batch, min(fits, cap))
    if batch != min_batch:
        used = measured(patch, batch)
        while used > budget and batch > min_batch:
            batch -= 1
            used = measured(patch, batch)
    else:
        configure(patch, batch)
    report = {
        "model": name, "budget_gb": float(budget_gb), "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "target_spacing": spacing,
        "median_shape_after_resampling": median, "patch_size": list(config.train.patch_size),
        "batch_size": int(config.train.batch_size), "measured_gb": round(used / GB, 3),
        "fixed_gb": round(fixed / GB, 3), "per_sample_gb": round(per_sample / GB, 3),
        "compiles": [dataclasses.asdict(m) for m in compiles],
    }
    if name in UNETS:
        report.update(features=list(config.model.features), strides=[list(s) for s in config.model.strides],
                      kernel_sizes=[list(k) for k in config.model.kernel_sizes])
    return config, report


def _preset_budget(model_config) -> float | None:
    if model_config.name == "resenc_unet":
        preset = model_config.get("preset", "M")
        if preset not in RESENC_PRESETS:
            raise MedsegError(f"config key 'model.preset': '{preset}' is not one of {', '.join(RESENC_PRESETS)}")
        return RESENC_PRESETS[preset]
    return None


def _divisor(config) -> list[int]:
    if config.model.name in UNETS and config.model.strides:
        dims = len(config.model.strides[0])
        return [math.prod(s[a] for s in config.model.strides) for a in range(dims)]
    return [32] * len(config.train.patch_size) if config.model.name == "swin_unetr" else \
        [16] * len(config.train.patch_size) if config.model.name == "unetr" else [8] * len(config.train.patch_size)


def _fixed_divisor(config, num_classes, in_channels) -> list[int]:
    dims = len(config.train.patch_size)
    if config.model.name == "unetr":
        return [16] * dims
    return list(build_network(config, num_classes, in_channels).total_downsampling())


def _round_to(patch, divisor) -> list[int]:
    return [max(d, int(round(p / d)) * d) for p, d in zip(patch, divisor)]


def _shrink(patch, median, divisor) -> list[int] | None:
    """nnU-Net: reduce the axis whose patch is largest relative to the median shape by one divisibility step."""
    reference = median if median else patch
    ratios = [p / max(m, 1) for p, m in zip(patch, reference)]
    for axis in sorted(range(len(patch)), key=lambda a: -ratios[a]):
        if patch[axis] - divisor[axis] >= divisor[axis]:
            smaller = list(patch)
            smaller[axis] -= divisor[axis]
            return smaller
    return None


def format_report(report: dict) -> str:
    lines = [f"plan for {report['model']} on {report['backend']} ({report['device']}), "
             f"budget {report['budget_gb']:g} GB",
             f"  target spacing     {tuple(round(v, 3) for v in report['target_spacing'])} mm",
             f"  median shape       {tuple(report['median_shape_after_resampling'])}",
             f"  patch size         {tuple(report['patch_size'])}",
             f"  batch size         {report['batch_size']}"]
    if "strides" in report:
        lines += [f"  stages             {len(report['strides'])}",
                  f"  features           {tuple(report['features'])}",
                  f"  strides            {' '.join(''.join(map(str, s)) for s in report['strides'])}",
                  f"  kernels            {' '.join(''.join(map(str, k)) for k in report['kernel_sizes'])}"]
    lines += [f"  compiled memory    {report['measured_gb']:.2f} GB (fixed {report['fixed_gb']:.2f} + "
              f"{report['per_sample_gb']:.2f} per sample), {len(report['compiles'])} compiles"]
    return "\n".join(lines)
