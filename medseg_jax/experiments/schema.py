"""Every experiment value checked for type and range in one place, before a command writes anything.

`check(config)` raises a one-line `MedsegError` naming the first bad key (`config key 'train.steps': 0 must be at least
1`). It covers the sections every command reads (seed, data, train, infer, model.features); the loss, augmentation and
mesh sections are checked where they are built (losses/registry.py, augment/pipeline.py, parallel/mesh.py), which the
commands do before writing too. Keys a config lacks (an older run's config.json) are not checked here: the code that
reads them falls back to its default.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import ml_collections

from medseg_jax.augment.masking import check_block
from medseg_jax.data.splits import parse_fold
from medseg_jax.errors import MedsegError


def _fail(key: str, value, problem: str) -> MedsegError:
    return MedsegError(f"config key '{key}': {value!r} {problem}")


def whole(minimum: int | None = None) -> Callable:
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(key, value, "must be a whole number")
        if minimum is not None and value < minimum:
            raise _fail(key, value, f"must be at least {minimum}")
    return check


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
           below: bool = False) -> Callable:
    """A finite number in [minimum, maximum] (open at the ends marked `above` / `below`)."""

    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise _fail(key, value, "must be a finite number")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise _fail(key, value, f"must be {'greater than' if above else 'at least'} {minimum:g}")
        if maximum is not None and (value >= maximum if below else value > maximum):
            raise _fail(key, value, f"must be {'less than' if below else 'at most'} {maximum:g}")
    return check


def choice(*options: str) -> Callable:
    def check(key, value):
        if value not in options:
            raise _fail(key, value, f"is not one of {', '.join(options)}")
    return check


def sizes(lengths: tuple[int, ...], *, empty: bool = False, positive_numbers: bool = False) -> Callable:
    """A tuple of `lengths` positive whole numbers (or positive numbers), or empty where `empty`."""

    def check(key, value):
        if not isinstance(value, (tuple, list)):
            raise _fail(key, value, "must be a list of numbers, e.g. 64,64,32")
        if not value and empty:
            return
        if len(value) not in lengths:
            raise _fail(key, tuple(value), f"must have {' or '.join(map(str, lengths))} values")
        for item in value:
            if positive_numbers:
                ok = not isinstance(item, bool) and isinstance(item, numbers.Real) and math.isfinite(item) and item > 0
            else:
                ok = not isinstance(item, bool) and isinstance(item, numbers.Integral) and item > 0
            if not ok:
                kind = "positive numbers" if positive_numbers else "positive whole numbers"
                raise _fail(key, tuple(value), f"must hold {kind}")
    return check


def mirror_axes(key, value, dims: int = 3):
    """Distinct patch axes, 0 to dims - 1 (empty: no mirroring); a 2D patch ignores axis 2, so the default (0, 1, 2)
    means every axis for both."""
    if not isinstance(value, (tuple, list)):
        raise _fail(key, value, "must be a list of patch axes, e.g. 0,1,2 (empty: no mirroring)")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or not 0 <= item < dims:
            raise _fail(key, tuple(value), f"must hold patch axes from 0 to {dims - 1}")
    if len(set(value)) != len(value):
        raise _fail(key, tuple(value), "names an axis twice")


def _boolean(key, value):
    if not isinstance(value, bool):
        raise _fail(key, value, "must be true or false")


def features(key, value):
    if not isinstance(value, (tuple, list)) or not value:
        raise _fail(key, value, "must list the features of at least one stage, e.g. 32,64,128")
    sizes((len(value),))(key, value)


RULES: dict[str, Callable] = {
    "seed": whole(),
    "data.val_cases": whole(0),
    "data.fold": lambda key, value: parse_fold(value),  # its own one-line error names the key
    "data.num_folds": whole(2),
    "data.split_seed": whole(),
    "data.prepare_workers": whole(1),
    "data.store_version": whole(0),
    "data.oversample_foreground": number(0.0, 1.0),
    "data.workers": whole(0),
    "data.threads": whole(0),
    "data.prefetch_batches": whole(1),
    "data.target_spacing": sizes((2, 3), empty=True, positive_numbers=True),
    "data.anisotropy_threshold": number(1.0),
    "data.chunk_shape": sizes((2, 3)),
    "data.label_resampling": choice("nearest", "linear"),
    "train.steps": whole(1),
    "train.batch_size": whole(1),
    "train.patch_size": sizes((2, 3)),
    "train.optimizer": choice("adamw", "sgd"),
    "train.learning_rate": number(0.0, above=True),
    "train.weight_decay": number(0.0),
    "train.schedule": choice("cosine", "poly", "constant"),
    "train.warmup_steps": whole(0),
    "train.grad_clip": number(0.0),
    "train.log_every": whole(1),
    "train.val_every": whole(1),
    "train.checkpoint_every": whole(1),
    "train.nonfinite": choice("stop", "skip"),
    "train.max_nonfinite_steps": whole(0),
    "train.init_parts": choice("auto", "all", "encoder"),
    "train.freeze_encoder": _boolean,
    "train.encoder_lr_scale": number(0.0),
    "train.encoder_warmup_steps": whole(0),
    "task": choice("segment", "pretrain"),
    "pretrain.mask_ratio": number(0.0, 1.0, above=True, below=True),
    "pretrain.mask_block": sizes((2, 3)),
    "infer.overlap": number(0.0, 1.0, below=True),
    "infer.batch_size": whole(1),
    "infer.mirror_axes": lambda key, value: mirror_axes(key, value),
    "model.features": features,
}


def _lookup(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises MedsegError for the first value of `config` of the wrong type or out of range; returns `config`."""
    for key, rule in RULES.items():
        value = _lookup(config, key)
        if value is _MISSING or (key == "model.features" and value is None):
            continue
        rule(key, value)
    patch, spacing = _lookup(config, "train.patch_size"), _lookup(config, "data.target_spacing")
    if spacing is not _MISSING and spacing and len(spacing) != 3:
        # the store holds volumes whatever the patch: a 2D picture is one slice, a 2D patch one slice of a volume
        raise _fail("data.target_spacing", tuple(spacing), "must have three values (x, y, z) in mm, also for 2D "
                                                           "pictures and 2D patches (z: 1 for pictures)")
    block = _lookup(config, "pretrain.mask_block")
    if _lookup(config, "task") == "pretrain" and _MISSING not in (patch, block):
        check_block(patch, block)
    return config
