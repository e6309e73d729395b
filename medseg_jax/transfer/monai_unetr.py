"""MONAI `UNETR` state dicts -> flax params for `medseg_jax.models.unetr.UNETR`.

Our module names mirror MONAI's attributes, so each torch key maps to one flax path: `vit.blocks.3.attn.qkv.weight`
-> `vit/blocks_3/attn/qkv/kernel` (transposed), `encoder2.blocks.0.1.conv1.conv.weight` ->
`encoder2/blocks_0_1/conv1/kernel`, the bias-free transposed convs `...transp_conv.conv.weight` -> the Dense kernel of
the 1x1-conv + depth-to-space upsampler. Every expected torch shape is derived from the flax template of the module
(`jax.eval_shape(module.init, ...)`), so a checkpoint of another configuration fails on the first mismatching key
with its name, and keys the architecture lacks fail in `StateDict.finish()`.

Ignored keys: MONAI 1.5+ `TransformerBlock` always creates a `norm_cross_attn` LayerNorm (and MONAI <= 1.4 a whole
`cross_attn` CrossAttentionBlock) even when cross-attention is off; they never take part in the forward pass
(MONAI issue 8845), so `vit.blocks.N.norm_cross_attn.*` and `vit.blocks.N.cross_attn.*` are dropped.

The encoder is the `vit` subtree (`medseg_jax.models.unetr.ENCODER_PARAMS`): with `encoder_only=True` only the
`vit.*` keys are read (others are ignored whether present or not) and the returned dict holds only `{"vit": ...}`,
to be merged into freshly initialised params.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.models.unetr import ENCODER_PARAMS, NUM_LAYERS, UNETR
from medseg_jax.transfer.common import (
    StateDict,
    check_against_template,
    conv_kernel,
    linear_kernel,
    monai_norm_fixed_eps,
    set_path,
    upsample_kernel,
)

_UNUSED_CROSS_ATTENTION = re.compile(r"^vit\.blocks\.\d+\.(norm_cross_attn|cross_attn)\.")

_SUPPORTED = {"in_channels", "out_channels", "img_size", "feature_size", "hidden_size", "mlp_dim", "num_heads",
              "proj_type", "norm_name", "conv_block", "res_block", "dropout_rate", "spatial_dims", "qkv_bias",
              "save_attn"}


def _norm_from_monai(norm_name: Any) -> dict:
    """MONAI's norm_name ("instance", ("instance", {"affine": b}), ("group", {"num_groups": n[, "affine": b]}))
    -> our UNETR norm fields."""
    spec = monai_norm_fixed_eps(norm_name, "norm_name", "MONAI UNETR")
    fields = dict(norm_name=spec["kind"], norm_affine=spec["affine"])
    return dict(fields, norm_groups=spec["groups"]) if spec["kind"] == "group" else fields


def module_from_kwargs(**monai_kwargs) -> UNETR:
    """Our UNETR from the keyword arguments of `monai.networks.nets.UNETR(...)` (same names, same defaults)."""
    unknown = sorted(set(monai_kwargs) - _SUPPORTED)
    if unknown:
        raise MedsegError(f"MONAI UNETR argument '{unknown[0]}' is not supported "
                          f"(supported: {', '.join(sorted(_SUPPORTED))})")
    kw = dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, proj_type="conv", norm_name="instance",
              conv_block=True, res_block=True, dropout_rate=0.0, spatial_dims=3, qkv_bias=False)
    kw.update(monai_kwargs)
    for name in ("in_channels", "out_channels", "img_size"):
        if name not in kw:
            raise MedsegError(f"MONAI UNETR argument '{name}' is required")
    spatial_dims = int(kw["spatial_dims"])
    if spatial_dims not in (2, 3):
        raise MedsegError(f"MONAI UNETR argument 'spatial_dims' must be 2 or 3, got {kw['spatial_dims']!r}")
    img_size = kw["img_size"]
    img_size = (int(img_size),) * spatial_dims if np.isscalar(img_size) else tuple(int(s) for s in img_size)
    if len(img_size) != spatial_dims or any(s < 16 or s % 16 for s in img_size):
        raise MedsegError(f"MONAI UNETR argument 'img_size' {img_size}: needs {spatial_dims} sizes, each a positive "
                          "multiple of the patch size 16")
    if kw["proj_type"] not in ("conv", "perceptron"):
        raise MedsegError(f"MONAI UNETR argument 'proj_type' must be 'conv' or 'perceptron', got {kw['proj_type']!r}")
    if int(kw["hidden_size"]) % int(kw["num_heads"]):
        raise MedsegError(f"MONAI UNETR argument 'hidden_size' {kw['hidden_size']} must divide by num_heads "
                          f"{kw['num_heads']}")
    if not 0 <= float(kw["dropout_rate"]) <= 1:
        raise MedsegError(f"MONAI UNETR argument 'dropout_rate' must lie in [0, 1], got {kw['dropout_rate']!r}")
    # dropout_rate and save_attn do not change the weights: dropout only acts in training (our UNETR has none) and
    # save_attn only stores the attention maps.
    return UNETR(num_classes=int(kw["out_channels"]), in_channels=int(kw["in_channels"]), img_size=img_size,
                 feature_size=int(kw["feature_size"]), hidden_size=int(kw["hidden_size"]), mlp_dim=int(kw["mlp_dim"]),
                 num_heads=int(kw["num_heads"]), proj_type=str(kw["proj_type"]), res_block=bool(kw["res_block"]),
                 conv_block=bool(kw["conv_block"]), qkv_bias=bool(kw["qkv_bias"]), spatial_dims=spatial_dims,
                 **_norm_from_monai(kw["norm_name"]))


def _template(module: UNETR) -> dict:
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, *module.img_size, module.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


class _Converter:
    def __init__(self, sd: StateDict, template: dict):
        self.sd, self.template, self.params = sd, template, {}

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        node = self.template
        for name in path:
            node = node[name]
        return tuple(node.shape)

    def has(self, path: tuple[str, ...]) -> bool:
        node = self.template
        for name in path:
            if not isinstance(node, Mapping) or name not in node:
                return False
            node = node[name]
        return True

    def put(self, path: tuple[str, ...], value: np.ndarray) -> None:
        set_path(self.params, path, np.ascontiguousarray(value, dtype=np.float32))

    def conv(self, key: str, path: tuple[str, ...]) -> None:
        """torch Conv (weight[, bias]) -> flax nn.Conv."""
        k = self.shape((*path, "kernel"))  # (*kernel, in, out)
        self.put((*path, "kernel"), conv_kernel(self.sd.take(f"{key}.weight", (k[-1], k[-2], *k[:-2]))))
        if self.has((*path, "bias")):
            self.put((*path, "bias"), self.sd.take(f"{key}.bias", (k[-1],)))

    def dense(self, key: str, path: tuple[str, ...]) -> None:
        """torch Linear (weight[, bias]) -> flax nn.Dense."""
        k = self.shape((*path, "kernel"))  # (in, out)
        self.put((*path, "kernel"), linear_kernel(self.sd.take(f"{key}.weight", (k[1], k[0]))))
        if self.has((*path, "bias")):
            self.put((*path, "bias"), self.sd.take(f"{key}.bias", (k[1],)))

    def conv1x1_dense(self, key: str, path: tuple[str, ...], spatial_dims: int) -> None:
        """torch 1x1(x1) Conv with bias -> flax nn.Dense."""
        k = self.shape((*path, "kernel"))
        weight = self.sd.take(f"{key}.weight", (k[1], k[0], *(1,) * spatial_dims))
        self.put((*path, "kernel"), linear_kernel(weight.reshape(k[1], k[0])))
        self.put((*path, "bias"), self.sd.take(f"{key}.bias", (k[1],)))

    def layer_norm(self, key: str, path: tuple[str, ...]) -> None:
        (n,) = self.shape((*path, "scale"))
        self.put((*path, "scale"), self.sd.take(f"{key}.weight", (n,)))
        self.put((*path, "bias"), self.sd.take(f"{key}.bias", (n,)))

    def norm(self, key: str, path: tuple[str, ...]) -> None:
        """MONAI norm layer -> our `layers.Norm` (affine params under GroupNorm_0; none for MONAI's "instance")."""
        inner = (*path, "GroupNorm_0")
        if self.has((*inner, "scale")):
            (n,) = self.shape((*inner, "scale"))
            self.put((*inner, "scale"), self.sd.take(f"{key}.weight", (n,)))
            self.put((*inner, "bias"), self.sd.take(f"{key}.bias", (n,)))

    def upsample(self, key: str, path: tuple[str, ...], spatial_dims: int) -> None:
        """Bias-free torch ConvTranspose (kernel = stride = 2) -> `UpsampleConv(use_bias=False)` Dense kernel."""
        cin, cols = self.shape((*path, "Dense_0", "kernel"))
        factors = (2,) * spatial_dims
        weight = self.sd.take(f"{key}.weight", (cin, cols // math.prod(factors), *factors))
        kernel, _ = upsample_kernel(weight, None)
        self.put((*path, "Dense_0", "kernel"), kernel)

    def res_or_basic(self, key: str, path: tuple[str, ...], spatial_dims: int) -> None:
        """MONAI UnetResBlock / UnetBasicBlock."""
        for i in (1, 2, 3):
            if i == 3 and not self.has((*path, "conv3")):
                break
            self.conv(f"{key}.conv{i}.conv", (*path, f"conv{i}"))
            self.norm(f"{key}.norm{i}", (*path, f"norm{i}"))


def _convert_vit(c: _Converter, module: UNETR) -> None:
    emb = ("vit", "patch_embedding")
    pos = c.shape((*emb, "position_embeddings"))
    c.put((*emb, "position_embeddings"), c.sd.take("vit.patch_embedding.position_embeddings", pos))
    if module.proj_type == "conv":
        c.conv("vit.patch_embedding.patch_embeddings", (*emb, "patch_embeddings"))
    else:  # nn.Sequential(Rearrange, Linear): the Linear is entry 1
        c.dense("vit.patch_embedding.patch_embeddings.1", (*emb, "patch_embeddings"))
    for i in range(NUM_LAYERS):
        key, path = f"vit.blocks.{i}", ("vit", f"blocks_{i}")
        c.layer_norm(f"{key}.norm1", (*path, "norm1"))
        c.dense(f"{key}.attn.qkv", (*path, "attn", "qkv"))
        c.dense(f"{key}.attn.out_proj", (*path, "attn", "out_proj"))
        c.layer_norm(f"{key}.norm2", (*path, "norm2"))
        c.dense(f"{key}.mlp.linear1", (*path, "mlp", "linear1"))
        c.dense(f"{key}.mlp.linear2", (*path, "mlp", "linear2"))
    c.layer_norm("vit.norm", ("vit", "norm"))


def _convert_decoder(c: _Converter, module: UNETR) -> None:
    nd = module.spatial_dims
    c.res_or_basic("encoder1.layer", ("encoder1", "layer"), nd)
    for name, num_layer in (("encoder2", 2), ("encoder3", 1), ("encoder4", 0)):
        c.upsample(f"{name}.transp_conv_init.conv", (name, "transp_conv_init"), nd)
        for i in range(num_layer):
            if module.conv_block:
                c.upsample(f"{name}.blocks.{i}.0.conv", (name, f"blocks_{i}_0"), nd)
                c.res_or_basic(f"{name}.blocks.{i}.1", (name, f"blocks_{i}_1"), nd)
            else:
                c.upsample(f"{name}.blocks.{i}.conv", (name, f"blocks_{i}"), nd)
    for name in ("decoder5", "decoder4", "decoder3", "decoder2"):
        c.upsample(f"{name}.transp_conv.conv", (name, "transp_conv"), nd)
        c.res_or_basic(f"{name}.conv_block", (name, "conv_block"), nd)
    c.conv1x1_dense("out.conv.conv", ("out",), nd)


def convert(state_dict: Mapping[str, np.ndarray], module: UNETR, *, encoder_only: bool = False,
            source: str = "state dict") -> dict:
    """Flax params (what goes under "params") for `module` from a MONAI UNETR state dict (name -> numpy array).

    With `encoder_only` only the ViT encoder is converted and the result holds only the `ENCODER_PARAMS` subtrees
    (`{"vit": ...}`); the caller merges them into freshly initialised params. Raises `MedsegError` naming the key on
    a missing key, a shape mismatch or (full conversion, and `vit.*` keys when encoder_only) an unknown key.
    """
    tensors = {k: v for k, v in state_dict.items() if not encoder_only or k.startswith("vit.")}
    # MONAI issue 8845: cross-attention weights TransformerBlock creates but never uses (see module docstring)
    ignore = [k for k in tensors if _UNUSED_CROSS_ATTENTION.match(k)]
    sd = StateDict(tensors, source=source, ignore=ignore)
    template = _template(module)
    c = _Converter(sd, template)
    _convert_vit(c, module)
    if encoder_only:
        template = {name: template[name] for name in ENCODER_PARAMS}
    else:
        _convert_decoder(c, module)
    sd.finish()
    check_against_template(c.params, template, source)
    return c.params
