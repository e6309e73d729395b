"""Models by name, built from the `model` section of an experiment config.

    config.model = model_config("resenc_unet", preset="L")        # every key overridable: --config.model.features=...

| name          | module                                   | reference                                        |
|---------------|------------------------------------------|--------------------------------------------------|
| plain_unet    | unet.PlainConvUNet                       | nnU-Net v2 default (dynamic_network_architectures) |
| resenc_unet   | unet.ResidualEncoderUNet, presets M/L/XL | nnU-Net ResEnc presets ("nnU-Net revisited")     |
| unetr         | unetr.UNETR                              | MONAI UNETR                                      |
| swin_unetr    | swin_unetr.SwinUNETR (use_v2 for v2)     | MONAI SwinUNETR                                  |
| segresnet     | segresnet.SegResNet                      | MONAI SegResNet                                  |

Keys every model has: `dtype` ("float32" | "bfloat16": compute precision, params stay float32), `remat` (recompute each
stage's activations in the backward pass). U-Net topology keys (`features`, `strides`, `kernel_sizes`) left empty are
filled by the planner (`medseg plan`) or, without a plan, by a default of 2x downsampling per stage.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from medseg_jax.errors import MedsegError

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "plain_unet": dict(features=(32, 64, 128, 256, 320), strides=None, kernel_sizes=None, convs_per_stage=2,
                       decoder_convs_per_stage=2, conv_bias=True, norm="instance", activation="leaky_relu",
                       deep_supervision=True, upsample="pixel_shuffle"),
    "resenc_unet": dict(preset="M", features=(32, 64, 128, 256, 320), strides=None, kernel_sizes=None,
                        blocks_per_stage=None, decoder_convs_per_stage=1, conv_bias=True, norm="instance",
                        activation="leaky_relu", deep_supervision=True, upsample="pixel_shuffle"),
    "unetr": dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, proj_type="conv",
                  norm_name="instance", conv_block=True, res_block=True, qkv_bias=False),
    "swin_unetr": dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7, patch_size=2,
                       norm_name="instance", normalize=True, use_v2=False, qkv_bias=True, mlp_ratio=4.0,
                       downsample="merging"),
    "segresnet": dict(init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), num_groups=8,
                      upsample_mode="nontrainable", use_conv_final=True),
}
_ALIASES = {"unet": "plain_unet"}  # the name run directories of earlier versions carry
_MODULES = {"plain_unet": ("unet", "PlainConvUNet"), "resenc_unet": ("unet", "ResidualEncoderUNet"),
            "unetr": ("unetr", "UNETR"), "swin_unetr": ("swin_unetr", "SwinUNETR"),
            "segresnet": ("segresnet", "SegResNet")}
NAMES = tuple(sorted(_DEFAULTS))


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The `model` config section for `name` with its defaults, then `overrides`."""
    name = _ALIASES.get(name, name)
    if name not in _DEFAULTS:
        raise MedsegError(f"config key 'model.name': unknown model '{name}' (known: {', '.join(NAMES)})")
    values = dict(name=name, **_DEFAULTS[name], dtype="float32", remat=False)
    for key, value in overrides.items():
        if key not in values:
            raise MedsegError(f"config key 'model.{key}': not a key of model '{name}' "
                              f"(known: {', '.join(sorted(values))})")
        values[key] = value
    return ml_collections.ConfigDict(values)


def module_class(name: str) -> type[nn.Module]:
    module_name, class_name = _MODULES[_ALIASES.get(name, name)]
    return getattr(importlib.import_module(f"medseg_jax.models.{module_name}"), class_name)


