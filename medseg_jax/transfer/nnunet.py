"""nnU-Net v2 trained models -> flax: `load_nnunet(path)` and what `medseg import nnunet` builds a run from.

`path` is an nnU-Net v2 result folder (`.../nnUNetTrainer__nnUNetPlans__3d_fullres` with `plans.json`, `dataset.json`
and `fold_F/checkpoint_final.pth`), one of its `fold_F` folders, or a `checkpoint_*.pth` file (which carries its plans
and dataset.json in `init_args`). Checkpoints are read with `torch.load(weights_only=True)`: only tensors, containers
and a short list of harmless numpy/torch types are unpickled, never arbitrary objects.

Supported networks: dynamic_network_architectures' PlainConvUNet and ResidualEncoderUNet (nnU-Net's default and ResEnc
M/L/XL plans) with InstanceNorm and LeakyReLU, as described by the plans' `architecture` (nnU-Net >= 2.4) or the older
`UNet_class_name` keys. Region-based models (sigmoid outputs) and cascade stages are refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.models.unet import PlainConvUNet, ResidualEncoderUNet
from medseg_jax.transfer.common import StateDict, check_against_template, conv_kernel, set_path, upsample_kernel

_CLASSES = {"PlainConvUNet": "plain_unet", "ResidualEncoderUNet": "resenc_unet"}


@dataclasses.dataclass
class NnUNetModel:
    module: Any  # PlainConvUNet | ResidualEncoderUNet, input in nnU-Net's axis order
    params: dict
    model_config: dict  # our `model` config section (name, features, strides, ...)
    plans: dict
    dataset_json: dict
    configuration: str
    fold: Any
    source: str
    mirror_axes: tuple[int, ...] | None = None  # the checkpoint's inference_allowed_mirroring_axes (network axes)

    @property
    def variables(self) -> dict:
        return {"params": self.params}


# --- reading -------------------------------------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError:
        raise MedsegError("importing nnU-Net or MONAI weights needs PyTorch: pip install torch==2.13.0 "
                          "(CPU build; used only to read the checkpoint)") from None
    return torch


def load_checkpoint(path: Path) -> dict:
    """A .pth file read with weights_only=True (numpy scalars and dtypes, which nnU-Net's logs hold, allowed)."""
    torch = _torch()
    safe = [np.dtype, np.ndarray]
    try:
        from numpy.core.multiarray import _reconstruct, scalar  # noqa: PLC0415
        safe += [scalar, _reconstruct]
    except ImportError:  # pragma: no cover
        pass
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MedsegError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or unsafe pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedsegError(f"{path}: not a checkpoint that loads with weights_only=True ({first[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise MedsegError(f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}")
    return checkpoint


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read JSON ({exc})") from None


def resolve(path: str | Path, fold=None, checkpoint_name: str = "checkpoint_final.pth"):
    """-> (checkpoint file, plans or None, dataset_json or None) from any of the accepted path forms."""
    path = Path(path)
    if path.is_file():
        return path, None, None
    if not path.is_dir():
        raise MedsegError(f"{path}: not found (expected an nnU-Net result folder, fold folder or .pth checkpoint)")
    if (path / checkpoint_name).is_file():  # a fold folder
        folder, checkpoint = path.parent, path / checkpoint_name
    else:
        folds = sorted(p.name for p in path.glob("fold_*") if (p / checkpoint_name).is_file())
        if not folds:
            raise MedsegError(f"{path}: no fold_*/{checkpoint_name} inside (is this an nnU-Net v2 result folder?)")
        if fold is None:
            if len(folds) > 1:
                raise MedsegError(f"{path}: {len(folds)} folds ({', '.join(folds)}); choose one with --fold")
            name = folds[0]
        else:
            name = f"fold_{fold}"
            if name not in folds:
                raise MedsegError(f"{path}: no {name}/{checkpoint_name} (found: {', '.join(folds)})")
        folder, checkpoint = path, path / name / checkpoint_name
    plans = _read_json(folder / "plans.json") if (folder / "plans.json").is_file() else None
    dataset = _read_json(folder / "dataset.json") if (folder / "dataset.json").is_file() else None
    return checkpoint, plans, dataset


# --- architecture --------------------------------------------------------------------------------------------------
def _short(name: str) -> str:
    return str(name).rsplit(".", 1)[-1]


def architecture(plans: dict, configuration: str, dataset_json: dict, source: str) -> dict:
    """Our `model` config section (plain dict) for an nnU-Net configuration."""
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise MedsegError(f"{source}: plans have no configuration '{configuration}' (found: {', '.join(configs)})")
    conf = dict(configs[configuration])
    while "inherits_from" in conf and conf.get("architecture") is None and "UNet_class_name" not in conf:
        conf = {**configs[conf.pop("inherits_from")], **conf}
    if conf.get("previous_stage"):
        raise MedsegError(f"{source}: configuration '{configuration}' is a cascade stage (needs the low-resolution "
                          "prediction as input); import the 3d_lowres or 3d_fullres model instead")
    if "architecture" in conf:
        arch = conf["architecture"]
        class_name, kwargs = _short(arch["network_class_name"]), dict(arch["arch_kwargs"])
        features = kwargs["features_per_stage"]
        strides, kernels = kwargs["strides"], kwargs["kernel_sizes"]
        n_stages = kwargs["n_stages"]
        encoder = kwargs.get("n_conv_per_stage") or kwargs.get("n_blocks_per_stage")
        decoder = kwargs["n_conv_per_stage_decoder"]
        conv_bias = bool(kwargs.get("conv_bias", False))
        norm, nonlin = _short(kwargs.get("norm_op") or ""), _short(kwargs.get("nonlin") or "")
        norm_kwargs, nonlin_kwargs = kwargs.get("norm_op_kwargs") or {}, kwargs.get("nonlin_kwargs") or {}
        for key in ("block", "bottleneck_channels", "stem_channels", "nonlin_first", "pool", "stochastic_depth_p",
                    "squeeze_excitation"):
            if kwargs.get(key) not in (None, False, 0, 0.0, "BasicBlockD", "conv"):
                raise MedsegError(f"{source}: architecture option {key}={kwargs[key]!r} is not supported")
    else:  # nnU-Net < 2.4 plans
        class_name = conf.get("UNet_class_name", "PlainConvUNet")
        kernels, strides = conf["conv_kernel_sizes"], conf["pool_op_kernel_sizes"]
        n_stages = len(kernels)
        features = [min(conf["UNet_base_num_features"] * 2 ** i, conf["unet_max_num_features"])
                    for i in range(n_stages)]
        encoder = conf.get("n_conv_per_stage_encoder") or conf.get("n_blocks_per_stage_encoder")
        decoder = conf["n_conv_per_stage_decoder"]
        conv_bias, norm, nonlin = True, "InstanceNorm3d" if len(kernels[0]) == 3 else "InstanceNorm2d", "LeakyReLU"
        norm_kwargs, nonlin_kwargs = {"eps": 1e-5, "affine": True}, {"inplace": True}
    if class_name not in _CLASSES:
        raise MedsegError(f"{source}: network '{class_name}' is not supported (supported: "
                          f"{', '.join(sorted(_CLASSES))})")
    if not norm.startswith("InstanceNorm") or not norm_kwargs.get("affine", False) \
            or not math.isclose(norm_kwargs.get("eps", 1e-5), 1e-5):
        raise MedsegError(f"{source}: normalisation {norm} {norm_kwargs} is not supported (InstanceNorm, affine, "
                          "eps 1e-5)")
    if nonlin != "LeakyReLU" or not math.isclose(nonlin_kwargs.get("negative_slope", 0.01), 0.01):
        raise MedsegError(f"{source}: activation {nonlin} {nonlin_kwargs} is not supported (LeakyReLU 0.01)")
    labels = dataset_json.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in labels.values()) or "regions_class_order" in dataset_json:
        raise MedsegError(f"{source}: region-based model (overlapping sigmoid outputs) is not supported")
    if len(features) != n_stages:
        raise MedsegError(f"{source}: features_per_stage has {len(features)} entries for {n_stages} stages")
    config = dict(name=_CLASSES[class_name], features=[int(f) for f in features],
                  strides=[[int(v) for v in s] for s in strides], kernel_sizes=[[int(v) for v in k] for k in kernels],
                  decoder_convs_per_stage=_reversed(_ints(decoder)), conv_bias=conv_bias, norm="instance",
                  activation="leaky_relu", deep_supervision=True, upsample="pixel_shuffle", dtype="float32",
                  remat=False)
    if class_name == "PlainConvUNet":
        config["convs_per_stage"] = _ints(encoder)
    else:
        config["blocks_per_stage"] = _ints(encoder)
        config["preset"] = "M"
    return config


