"""MONAI `SwinUNETR` (v1 and v2) state dicts -> flax params of `medseg_jax.models.swin_unetr.SwinUNETR`.

    module = module_from_kwargs(in_channels=1, out_channels=14, feature_size=48, use_v2=True)
    params = convert({k: v.numpy() for k, v in torch_state_dict.items()}, module)
    logits = module.apply({"params": params}, x_channels_last)

`module_from_kwargs` takes MONAI 1.6's constructor arguments and refuses, with a one-line `MedsegError` naming the
argument, anything the flax module cannot reproduce exactly (HyenaND blocks, custom downsample modules or norm layers,
batch norm, patch sizes other than 2). `img_size`, which MONAI deprecated (no effect) and removed in 1.5, is accepted
and ignored so that older configs load. `convert` walks the flax parameter template, so every parameter comes from
exactly one torch key whose shape is checked; keys the architecture lacks are reported by name. The
`relative_position_index` buffers are recomputed by the flax module and skipped. Torch axes (D, H, W) are our (X, Y, Z).

Encoder-only conversion (`encoder_only=True`) returns just the `swinViT` subtree, to be merged into freshly
initialised params for fine-tuning. It reads the encoder keys in any of these styles (the first whose patch embedding
weight is present wins; keys outside the encoder are ignored):

* `swinViT.*` / `module.swinViT.*`: a full MONAI SwinUNETR state dict (v2's `layersNc` convs are required);
* `module.*` / bare (`patch_embed.*`, `layers1.0.*`) / `swin_vit.*`: MONAI's self-supervised pre-trained encoder
  (`model_swinvit.pt`, pass its `["state_dict"]`), the keys `SwinUNETR.load_from` reads. It has no v2 `layersNc`
  convs: for a v2 module those stay out of the result (keep their initial values), as with MONAI's `load_from`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.models.swin_unetr import ENCODER_PARAMS, MERGING_MODES, NUM_STAGES, SwinUNETR
from medseg_jax.transfer.common import (
    StateDict,
    check_against_template,
    conv_kernel,
    linear_kernel,
    monai_norm_fixed_eps,
    set_path,
    upsample_kernel,
)

_MONAI_DEFAULTS: dict[str, Any] = dict(
    in_channels=None, out_channels=None, patch_size=2, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
    qkv_bias=True, mlp_ratio=4.0, feature_size=24, norm_name="instance", drop_rate=0.0, attn_drop_rate=0.0,
    dropout_path_rate=0.0, normalize=True, norm_layer=None, patch_norm=False, use_checkpoint=False, spatial_dims=3,
    downsample="merging", use_v2=False, use_hyena=False, hyena_stages=None, use_flash_attention=False,
)
# only read by MONAI's HyenaND blocks, which are refused: any value is accepted when use_hyena is off
_HYENA_ONLY = ("hyena_kernel_size", "hyena_kernel_mlp_dim", "hyena_kernel_layers", "hyena_mask_max_attenuation",
               "hyena_fft_padding", "hyena_grid_type", "hyena_use_chunked_fft", "hyena_use_fft_short_conv",
               "hyena_omega_0", "hyena_l_cache", "hyena_short_conv_fft_chunks")
_IGNORED = ("img_size",)  # deprecated (no effect) before MONAI 1.5, removed since
_EXTRA = ("dtype", "remat")  # ours, not MONAI's: passed through to the flax module

# encoder key styles for encoder_only, in order of preference; the full-model ones require v2's layersNc convs
_FULL_STYLES = ("swinViT.", "module.swinViT.")
_SSL_STYLES = ("swin_vit.", "module.swin_vit.", "module.", "")


def _norm(norm_name) -> dict:
    """The flax module's norm fields for MONAI's `norm_name` (instance or group, eps 1e-5)."""
    spec = monai_norm_fixed_eps(norm_name, "norm_name", "SwinUNETR")
    fields = dict(norm_name=spec["kind"], norm_affine=spec["affine"])
    return dict(fields, norm_groups=spec["groups"]) if spec["kind"] == "group" else fields


def _ints(value, argument: str, length: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value)
    except TypeError:
        raise MedsegError(f"SwinUNETR argument '{argument}': expected a sequence of integers, got {value!r}") from None
    if length is not None and len(values) != length:
        raise MedsegError(f"SwinUNETR argument '{argument}': needs {length} entries (one per Swin stage), "
                          f"got {values}")
    return values


def _rate(kw: dict, argument: str) -> float:
    rate = float(kw[argument])
    if not 0.0 <= rate <= 1.0:
        raise MedsegError(f"SwinUNETR argument '{argument}': {rate} is not in [0, 1]")
    return rate


def module_from_kwargs(**monai_kwargs) -> SwinUNETR:
    """The flax `SwinUNETR` equal to `monai.networks.nets.SwinUNETR(**monai_kwargs)` (MONAI's defaults for the
    rest). `use_checkpoint` becomes `remat`. Also accepts our `dtype` and `remat`, passed through to the module."""
    unknown = sorted(set(monai_kwargs) - set(_MONAI_DEFAULTS) - set(_HYENA_ONLY) - set(_IGNORED) - set(_EXTRA))
    if unknown:
        raise MedsegError(f"SwinUNETR argument '{unknown[0]}' is not a MONAI SwinUNETR argument")
    kw = {**_MONAI_DEFAULTS, **monai_kwargs}
    for required in ("in_channels", "out_channels"):
        if kw[required] is None:
            raise MedsegError(f"SwinUNETR argument '{required}' is required")

    spatial_dims = int(kw["spatial_dims"])
    if spatial_dims not in (2, 3):
        raise MedsegError(f"SwinUNETR argument 'spatial_dims': {spatial_dims} is not supported (2 or 3)")
    if kw["use_hyena"] or (kw["hyena_stages"] is not None and any(kw["hyena_stages"])):
        name = "use_hyena" if kw["use_hyena"] else "hyena_stages"
        raise MedsegError(f"SwinUNETR argument '{name}': HyenaND blocks are not supported (windowed attention only)")
    patch_size = kw["patch_size"]
    if not isinstance(patch_size, (int, np.integer)) or int(patch_size) != 2:
        raise MedsegError(f"SwinUNETR argument 'patch_size': {patch_size!r} is not supported (only 2: MONAI's "
                          "decoder upsamples the patch embedding by 2)")
    feature_size = int(kw["feature_size"])
    if feature_size <= 0 or feature_size % 12:
        raise MedsegError(f"SwinUNETR argument 'feature_size': {feature_size} is not a positive multiple of 12")
    depths = _ints(kw["depths"], "depths", NUM_STAGES)
    num_heads = _ints(kw["num_heads"], "num_heads", NUM_STAGES)
    for i, heads in enumerate(num_heads):
        if heads <= 0 or (feature_size * 2 ** i) % heads:
            raise MedsegError(f"SwinUNETR argument 'num_heads': stage {i} has {feature_size * 2 ** i} channels, "
                              f"not divisible by {heads} heads")
    window = kw["window_size"]
    window = (int(window),) * spatial_dims if isinstance(window, (int, np.integer)) else _ints(window, "window_size")
    if len(window) != spatial_dims or min(window) < 1:
        raise MedsegError(f"SwinUNETR argument 'window_size': {kw['window_size']!r} needs {spatial_dims} positive "
                          "entries")
    downsample = kw["downsample"]
    if not isinstance(downsample, str) or downsample not in MERGING_MODES:
        raise MedsegError(f"SwinUNETR argument 'downsample': {downsample!r} is not supported (supported: "
                          f"{', '.join(MERGING_MODES)}; custom modules are not)")
    norm_layer = kw["norm_layer"]
    if norm_layer is not None and getattr(norm_layer, "__name__", None) != "LayerNorm":
        raise MedsegError(f"SwinUNETR argument 'norm_layer': {norm_layer!r} is not supported (only torch's "
                          "nn.LayerNorm)")
    return SwinUNETR(
        num_classes=int(kw["out_channels"]), in_channels=int(kw["in_channels"]), depths=depths, num_heads=num_heads,
        feature_size=feature_size, normalize=bool(kw["normalize"]), use_v2=bool(kw["use_v2"]), window_size=window,
        patch_size=2, qkv_bias=bool(kw["qkv_bias"]), mlp_ratio=float(kw["mlp_ratio"]), downsample=downsample,
        patch_norm=bool(kw["patch_norm"]), drop_rate=_rate(kw, "drop_rate"),
        attn_drop_rate=_rate(kw, "attn_drop_rate"), dropout_path_rate=_rate(kw, "dropout_path_rate"),
        spatial_dims=spatial_dims, dtype=kw.get("dtype"),
        remat=bool(kw.get("remat", False)) or bool(kw["use_checkpoint"]), **_norm(kw["norm_name"]),
    )


# ------------------------------------------------------------------------------------------------------- conversion

def _torch_segments(keys: tuple[str, ...]) -> list[str]:
    """Flax module path -> torch module path (without the leaf): MONAI's ModuleLists and Convolution wrappers."""
    out: list[str] = []
    for name in keys:
        if name.startswith("layers") and name[6:].rstrip("c").isdigit():  # layers1 / layers1c: ModuleList of one
            out += [name, "0"]
        elif name.startswith("blocks_"):
            out += ["blocks", name[len("blocks_"):]]
        elif name in ("conv1", "conv2", "conv3"):  # UnetResBlock convs are MONAI `Convolution`s (a .conv inside)
            out += [name, "conv"]
        elif name == "GroupNorm_0":  # inside our Norm: torch's norm holds weight/bias itself
            continue
        else:
            out.append(name)
    return out


