"""The device mesh, the shardings of the train step and inference, and the activation layout of a sharded volume.

The mesh has three named axes, built with `jax.make_mesh` from the config's `mesh` section:

    data    the batch: each device group along `data` holds different samples (data parallelism)
    space   one spatial axis of the volume (`mesh.space_axis`, 0 = X): each device holds a slab of every sample
    space2  optionally a second spatial axis (`mesh.space2_axis`)

    config.mesh = mesh_config(data=-1, space=4)          # -1: the devices left after space x space2

One device is a mesh of one. With `space` > 1 every activation of the U-Net family is constrained to be split along
that axis (`constrain`, called by the models at each level): XLA's SPMD partitioner then runs each convolution on the
slabs with a halo exchange of kernel//2 voxels, and the instance norms' sums become all-reduces, so per-device
activation memory falls as 1/space. `mesh.space_levels` = K keeps levels >= K (the coarse, small ones) whole on every
device; -1 splits all levels, which needs the patch to divide over `space` at every level (`check_patch`).

Params and optimizer state are replicated (`mesh.params="replicated"`) or, for large models, split over all devices
along their largest evenly dividing dimension (`"sharded"`, ZeRO-3/FSDP style: XLA gathers each layer's weights when it
is used and reduce-scatters its gradient).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medseg_jax.errors import MedsegError

DATA_AXIS, SPACE_AXIS, SPACE2_AXIS = "data", "space", "space2"
AXES = (DATA_AXIS, SPACE_AXIS, SPACE2_AXIS)
MESH_DEFAULTS = dict(data=-1, space=1, space_axis=0, space2=1, space2_axis=1, space_levels=-1, params="replicated")
PARAM_MODES = ("replicated", "sharded")
MIN_SHARDED_PARAM = 1 << 14  # smaller arrays stay replicated under params="sharded" (not worth a collective)


def mesh_config(**overrides) -> ml_collections.ConfigDict:
    """The config's `mesh` section with its defaults, then `overrides`."""
    unknown = sorted(set(overrides) - set(MESH_DEFAULTS))
    if unknown:
        raise MedsegError(f"config key 'mesh.{unknown[0]}': unknown (known: {', '.join(MESH_DEFAULTS)})")
    return ml_collections.ConfigDict({**MESH_DEFAULTS, **overrides})


@dataclass(frozen=True)
class MeshLayout:
    """A mesh plus where the volume's axes go on it."""

    mesh: Mesh
    space_axes: tuple[tuple[int, str], ...]  # (volume axis, mesh axis) for every mesh spatial axis of size > 1
    space_levels: int = -1  # levels 0..K-1 are split over the spatial mesh axes; -1: all
    params: str = "replicated"

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape[DATA_AXIS])

    @property
    def space_size(self) -> int:
        return int(self.mesh.shape[SPACE_AXIS] * self.mesh.shape[SPACE2_AXIS])

    def describe(self) -> dict:
        return {name: int(self.mesh.shape[name]) for name in AXES}

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def splits_level(self, level: int) -> bool:
        return self.space_levels < 0 or level < self.space_levels

    def spatial_spec(self, spatial_shape: Sequence[int], level: int = 0) -> list[str | None]:
        """The mesh axis of each spatial axis: split where this level is split and the size divides, else None."""
        spec: list[str | None] = [None] * len(spatial_shape)
        if not self.splits_level(level):
            return spec
        for axis, name in self.space_axes:
            if axis < len(spatial_shape) and spatial_shape[axis] % self.mesh.shape[name] == 0:
                spec[axis] = name
        return spec

    def array_sharding(self, shape: Sequence[int], level: int = 0, channels: bool = True) -> NamedSharding:
        """Sharding of a (N, *spatial, C) array (`channels=False`: (N, *spatial)): batch over `data`, spatial axes
        over the spatial mesh axes."""
        spatial = tuple(shape[1:-1] if channels else shape[1:])
        batch = DATA_AXIS if shape[0] % self.data_size == 0 else None
        return NamedSharding(self.mesh, P(batch, *self.spatial_spec(spatial, level), *([None] if channels else [])))

    def param_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """Replicated, or (params="sharded") split over every device along the largest evenly dividing dimension."""
        devices = self.mesh.size
        if self.params != "sharded" or devices == 1 or math.prod(shape) < MIN_SHARDED_PARAM:
            return self.replicated()
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % devices == 0:
                spec = [None] * len(shape)
                spec[dim] = AXES
                return NamedSharding(self.mesh, P(*spec))
        return self.replicated()

    def tree_shardings(self, tree: Any):
        """Shardings for a tree of arrays (params, optimizer state): by shape, so Adam's moments follow their param."""
        return jax.tree.map(lambda leaf: self.param_sharding(tuple(np.shape(leaf))), tree)


