"""Sweep files: named trials as changes to one base experiment (`medseg sweep`, medseg_jax/sweep/).

A sweep file (experiments/sweeps/NAME.py) defines `get_sweep()` returning a `Sweep`:

    def get_sweep():
        return Sweep(base="demo_ct", trials=product(
            {"dice_ce": {"loss.name": "dice_ce"}, "focal": {"loss.name": "focal"}},
            {"intensity": {"augment": augment_config("intensity")}, "ct": {"augment": augment_config("ct_robust")}},
        ), baseline="dice_ce-intensity")

A trial's changes map dotted config keys to values; a value may be a whole group (a ConfigDict or dict, e.g. an
augmentation preset or a model). `product` crosses axes (names joined by "-"), `zip_trials` pairs them.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from medseg_jax import config as config_lib
from medseg_jax.errors import MedsegError

Changes = Mapping[str, Any]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


@dataclasses.dataclass
class Sweep:
    """base: an experiment in medseg_jax/experiments (name, e.g. "demo_ct") or a path to an experiment file.
    trials: {name: changes}. baseline: the trial the others are compared with (default: the first). folds: the
    folds to run by default. changes: applied to every trial first. slurm: submitit parameters for `--executor slurm`
    (partition, gpus_per_node, timeout_min, account, ...), overridable by flags."""

    base: str
    trials: dict[str, dict[str, Any]]
    baseline: str = ""
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.trials:
            raise MedsegError("the sweep has no trials")
        for name in self.trials:
            if not _NAME.match(name):
                raise MedsegError(f"trial name {name!r}: use letters, digits and _ . + = - (it names a folder)")
        if not self.baseline:
            self.baseline = next(iter(self.trials))
        if self.baseline not in self.trials:
            raise MedsegError(f"baseline {self.baseline!r} is not one of the trials ({', '.join(self.trials)})")


def product(*axes: Mapping[str, Changes]) -> dict[str, dict[str, Any]]:
    """Every combination of one entry per axis: {"a": {...}, "b": {...}} x {"x": {...}} -> {"a-x": ..., "b-x": ...}."""
    return dict(_joined(combination) for combination in itertools.product(*[list(axis.items()) for axis in axes]))


def zip_trials(*axes: Mapping[str, Changes]) -> dict[str, dict[str, Any]]:
    """The i-th entries of every axis together (axes of equal length)."""
    lengths = {len(axis) for axis in axes}
    if len(lengths) > 1:
        raise MedsegError(f"zip_trials: axes of different lengths {sorted(lengths)}")
    return dict(_joined(combination) for combination in zip(*[list(axis.items()) for axis in axes]))


def _joined(combination) -> tuple[str, dict[str, Any]]:
    """((label, changes), ...) -> ("label-label", the changes merged, later axes winning)."""
    merged: dict[str, Any] = {}
    for _, changes in combination:
        merged.update(changes)
    return "-".join(label for label, _ in combination), merged


def apply_changes(config: ml_collections.ConfigDict, changes: Changes, where: str) -> ml_collections.ConfigDict:
    """A copy of `config` with `changes` ({dotted key: value}) set; an unknown key is an error naming `where`."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in changes.items():
        try:
            node, name = config_lib.locate(config, key)
        except MedsegError as exc:
            raise MedsegError(f"{where}: {exc}") from None
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        with node.ignore_type():
            node[name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return config
