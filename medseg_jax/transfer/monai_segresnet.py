"""MONAI `SegResNet` state dicts -> flax params of `medseg_jax.models.segresnet.SegResNet`.

    module = module_from_kwargs(spatial_dims=3, in_channels=4, out_channels=3, init_filters=16)
    params = convert({k: v.numpy() for k, v in torch_state_dict.items()}, module)
    logits = module.apply({"params": params}, x_channels_last)

`module_from_kwargs` takes MONAI's constructor arguments and refuses, with a one-line `MedsegError` naming the
argument, anything the flax module cannot reproduce exactly (batch norm, pixelshuffle upsampling, unsupported
activations). `convert` walks the flax parameter template, so every parameter comes from exactly one torch key whose
shape is checked; keys the architecture lacks are reported by name. Torch axes (D, H, W) are our (X, Y, Z).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.models.segresnet import SegResNet
from medseg_jax.transfer.common import (
    StateDict,
    check_against_template,
    conv_kernel,
    monai_norm,
    set_path,
    split_args,
    upsample_kernel,
)

_MONAI_DEFAULTS: dict[str, Any] = dict(
    spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, dropout_prob=None,
    act=("RELU", {"inplace": True}), norm=("GROUP", {"num_groups": 8}), norm_name="", num_groups=8,
    use_conv_final=True, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), upsample_mode="nontrainable",
)
_EXTRA = ("dtype", "remat")  # ours, not MONAI's: passed through to the flax module
_ENCODER_PREFIXES = ("convInit", "down_layers_")


def _split_args(value, argument: str) -> tuple[str, dict]:
    return split_args(value, argument, "SegResNet")


def _activation(act) -> str:
    name, args = _split_args(act, "act")
    args.pop("inplace", None)
    if name == "relu" and not args:
        return "relu"
    if name == "leakyrelu" and set(args) <= {"negative_slope"} and float(args.get("negative_slope", 0.01)) == 0.01:
        return "leaky_relu"
    if name in ("swish", "memswish") and set(args) <= {"alpha"} and float(args.get("alpha", 1.0)) == 1.0:
        return "silu"
    raise MedsegError(f"SegResNet argument 'act': {act!r} is not supported "
                      "(supported: RELU, LEAKYRELU with negative_slope 0.01, SWISH/MEMSWISH with alpha 1)")


def _norm(norm, norm_name: str, num_groups: int) -> dict:
    """The flax module's norm fields for MONAI's `norm` / deprecated `norm_name` + `num_groups`."""
    if norm_name:
        if str(norm_name).lower() != "group":
            raise MedsegError(f"SegResNet argument 'norm_name': '{norm_name}' is deprecated in MONAI and only "
                              "'group' is accepted; use 'norm' instead")
        norm = ("group", {"num_groups": num_groups})
    if norm == "":
        return dict(norm="none")
    spec = monai_norm(norm, "norm", "SegResNet")
    fields = dict(norm=spec["kind"], norm_affine=spec["affine"], norm_epsilon=spec["eps"])
    return dict(fields, num_groups=spec["groups"]) if spec["kind"] == "group" else fields


def module_from_kwargs(**monai_kwargs) -> SegResNet:
    """The flax `SegResNet` equal to `monai.networks.nets.SegResNet(**monai_kwargs)` (MONAI's defaults for the rest).

    Also accepts our `dtype` and `remat`, passed through to the module.
    """
    unknown = sorted(set(monai_kwargs) - set(_MONAI_DEFAULTS) - set(_EXTRA))
    if unknown:
        raise MedsegError(f"SegResNet argument '{unknown[0]}' is not a MONAI SegResNet argument")
    kw = {**_MONAI_DEFAULTS, **monai_kwargs}

    spatial_dims = int(kw["spatial_dims"])
    if spatial_dims not in (2, 3):
        raise MedsegError(f"SegResNet argument 'spatial_dims': {spatial_dims} is not supported (2 or 3)")
    mode = str(getattr(kw["upsample_mode"], "value", kw["upsample_mode"])).lower()
    if mode not in ("nontrainable", "deconv"):
        raise MedsegError(f"SegResNet argument 'upsample_mode': '{mode}' is not supported "
                          "(supported: nontrainable, deconv)")
    blocks_down = tuple(int(b) for b in kw["blocks_down"])
    blocks_up = tuple(int(b) for b in kw["blocks_up"])
    if not blocks_down or len(blocks_up) != len(blocks_down) - 1:
        raise MedsegError(f"SegResNet argument 'blocks_up': needs len(blocks_down) - 1 = {len(blocks_down) - 1} "
                          f"entries, got {blocks_up}")
    dropout = kw["dropout_prob"]
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise MedsegError(f"SegResNet argument 'dropout_prob': {dropout} is not in [0, 1)")
    norm = _norm(kw["norm"], kw["norm_name"], int(kw["num_groups"]))
    init_filters = int(kw["init_filters"])
    if norm["norm"] == "group" and init_filters % norm["num_groups"]:
        raise MedsegError(f"SegResNet argument 'init_filters': {init_filters} is not divisible by the "
                          f"{norm['num_groups']} norm groups")
    return SegResNet(
        num_classes=int(kw["out_channels"]), in_channels=int(kw["in_channels"]), init_filters=init_filters,
        blocks_down=blocks_down, blocks_up=blocks_up, upsample_mode=mode, use_conv_final=bool(kw["use_conv_final"]),
        dropout_prob=None if dropout is None else float(dropout), activation=_activation(kw["act"]),
        spatial_dims=spatial_dims, dtype=kw.get("dtype"), remat=bool(kw.get("remat", False)), **norm,
    )


_MODULE = re.compile(r"^(down_layers|up_samples|up_layers|conv_final)_(\d+(?:_\d+)?)$")
_NORM_LEAF = {"scale": "weight", "bias": "bias"}


def _torch_module(name: str) -> str:
    match = _MODULE.match(name)
    if name == "convInit":
        return name
    if not match:
        raise AssertionError(f"converter bug: no torch name for flax module '{name}'")
    return f"{match.group(1)}.{match.group(2).replace('_', '.')}"


def _template(module: SegResNet):
    shape = (1, *module.total_downsampling(), module.in_channels or 1)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))["params"]


def convert(state_dict: Mapping[str, np.ndarray], module: SegResNet, *, encoder_only: bool = False,
            source: str = "state dict") -> dict:
    """Flax params (float32 numpy leaves) for `module` from a MONAI SegResNet state dict (name -> numpy array).

    encoder_only: convert only `convInit` and `down_layers.*` and return only those subtrees (the decoder and head
    keys of the state dict are ignored).
    """
    if module.in_channels is None:
        module = module.clone(in_channels=_in_channels(state_dict, source))
    template = _template(module)
    if encoder_only:
        template = {k: v for k, v in template.items() if k.startswith(_ENCODER_PREFIXES)}
    tensors = StateDict(state_dict, source)
    params: dict = {}
    volume = 2 ** module.spatial_dims
    for name, subtree in template.items():
        prefix = _torch_module(name)
        for path, leaf in jax.tree_util.tree_leaves_with_path(subtree):
            keys = tuple(p.key for p in path)
            shape = tuple(leaf.shape)
            deconv = name.startswith("up_samples_") and name.endswith("_1")  # UpsampleConv <- ConvTranspose
            if deconv and keys == ("Dense_0", "kernel"):  # torch (in, out, 2, ..., 2)
                out = shape[1] // volume
                weight = tensors.take(f"{prefix}.deconv.weight", (shape[0], out, *(2,) * module.spatial_dims))
                set_path(params, (name, *keys), upsample_kernel(weight)[0])
            elif deconv and keys == ("bias",):
                set_path(params, (name, *keys), tensors.take(f"{prefix}.deconv.bias", shape))
            elif keys[-1] == "kernel":  # Convolution wrapper: <prefix>[.conv1|.conv2].conv.weight
                torch_key = ".".join((prefix, *keys[:-1], "conv", "weight"))
                weight = tensors.take(torch_key, (shape[-1], shape[-2], *shape[:-2]))
                set_path(params, (name, *keys), conv_kernel(weight))
            elif keys[-2:-1] == ("GroupNorm_0",):  # torch GroupNorm / InstanceNorm affine
                torch_key = ".".join((prefix, *keys[:-2], _NORM_LEAF[keys[-1]]))
                set_path(params, (name, *keys), tensors.take(torch_key, shape))
            elif keys == ("bias",):  # conv_final's conv bias: <prefix>.conv.bias
                set_path(params, (name, *keys), tensors.take(f"{prefix}.conv.bias", shape))
            else:
                raise AssertionError(f"converter bug: unmapped flax parameter {name}/{'/'.join(keys)}")
    allow = ("up_layers.", "up_samples.", "conv_final.") if encoder_only else ()
    if not module.use_conv_final:
        allow += ("conv_final.",)  # MONAI builds conv_final even when forward skips it
    tensors.finish(allow_unused=allow)
    check_against_template(params, template, source)
    return params


def _in_channels(state_dict: Mapping[str, np.ndarray], source: str) -> int:
    if "convInit.conv.weight" not in state_dict:
        raise MedsegError(f"{source}: missing key 'convInit.conv.weight' that the architecture needs "
                          "(the checkpoint is of a different architecture or configuration)")
    return int(np.shape(state_dict["convInit.conv.weight"])[1])