def make_mesh_layout(section: ml_collections.ConfigDict | dict | None = None, devices: Sequence | None = None,
                spatial_dims: int = 3) -> MeshLayout:
    """The MeshLayout of the config's `mesh` section (missing keys: defaults) over `devices` (default: all, every
    process's). Bad values are one-line errors naming the key."""
    values = dict(MESH_DEFAULTS)
    if section is not None:
        given = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
        unknown = sorted(set(given) - set(MESH_DEFAULTS))
        if unknown:
            raise MedsegError(f"config key 'mesh.{unknown[0]}': unknown (known: {', '.join(MESH_DEFAULTS)})")
        values.update(given)
    devices = list(jax.devices() if devices is None else devices)
    for key in ("space", "space2"):
        if int(values[key]) < 1:
            raise MedsegError(f"config key 'mesh.{key}': {values[key]} must be >= 1")
    space, space2 = int(values["space"]), int(values["space2"])
    data = values["data"]
    if data in (-1, None):
        data = len(devices) // (space * space2)
    data = int(data)
    if data < 1 or data * space * space2 > len(devices):
        raise MedsegError(f"config key 'mesh': data={values['data']} x space={space} x space2={space2} needs "
                          f"{max(data, 1) * space * space2} devices, {len(devices)} available")
    axes = []
    for key, size, name in (("space_axis", space, SPACE_AXIS), ("space2_axis", space2, SPACE2_AXIS)):
        axis = int(values[key])
        if not 0 <= axis < spatial_dims:
            raise MedsegError(f"config key 'mesh.{key}': {axis} is not a spatial axis (0..{spatial_dims - 1})")
        if size > 1:
            axes.append((axis, name))
    if len(axes) == 2 and axes[0][0] == axes[1][0]:
        raise MedsegError(f"config key 'mesh.space2_axis': {axes[1][0]} is already split by mesh.space; choose "
                          "another axis")
    if values["params"] not in PARAM_MODES:
        raise MedsegError(f"config key 'mesh.params': '{values['params']}' (known: {', '.join(PARAM_MODES)})")
    mesh = jax.make_mesh((data, space, space2), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices[:data * space * space2])
    return MeshLayout(mesh, tuple(axes), int(values["space_levels"]), str(values["params"]))


def devices_for_compile(count: int) -> tuple[list, bool]:
    """`count` devices to compile a mesh for, and whether they are simulated: the accelerators where the machine has
    that many, else CPU devices (which `--xla_force_host_platform_device_count` must have provided before JAX
    started), whose compiled program is the CPU's."""
    devices = jax.devices()
    if len(devices) < count:
        devices = jax.devices("cpu")
    devices = devices[:count]
    return devices, devices[0].platform == "cpu" and count > 1


def check_batch_divisible(batch_size: int, layout: MeshLayout, key: str = "train.batch_size") -> None:
    if batch_size % layout.data_size:
        raise MedsegError(f"config key '{key}': {batch_size} does not divide over {layout.data_size} devices on the "
                          "mesh's data axis")