def _template(module: SwinUNETR, in_channels: int):
    shape = (1, *module.total_downsampling(), in_channels)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))["params"]


def _convert_subtree(tensors: StateDict, params: dict, name: str, subtree, torch_prefix: str, nd: int) -> None:
    """Fill params[name] from the torch keys under `torch_prefix` (e.g. "swinViT." or "decoder5.")."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(subtree):
        keys = tuple(p.key for p in path)
        shape = tuple(leaf.shape)
        base = torch_prefix + ".".join(_torch_segments(keys[:-1]))
        leaf_name = keys[-1]
        if name == "out":  # MONAI UnetOutBlock: out.conv.conv, a 1x1 conv with bias; ours is a Dense
            torch_key = torch_prefix + "conv.conv"
            if leaf_name == "kernel":
                weight = tensors.take(f"{torch_key}.weight", (shape[1], shape[0], *(1,) * nd))
                value = linear_kernel(weight.reshape(shape[1], shape[0]))
            else:
                value = tensors.take(f"{torch_key}.bias", shape)
        elif keys[-2:] == ("Dense_0", "kernel"):  # bias-free UpsampleConv: torch ConvTranspose (in, out, 2, .., 2)
            base = torch_prefix + ".".join(_torch_segments(keys[:-2]))
            weight = tensors.take(f"{base}.conv.weight", (shape[0], shape[1] // 2 ** nd, *(2,) * nd))
            value, _ = upsample_kernel(weight, None)
        elif leaf_name == "kernel" and len(shape) == nd + 2:  # nn.Conv
            value = conv_kernel(tensors.take(f"{base}.weight", (shape[-1], shape[-2], *shape[:-2])))
        elif leaf_name == "kernel" and len(shape) == 2:  # nn.Dense = torch Linear
            value = linear_kernel(tensors.take(f"{base}.weight", (shape[1], shape[0])))
        elif leaf_name == "scale":  # LayerNorm / affine GroupNorm
            value = tensors.take(f"{base}.weight", shape)
        elif leaf_name in ("bias", "relative_position_bias_table"):
            value = tensors.take(f"{base}.{leaf_name}", shape)
        else:
            raise AssertionError(f"converter bug: unmapped flax parameter {name}/{'/'.join(keys)}")
        set_path(params, (name, *keys), np.asarray(value, np.float32))


def _encoder_style(state_dict: Mapping[str, np.ndarray]) -> str | None:
    for prefix in _FULL_STYLES + _SSL_STYLES:
        if f"{prefix}patch_embed.proj.weight" in state_dict:
            return prefix
    return None


def _in_channels(state_dict: Mapping[str, np.ndarray], prefix: str, source: str) -> int:
    key = f"{prefix}patch_embed.proj.weight"
    if key not in state_dict:
        raise MedsegError(f"{source}: missing key '{key}' that the architecture needs "
                          "(the checkpoint is of a different architecture or configuration)")
    return int(np.shape(state_dict[key])[1])


def convert(state_dict: Mapping[str, np.ndarray], module: SwinUNETR, *, encoder_only: bool = False,
            source: str = "state dict") -> dict:
    """Flax params (float32 numpy leaves) for `module` from a MONAI SwinUNETR state dict (name -> numpy array).

    encoder_only: convert only the Swin transformer (`swinViT`, or the self-supervised checkpoint's key styles listed
    in the module docstring) and return only that subtree; all other keys are ignored.
    """
    prefix = "swinViT."
    if encoder_only:
        prefix = _encoder_style(state_dict) or prefix
    if module.in_channels is None:
        module = module.clone(in_channels=_in_channels(state_dict, prefix, source))
    template = dict(_template(module, module.in_channels))
    nd = module.spatial_dims

    if encoder_only:
        template = {k: v for k, v in template.items() if k in ENCODER_PARAMS}
        relevant = (prefix,) if prefix in _FULL_STYLES else \
            tuple(f"{prefix}{s}" for s in ("patch_embed.", *(f"layers{i + 1}." for i in range(NUM_STAGES)),
                                           *(f"layers{i + 1}c." for i in range(NUM_STAGES))))
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(relevant)}  # the rest is ignored
        if prefix in _SSL_STYLES and module.use_v2 and f"{prefix}layers1c.0.layer.conv1.conv.weight" not in state_dict:
            # the self-supervised encoder has no v2 conv blocks: leave them at their initial values (MONAI load_from)
            template = {"swinViT": {k: v for k, v in template["swinViT"].items()
                                    if not (k.startswith("layers") and k.endswith("c"))}}
    ignore = [k for k in state_dict if k.endswith(".relative_position_index")]  # buffers, recomputed by the module
    tensors = StateDict(state_dict, source, ignore=ignore)

    params: dict = {}
    for name, subtree in template.items():
        torch_prefix = prefix if name == "swinViT" else f"{name}."
        _convert_subtree(tensors, params, name, subtree, torch_prefix, nd)
    tensors.finish()
    check_against_template(params, template, source)
    return params
