"""The device mesh and the shardings the train step and inference use.

From day one the step runs over a `jax.sharding.Mesh` with a `data` axis (one device is a mesh of one), so scaling out
adds axes and shardings instead of rewriting the step.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medseg_jax.errors import MedsegError

DATA_AXIS = "data"


def make_mesh(data: int = -1) -> Mesh:
    """A 1-axis mesh over `data` devices (-1: all devices)."""
    devices = jax.devices()
    size = len(devices) if data in (-1, None) else int(data)
    if size < 1 or size > len(devices):
        raise MedsegError(f"config key 'mesh.data': {data} devices asked for, {len(devices)} available")
    return Mesh(devices[:size], (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
    size = mesh.shape[DATA_AXIS]
    if batch_size % size:
        raise MedsegError(f"config key '{key}': {batch_size} does not divide over {size} devices on the data axis")