def level_sizes(patch_size: Sequence[int], stage_strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The spatial size at each U-Net level (the output of each encoder stage)."""
    sizes, current = [], list(patch_size)
    for stride in stage_strides:
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(tuple(current))
    return sizes


def check_patch(layout: MeshLayout, patch_size: Sequence[int], model, key: str = "train.patch_size") -> None:
    """Every level that is split over a spatial mesh axis must divide evenly over it: a one-line error names the
    level, the axis and the size. Models without levels (transformers) are checked at full resolution only."""
    if not layout.space_axes:
        return
    strides = model.stage_strides() if hasattr(model, "stage_strides") else [(1,) * len(patch_size)]
    sizes = level_sizes(patch_size, strides)
    for level, size in enumerate(sizes):
        if not layout.splits_level(level):
            break
        # Each device's slab must hold whole windows of the next level's strided conv (XLA's partitioner gets the
        # weight gradient of a strided conv wrong when a slab is thinner than the stride).
        next_stride = strides[level + 1] if level + 1 < len(strides) else (1,) * len(patch_size)
        for axis, name in layout.space_axes:
            devices = int(layout.mesh.shape[name])
            unit = devices * int(next_stride[axis])
            if size[axis] % unit:
                factor = int(patch_size[axis]) // size[axis]
                options = [f"a patch divisible by {factor * unit} along axis {axis}", f"fewer {name} devices"]
                if level:
                    split = "level 0" if level == 1 else f"levels 0-{level - 1}"
                    options.append(f"--config.mesh.space_levels={level} to split only {split}")
                per_device = f"{size[axis] / devices:g} per device"
                if size[axis] % devices == 0:
                    per_device += f", not a multiple of the next level's stride {next_stride[axis]}"
                raise MedsegError(
                    f"config key '{key}': {tuple(int(p) for p in patch_size)} is {size[axis]} voxels along axis "
                    f"{axis} at U-Net level {level} (after {factor}x downsampling), {per_device} on "
                    f"mesh.{name}={devices}; use {', '.join(options[:-1])} or {options[-1]}")


# --- activation constraints, active while a step is traced ---------------------------------------------------------
_ACTIVE: contextvars.ContextVar[MeshLayout | None] = contextvars.ContextVar("medseg_activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(layout: MeshLayout | None):
    """Within this block (while a jitted function is traced) `constrain` pins activations to `layout`."""
    token = _ACTIVE.set(layout)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, level: int = 0, channels: bool = True) -> jax.Array:
    """`x` (N, *spatial, C) at U-Net `level`, pinned to the active layout's sharding; unchanged outside a sharded
    trace or on a mesh without spatial axes."""
    layout = _ACTIVE.get()
    if layout is None or (not layout.space_axes and layout.data_size == 1):
        return x
    return jax.lax.with_sharding_constraint(x, layout.array_sharding(x.shape, level, channels))


def gather_params(params):
    """Under mesh.params="sharded", the params replicated where the network uses them (XLA all-gathers them and
    reduce-scatters their gradients back to the split copies); unchanged otherwise."""
    layout = _ACTIVE.get()
    if layout is None or layout.params != "sharded":
        return params
    return jax.tree.map(lambda p: jax.lax.with_sharding_constraint(p, layout.replicated()), params)


# --- host <-> global arrays (single- and multi-process) ------------------------------------------------------------
def to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full (each process places its own shards)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """A replicated or fully addressable jax.Array as a numpy array, in any process."""
    if array.is_fully_addressable:
        return np.asarray(array)
    if array.sharding.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> list[int]:
    """The batch rows (first-axis indices) this process's devices hold under `sharding`."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    return sorted(rows)


def from_local_rows(rows: Sequence[int], local: np.ndarray, sharding: NamedSharding,
                    global_shape: Sequence[int]) -> jax.Array:
    """A global array from the rows `rows` of it that this process holds (`local[i]` is row `rows[i]`): each local
    device gets its slice, wherever the spatial axes are split."""
    position = {row: i for i, row in enumerate(rows)}

    def shard(index):
        batch = range(*index[0].indices(global_shape[0]))
        return local[[position[r] for r in batch]][(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(tuple(global_shape), sharding, shard)


def describe_devices() -> str:
    """E.g. "8x gpu (NVIDIA H200)": the devices of this run, for summaries."""
    devices = jax.devices()
    kind = devices[0].device_kind if hasattr(devices[0], "device_kind") else devices[0].platform
    return f"{len(devices)}x {devices[0].platform} ({kind})"


def describe_mesh(layout: MeshLayout) -> str:
    """E.g. "mesh data=2 x space=4, 2 processes" (axes of size 1 left out)."""
    shape = " x ".join(f"{name}={size}" for name, size in layout.describe().items() if size > 1) or "one device"
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"mesh {shape}{processes}"