def _reversed(value):
    """nnU-Net lists decoder stages deepest first; ours are indexed by the resolution they end at (0 = full)."""
    return value if isinstance(value, int) else value[::-1]


def _ints(value):
    return int(value) if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def build_module(model_config: dict, num_classes: int):
    config = dict(model_config)
    name = config.pop("name")
    for key in ("dtype", "remat", "preset", "axis_permutation"):
        config.pop(key, None)
    config["strides"] = tuple(tuple(s) for s in config["strides"])
    config["kernel_sizes"] = tuple(tuple(k) for k in config["kernel_sizes"])
    config["features"] = tuple(config["features"])
    for key in ("convs_per_stage", "decoder_convs_per_stage", "blocks_per_stage"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    cls = PlainConvUNet if name == "plain_unet" else ResidualEncoderUNet
    return cls(num_classes=num_classes, spatial_dims=len(config["kernel_sizes"][0]), **config)


# --- weights -------------------------------------------------------------------------------------------------------
def _torch_key(path: tuple[str, ...], n_stages: int, strides) -> tuple[str, str]:
    """Our param path -> (torch key without .weight/.bias, leaf kind)."""
    top = path[0]
    if top == "stem":  # ConvNormAct: stem/{conv,norm}/...
        return "encoder.stem.convs.0." + path[1], "convnorm"
    match = re.fullmatch(r"encoder(\d+)", top)
    if match:
        stage = int(match.group(1))
        sub = path[1]
        if sub.startswith("conv"):  # PlainStage: encoder{s}/conv{c}/{conv,norm}
            return f"encoder.stages.{stage}.0.convs.{int(sub[4:])}.{path[2]}", "convnorm"
        block = int(sub[5:])  # ResidualStage: encoder{s}/block{b}/...
        prefix = f"encoder.stages.{stage}.blocks.{block}."
        if path[2] in ("conv1", "conv2"):
            return prefix + f"{path[2]}.{path[3]}", "convnorm"
        strided = block == 0 and any(v != 1 for v in strides[stage])
        index = 1 if strided else 0  # skip = Sequential(AvgPool?, ConvDropoutNormReLU)
        return prefix + f"skip.{index}." + ("conv" if path[2] == "skip_conv" else "norm"), "convnorm"
    match = re.fullmatch(r"decoder(\d+)", top)
    if match:
        index = n_stages - 2 - int(match.group(1))
        if path[1] == "up":
            return f"decoder.transpconvs.{index}", "up_" + path[2]
        return f"decoder.stages.{index}.convs.{int(path[1][4:])}.{path[2]}", "convnorm"
    match = re.fullmatch(r"head(\d+)", top)
    if match:
        return f"decoder.seg_layers.{n_stages - 2 - int(match.group(1))}", "head"
    raise AssertionError(f"unmapped parameter {'/'.join(path)}")


def convert(state_dict, module, in_channels: int, source: str = "checkpoint") -> dict:
    """nnU-Net network_weights -> flax params for `module` (PlainConvUNet or ResidualEncoderUNet)."""
    # Module aliases in dynamic_network_architectures put the same tensors under several names: ConvDropoutNormReLU
    # registers conv/norm again inside `all_modules`, and the decoder keeps a reference to the encoder.
    tensors = {k: v for k, v in state_dict.items() if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    weights = StateDict(tensors, source=source)
    spatial = module.spatial_dims
    template = jax.eval_shape(module.init, jax.random.key(0),
                              np.zeros((1, *(module.total_downsampling()), in_channels), np.float32))["params"]
    n_stages, strides = len(module.features), module.stage_strides()
    params: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(template):
        names = tuple(p.key for p in path)
        key, kind = _torch_key(names, n_stages, strides)
        shape, last = leaf.shape, names[-1]
        if kind == "convnorm" and names[-2] in ("conv", "skip_conv"):
            if last == "kernel":
                value = conv_kernel(weights.take(key + ".weight", (shape[-1], shape[-2], *shape[:-2])))
            else:
                value = weights.take(key + ".bias", shape)
        elif kind == "convnorm":  # norm/GroupNorm_0/{scale,bias}
            value = weights.take(key + (".weight" if last == "scale" else ".bias"), shape)
        elif kind == "up_shuffle":  # decoder{s}/up/shuffle/{Dense_0/kernel,bias}
            factors = tuple(strides[int(names[0][len("decoder"):]) + 1])  # decoder s upsamples by strides[s + 1]
            if last == "kernel":
                weight = weights.take(key + ".weight", (shape[0], shape[-1] // math.prod(factors), *factors))
                value, _ = upsample_kernel(weight)
            else:
                value = weights.take(key + ".bias", shape)
        elif kind == "up_transpose":  # flax ConvTranspose kernel (*k, in, out) applies taps flipped
            if last == "kernel":
                weight = weights.take(key + ".weight", (shape[-2], shape[-1], *shape[:-2]))
                value = np.transpose(weight, (*range(2, 2 + spatial), 0, 1))[(slice(None, None, -1),) * spatial]
            else:
                value = weights.take(key + ".bias", shape)
        elif kind == "head":  # 1x1 conv (C, F, 1, 1, 1) -> Dense (F, C)
            if last == "kernel":
                value = weights.take(key + ".weight", (shape[1], shape[0], *(1,) * spatial)).reshape(
                    shape[1], shape[0]).T
            else:
                value = weights.take(key + ".bias", shape)
        else:  # pragma: no cover
            raise AssertionError(kind)
        set_path(params, names, np.ascontiguousarray(value, dtype=np.float32))
    heads_unused = () if module.deep_supervision else tuple(
        f"decoder.seg_layers.{i}." for i in range(n_stages - 2))
    weights.finish(allow_unused=heads_unused)
    check_against_template(params, template, source)
    return params


# --- the public API ------------------------------------------------------------------------------------------------
def read_nnunet(path: str | Path, fold=None, checkpoint_name: str = "checkpoint_final.pth",
                configuration: str | None = None) -> NnUNetModel:
    checkpoint_path, plans, dataset_json = resolve(path, fold, checkpoint_name)
    checkpoint = load_checkpoint(checkpoint_path)
    source = str(checkpoint_path)
    if "network_weights" not in checkpoint:
        raise MedsegError(f"{source}: no 'network_weights' (not an nnU-Net v2 checkpoint)")
    init_args = checkpoint.get("init_args") or {}
    plans = plans or init_args.get("plans")
    dataset_json = dataset_json or init_args.get("dataset_json")
    configuration = configuration or init_args.get("configuration")
    if plans is None or dataset_json is None or configuration is None:
        raise MedsegError(f"{source}: the checkpoint carries no plans/dataset.json/configuration and none were found "
                          "beside it")
    model_config = architecture(plans, configuration, dataset_json, source)
    num_classes = len(dataset_json["labels"])
    module = build_module(model_config, num_classes)
    weights = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
               for k, v in checkpoint["network_weights"].items()}
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    weights = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in weights.items()}  # compile
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {"0": "?"}
    params = convert(weights, module, len(channels), source)
    allowed = checkpoint.get("inference_allowed_mirroring_axes")
    return NnUNetModel(module=module, params=params, model_config=model_config, plans=plans,
                       dataset_json=dataset_json, configuration=configuration,
                       fold=init_args.get("fold", fold), source=source,
                       mirror_axes=None if allowed is None else tuple(int(a) for a in allowed))


def load_nnunet(path: str | Path, fold=None, checkpoint_name: str = "checkpoint_final.pth"):
    """(module, variables): `module.apply(variables, x)` maps a channels-last input in nnU-Net's axis order (the
    preprocessed array as nnU-Net's predictor feeds it, channels moved last) to full-resolution logits."""
    model = read_nnunet(path, fold, checkpoint_name)
    return model.module, model.variables
