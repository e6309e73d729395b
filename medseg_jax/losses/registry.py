"""`config.loss` -> the loss function of one output, `loss_fn(logits, labels) -> scalar`.

Every key has a default (`LOSS_DEFAULTS`) that keeps nnU-Net's Dice + CE; a config that lacks a key (an older run's
config.json) gets the default. Options by loss (`loss.name`):

    dice_ce          dice_weight * soft Dice + ce_weight * cross-entropy (nnU-Net's default, MONAI's DiceCELoss)
    dice             soft Dice (MONAI's DiceLoss)
    ce               cross-entropy
    focal            focal loss: focal_gamma, focal_alpha, class_weights
    tversky          Tversky: tversky_alpha (false positives), tversky_beta (false negatives)
    focal_tversky    focal-Tversky: the Tversky options and tversky_gamma ((1 - TI)^(1/gamma))
    generalized_dice generalised Dice: gdl_weight_type (square | simple | uniform)
    dice_cldice      (1 - cldice_alpha) * soft Dice + cldice_alpha * soft clDice: cldice_iterations, cldice_smooth
    dice_boundary    dice_weight * soft Dice + boundary_weight * boundary loss: boundary_max_distance

Soft Dice options, for every loss with a Dice/Tversky term: batch_dice, include_background, squared_pred (dice,
dice_ce, dice_cldice, dice_boundary), smooth_nr, smooth_dr. class_weights (K values, background first) weigh the CE,
the focal loss and the Dice of dice_ce / dice (as MONAI's `weight`). ignore_label (any loss): voxels with this label
count for nothing. regions (dice_ce, dice, ce): a list of label-value lists, one sigmoid output per region, BCE and/or
soft Dice per region (see `regions.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from medseg_jax.errors import MedsegError
from medseg_jax.losses.boundary import dice_boundary_loss
from medseg_jax.losses.ce import cross_entropy_loss, dice_ce_loss
from medseg_jax.losses.cldice import dice_cldice_loss
from medseg_jax.losses.dice import (
    GDL_WEIGHT_TYPES,
    focal_tversky_loss,
    generalized_dice_loss,
    soft_dice_loss,
    tversky_loss,
)
from medseg_jax.losses.focal import focal_loss
from medseg_jax.losses.regions import region_loss

LOSS_DEFAULTS: dict[str, Any] = dict(
    name="dice_ce",
    dice_weight=1.0,
    ce_weight=1.0,
    batch_dice=True,  # nnU-Net 3d_fullres: Dice summed over the batch, steadier for small structures
    include_background=False,  # nnU-Net: the background's Dice left out
    squared_pred=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    class_weights=None,
    ignore_label=None,
    regions=None,
    focal_gamma=2.0,
    focal_alpha=None,
    tversky_alpha=0.5,
    tversky_beta=0.5,
    tversky_gamma=4.0 / 3.0,
    gdl_weight_type="square",
    cldice_alpha=0.5,
    cldice_iterations=3,
    cldice_smooth=1.0,
    boundary_weight=0.01,
    boundary_max_distance=10,
)

LOSS_NAMES = ("dice_ce", "dice", "ce", "focal", "tversky", "focal_tversky", "generalized_dice", "dice_cldice",
              "dice_boundary")
REGION_LOSSES = ("dice_ce", "dice", "ce")

# Options of one loss family: a value other than the default under another loss.name is an error, not silently unused.
_FAMILY_OPTIONS = {
    "focal_": ("focal",),
    "tversky_alpha": ("tversky", "focal_tversky"),
    "tversky_beta": ("tversky", "focal_tversky"),
    "tversky_gamma": ("focal_tversky",),
    "gdl_": ("generalized_dice",),
    "cldice_": ("dice_cldice",),
    "boundary_": ("dice_boundary",),
}


def loss_config(name: str = "dice_ce", **options) -> ml_collections.ConfigDict:
    """A complete `config.loss` with every key at its default, `options` replacing some (unknown ones are an error)."""
    config = dict(LOSS_DEFAULTS, name=name)
    for key, value in options.items():
        if key not in LOSS_DEFAULTS:
            raise MedsegError(f"config key 'loss.{key}': unknown loss option (known: {', '.join(LOSS_DEFAULTS)})")
        config[key] = value
    return ml_collections.ConfigDict(config)


def _error(key: str, message: str) -> MedsegError:
    return MedsegError(f"config key 'loss.{key}': {message}")


def _number(options, key, minimum=None, maximum=None) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(key, f"expected a number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise _error(key, f"expected a number {bounds}, got {value!r}")
    return float(value)


def _integer(options, key, minimum) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise _error(key, f"expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _flag(options, key) -> bool:
    value = options[key]
    if not isinstance(value, bool):
        raise _error(key, f"expected true or false, got {value!r}")
    return value


def _numbers(options, key) -> tuple[float, ...] | None:
    value = options[key]
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in value):
        raise _error(key, f"expected a list of non-negative numbers, one per output channel, got {value!r}")
    return tuple(float(v) for v in value)


def _regions(options) -> tuple[tuple[int, ...], ...] | None:
    value = options["regions"]
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(region, (list, tuple)) and region
        and all(isinstance(v, int) and not isinstance(v, bool) for v in region) for region in value)
    if not ok:
        raise _error("regions", "expected a list of regions, each a list of label values, e.g. ((1, 2, 3), (2, 3), "
                                f"(3,)), got {value!r}")
    return tuple(tuple(int(v) for v in region) for region in value)


def _resolve(loss_cfg) -> dict[str, Any]:
    """`config.loss` as a plain dict with every key, defaults filled in; unknown keys and names are errors."""
    if isinstance(loss_cfg, ml_collections.ConfigDict):
        given = loss_cfg.to_dict()
    elif isinstance(loss_cfg, Mapping):
        given = dict(loss_cfg)
    else:
        raise MedsegError(f"config key 'loss': expected a group of loss options, got {type(loss_cfg).__name__}")
    for key in given:
        if key not in LOSS_DEFAULTS:
            raise _error(key, f"unknown loss option (known: {', '.join(LOSS_DEFAULTS)})")
    options = dict(LOSS_DEFAULTS, **given)
    if options["name"] not in LOSS_NAMES:
        raise _error("name", f"unknown loss '{options['name']}' (known: {', '.join(LOSS_NAMES)})")
    for key, value in options.items():
        for prefix, names in _FAMILY_OPTIONS.items():
            if key.startswith(prefix) and options["name"] not in names and value != LOSS_DEFAULTS[key]:
                raise _error(key, f"not used by loss.name '{options['name']}' (only by {', '.join(names)}); "
                                  "set the loss name or leave the option at its default")
    return options


def build_loss(loss_cfg) -> Callable:
    """`loss_fn(logits, labels) -> scalar` for one output, from `config.loss` (a ConfigDict or a mapping)."""
    options = _resolve(loss_cfg)
    name = options["name"]
    dice_options = dict(
        batch_dice=_flag(options, "batch_dice"),
        include_background=_flag(options, "include_background"),
        smooth_nr=_number(options, "smooth_nr", 0.0),
        smooth_dr=_number(options, "smooth_dr", 0.0),
    )
    squared_pred = _flag(options, "squared_pred")
    dice_weight = _number(options, "dice_weight", 0.0)
    ce_weight = _number(options, "ce_weight", 0.0)
    class_weights = _numbers(options, "class_weights")
    ignore_label = options["ignore_label"]
    if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
        raise _error("ignore_label", f"expected an integer label value or None, got {ignore_label!r}")
    regions = _regions(options)
    focal_alpha = options["focal_alpha"]
    if focal_alpha is not None and not isinstance(focal_alpha, (list, tuple)):
        focal_alpha = _number(options, "focal_alpha", 0.0, 1.0)
    elif focal_alpha is not None:
        focal_alpha = _numbers(options, "focal_alpha")
    gdl_weight_type = options["gdl_weight_type"]
    if gdl_weight_type not in GDL_WEIGHT_TYPES:
        raise _error("gdl_weight_type",
                     f"unknown weight type {gdl_weight_type!r} (known: {', '.join(GDL_WEIGHT_TYPES)})")
    if class_weights is not None and name not in ("dice_ce", "dice", "ce", "focal"):
        raise _error("class_weights", f"not used by loss.name '{name}' (only by dice_ce, dice, ce, focal)")

    if regions is not None:
        if name not in REGION_LOSSES:
            raise _error("regions", f"region-based training supports loss.name {', '.join(REGION_LOSSES)}, "
                                    f"not '{name}'")
        if class_weights is not None:
            raise _error("class_weights", "not used with loss.regions (one sigmoid output per region)")
        weights = {"dice_ce": (dice_weight, ce_weight), "dice": (1.0, 0.0), "ce": (0.0, 1.0)}[name]
        base = functools.partial(region_loss, regions=regions, dice_weight=weights[0], bce_weight=weights[1],
                                 batch_dice=dice_options["batch_dice"], smooth_nr=dice_options["smooth_nr"],
                                 smooth_dr=dice_options["smooth_dr"], squared_pred=squared_pred,
                                 ignore_label=ignore_label)
    elif name == "dice_ce":
        base = functools.partial(dice_ce_loss, dice_weight=dice_weight, ce_weight=ce_weight, **dice_options,
                                 squared_pred=squared_pred, class_weights=class_weights, ignore_label=ignore_label)
    elif name == "dice":
        base = functools.partial(soft_dice_loss, **dice_options, squared_pred=squared_pred,
                                 class_weights=class_weights, ignore_label=ignore_label)
    elif name == "ce":
        base = functools.partial(cross_entropy_loss, class_weights=class_weights, ignore_label=ignore_label)
    elif name == "focal":
        base = functools.partial(focal_loss, gamma=_number(options, "focal_gamma", 0.0), alpha=focal_alpha,
                                 class_weights=class_weights, ignore_label=ignore_label)
    elif name in ("tversky", "focal_tversky"):
        tversky = dict(alpha=_number(options, "tversky_alpha", 0.0), beta=_number(options, "tversky_beta", 0.0),
                       **dice_options, ignore_label=ignore_label)
        if name == "tversky":
            base = functools.partial(tversky_loss, **tversky)
        else:
            base = functools.partial(focal_tversky_loss, gamma=_number(options, "tversky_gamma", 1e-3), **tversky)
    elif name == "generalized_dice":
        base = functools.partial(generalized_dice_loss, weight_type=gdl_weight_type, **dice_options,
                                 ignore_label=ignore_label)
    elif name == "dice_cldice":
        base = functools.partial(dice_cldice_loss, alpha=_number(options, "cldice_alpha", 0.0, 1.0),
                                 iterations=_integer(options, "cldice_iterations", 0),
                                 cldice_smooth=_number(options, "cldice_smooth", 0.0), **dice_options,
                                 squared_pred=squared_pred, ignore_label=ignore_label)
    else:  # dice_boundary
        base = functools.partial(dice_boundary_loss, boundary_weight=_number(options, "boundary_weight", 0.0),
                                 dice_weight=dice_weight,
                                 max_distance=_integer(options, "boundary_max_distance", 1), **dice_options,
                                 squared_pred=squared_pred, ignore_label=ignore_label)

    def loss_fn(logits, labels):
        channels = logits.shape[-1]
        if regions is not None and channels != len(regions):
            raise _error("regions", f"{len(regions)} regions but the model outputs {channels} channels "
                                    "(region-based training needs one output channel per region)")
        for key, value in (("class_weights", class_weights), ("focal_alpha", focal_alpha)):
            if isinstance(value, tuple) and len(value) != channels:
                raise _error(key, f"{len(value)} values for a model with {channels} output channels "
                                  "(one per class, background first)")
        return base(logits, labels)

    return loss_fn