def _nested(value):
    if value is None:
        return None
    return tuple(tuple(int(v) for v in item) if isinstance(item, (list, tuple)) else int(item) for item in value)


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, in_channels: int = 1,
                patch_size=None, spatial_dims: int = 3) -> nn.Module:
    """The flax module for `model_config`. Transformers with position embeddings need `patch_size`."""
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    raw_name = config.pop("name")
    name = _ALIASES.get(raw_name, raw_name)
    if name not in _DEFAULTS:
        raise MedsegError(f"config key 'model.name': unknown model '{name}' (known: {', '.join(NAMES)})")
    dtype_name = config.pop("dtype", "float32")
    if dtype_name not in DTYPES:
        raise MedsegError(f"config key 'model.dtype': '{dtype_name}' is not one of {', '.join(DTYPES)}")
    common = dict(num_classes=num_classes, spatial_dims=spatial_dims, dtype=DTYPES[dtype_name],
                  remat=bool(config.pop("remat", False)))
    permutation = config.pop("axis_permutation", None)
    cls = module_class(name)
    try:
        if name in ("plain_unet", "resenc_unet"):
            config.pop("preset", None)
            for key in ("strides", "kernel_sizes"):
                config[key] = _nested(config.get(key))
            for key in ("features", "convs_per_stage", "decoder_convs_per_stage", "blocks_per_stage"):
                if isinstance(config.get(key), (list, tuple)):
                    config[key] = tuple(int(v) for v in config[key])
            module = cls(**common, **config)
        else:
            extra = dict(in_channels=in_channels)
            if name == "unetr":
                if patch_size is None:
                    raise MedsegError("model 'unetr' needs the patch size (config key 'train.patch_size')")
                extra["img_size"] = tuple(int(v) for v in patch_size)
            for key, value in list(config.items()):
                if isinstance(value, list):
                    config[key] = tuple(value)
            module = cls(**common, **extra, **config)
    except TypeError as exc:  # a key the module does not take
        raise MedsegError(f"config section 'model' ({name}): {exc}") from None
    if permutation is not None:
        module = AxisPermuted(module, tuple(int(p) for p in permutation))
    return module


# The encoder of each network, by the top-level names of its params: what pretraining transfers (`medseg train
# --init-from` a `medseg pretrain` run) and what `train.freeze_encoder` / `train.encoder_lr_scale` act on.
_ENCODER_PREFIXES = {"plain_unet": ("encoder",), "resenc_unet": ("stem", "encoder"), "unetr": ("vit",),
                     "swin_unetr": ("swinViT",), "segresnet": ("convInit", "down_layers_")}


def is_encoder_param(model_name: str, top_level_name: str) -> bool:
    """Whether the params under `top_level_name` belong to the encoder of model `model_name`."""
    prefixes = _ENCODER_PREFIXES[_ALIASES.get(model_name, model_name)]
    return top_level_name.startswith(prefixes)


def pretraining_network(config: ml_collections.ConfigDict, in_channels: int) -> nn.Module:
    """The network of `config` for masked image modelling: the same layers, one output per image channel (the
    reconstruction), no deep supervision. Its encoder's params have the segmentation network's names and shapes."""
    model = ml_collections.ConfigDict(config.model.to_dict())
    if "deep_supervision" in model:
        model.deep_supervision = False
    return build_model(model, num_classes=in_channels, in_channels=in_channels,
                       patch_size=tuple(int(p) for p in config.train.patch_size))


def output_channels(num_classes: int, regions=None) -> int:
    """Output channels of the network: one per class (softmax), or one per region with `loss.regions` (sigmoid)."""
    return len(regions) if regions else num_classes


def build_network(config: ml_collections.ConfigDict, num_classes: int, in_channels: int) -> nn.Module:
    """The network of experiment `config` for a dataset of `num_classes` labels (background included) and
    `in_channels` channels: `config.model` with `output_channels` outputs, sized for `config.train.patch_size`.
    Training, `medseg memory`, the planner and prediction all build their network here."""
    regions = config.loss.get("regions") if "loss" in config else None
    patch_size = tuple(int(p) for p in config.train.patch_size)
    # a 2D patch trains a 2D network (2D pictures, or nnU-Net's 2d configuration: slices of volumes)
    return build_model(config.model, num_classes=output_channels(num_classes, regions), in_channels=in_channels,
                       patch_size=patch_size, spatial_dims=len(patch_size))


class AxisPermuted(nn.Module):
    """Runs `net` on the input with its spatial axes reordered (`permutation[a]` = our axis feeding the network's axis
    a) and puts the output back in our order: imported networks were trained on another axis convention (nnU-Net
    reads images as (z, y, x) and may transpose them further)."""

    net: nn.Module
    permutation: tuple[int, ...]

    def total_downsampling(self) -> tuple[int, ...]:
        factors = self.net.total_downsampling()
        ours = [1] * len(factors)
        for network_axis, our_axis in enumerate(self.permutation):
            ours[our_axis] = factors[network_axis]
        return tuple(ours)

    def __call__(self, x, train: bool = False):
        forward = (0, *(1 + p for p in self.permutation), x.ndim - 1)
        inverse = tuple(sorted(range(len(forward)), key=forward.__getitem__))
        outputs = self.net(jnp.transpose(x, forward), train=train)
        if isinstance(outputs, (list, tuple)):
            return [jnp.transpose(o, inverse) for o in outputs]
        return jnp.transpose(outputs, inverse)
