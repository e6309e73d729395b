"""MONAI's UNETR (Hatamizadeh et al., https://arxiv.org/abs/2103.10504) in flax.linen, channels-last, 2D or 3D.

Weight-exact with `monai.networks.nets.UNETR` (MONAI 1.6): with the weights converted by
`medseg_jax.transfer.monai_unetr.convert` the logits equal MONAI's up to float rounding. Module and parameter names
mirror MONAI's attribute names (`vit.blocks_3.attn.qkv` is MONAI's `vit.blocks.3.attn.qkv`), so the converter is a
name-by-name mapping.

What is reproduced from MONAI's source (and easy to get wrong):

* ViT encoder: 12 pre-norm transformer blocks (`x + attn(norm1(x))`, `x + mlp(norm2(x))`), torch LayerNorm eps 1e-5,
  exact (erf) GELU, one fused qkv Linear (bias only with `qkv_bias`) whose 3*hidden outputs are ordered
  (q/k/v, head, head_dim), attention scale head_dim**-0.5, no class token, learnable position embeddings of shape
  (1, n_patches, hidden) added after the patch projection; patches are flattened in row-major (D, H, W) = our
  (X, Y, Z) order. `proj_type="conv"` is a Conv(kernel = stride = 16) with bias; `"perceptron"` is MONAI's einops
  rearrange "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" followed by a Linear.
* `proj_feat`: token sequence (N, prod(feat), hidden) -> grid (N, *feat, hidden); MONAI's view + permute to
  channels-first is the identity on our channels-last layout.
* MONAI's `hidden_states_out[3]`, `[6]`, `[9]` (0-based: the outputs of the 4th, 7th and 10th block, before the
  final LayerNorm) feed encoder2..4; the final LayerNorm output feeds decoder5.
* MONAI "instance" norm is torch InstanceNorm with affine=False (no parameters), eps 1e-5; LeakyReLU slope 0.01;
  every conv is bias-free except the patch embedding and the final 1x1 `out` conv; the transposed convs (kernel =
  stride = 2) are bias-free too.
* `UnetResBlock`: conv-norm-lrelu-conv-norm, plus a 1x1 conv + norm on the residual when the channel count changes
  (strides here are always 1), then lrelu after the sum.

Not reproduced: dropout (MONAI's default `dropout_rate=0.0`; the converter accepts any rate, which only matters when
training), `save_attn`, and norms other than instance/group. The input must have exactly `img_size` spatially (the
position embeddings are tied to it, as in MONAI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models.conv import conv_general_dilated
from medseg_jax.models.layers import Norm, UpsampleConv, get_activation

NUM_LAYERS = 12  # MONAI's UNETR hard-codes 12 transformer blocks
PATCH = 16  # ... and a patch size of 16 on every axis
SKIP_LAYERS = (3, 6, 9)  # indices into MONAI's hidden_states_out feeding encoder2, encoder3, encoder4
ENCODER_PARAMS = ("vit",)  # top-level param names of the ViT encoder (what `convert(..., encoder_only=True)` returns)

_lrelu = get_activation("leaky_relu")  # negative_slope 0.01, MONAI's UnetResBlock / UnetBasicBlock default


def _norm(kind: str, affine: bool | None, groups: int, dtype, name: str) -> Norm:
    """MONAI `get_norm_layer` for the supported kinds: "instance" (torch InstanceNorm, affine=False by default) and
    "group" (torch GroupNorm, affine=True by default), both eps 1e-5; statistics are taken in float32."""
    affine = affine if affine is not None else kind == "group"
    return Norm(kind=kind, affine=affine, num_groups=groups, dtype=dtype, name=name)


def _upsample(features: int, spatial_dims: int, dtype, name: str) -> nn.Module:
    """MONAI get_conv_layer(..., kernel_size=2, stride=2, is_transposed=True, conv_only=True): bias-free, as the fast
    1x1-conv + depth-to-space form (param `Dense_0/kernel`)."""
    return UpsampleConv(features, (2,) * spatial_dims, use_bias=False, dtype=dtype, name=name)


def _conv(features: int, kernel: int, spatial_dims: int, dtype, name: str) -> nn.Conv:
    """MONAI get_conv_layer(..., stride=1, bias=False): 'same' padding (kernel - 1) // 2."""
    return nn.Conv(features, (kernel,) * spatial_dims, padding="SAME", use_bias=False, dtype=dtype,
                   conv_general_dilated=conv_general_dilated, name=name)


class UnetResBlock(nn.Module):
    """MONAI `UnetResBlock` with stride 1 (the only stride UNETR uses)."""

    features: int
    kernel_size: int = 3
    norm_name: str = "instance"
    norm_affine: bool | None = None
    norm_groups: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        nd = x.ndim - 2
        norm = (self.norm_name, self.norm_affine, self.norm_groups, self.dtype)
        residual = x
        out = _conv(self.features, self.kernel_size, nd, self.dtype, "conv1")(x)
        out = _lrelu(_norm(*norm, "norm1")(out))
        out = _conv(self.features, self.kernel_size, nd, self.dtype, "conv2")(out)
        out = _norm(*norm, "norm2")(out)
        if x.shape[-1] != self.features:  # MONAI: downsample = in_channels != out_channels (or stride != 1)
            residual = _conv(self.features, 1, nd, self.dtype, "conv3")(residual)
            residual = _norm(*norm, "norm3")(residual)
        return _lrelu(out + residual)


class UnetBasicBlock(nn.Module):
    """MONAI `UnetBasicBlock` with stride 1: conv-norm-lrelu twice."""

    features: int
    kernel_size: int = 3
    norm_name: str = "instance"
    norm_affine: bool | None = None
    norm_groups: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        nd = x.ndim - 2
        norm = (self.norm_name, self.norm_affine, self.norm_groups, self.dtype)
        out = _conv(self.features, self.kernel_size, nd, self.dtype, "conv1")(x)
        out = _lrelu(_norm(*norm, "norm1")(out))
        out = _conv(self.features, self.kernel_size, nd, self.dtype, "conv2")(out)
        return _lrelu(_norm(*norm, "norm2")(out))


def _conv_block(res_block: bool, features: int, norm: dict, dtype, name: str) -> nn.Module:
    cls = UnetResBlock if res_block else UnetBasicBlock
    return cls(features, 3, dtype=dtype, name=name, **norm)


class UnetrBasicBlock(nn.Module):
    """MONAI `UnetrBasicBlock` (kernel 3, stride 1): a res or basic block under the name `layer`."""

    features: int
    res_block: bool = True
    norm_name: str = "instance"
    norm_affine: bool | None = None
    norm_groups: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        norm = dict(norm_name=self.norm_name, norm_affine=self.norm_affine, norm_groups=self.norm_groups)
        return _conv_block(self.res_block, self.features, norm, self.dtype, "layer")(x)


class UnetrPrUpBlock(nn.Module):
    """MONAI `UnetrPrUpBlock` (upsample kernel 2, conv kernel 3, stride 1): a bias-free x2 transposed conv
    (`transp_conv_init`), then `num_layer` times another x2 transposed conv (`blocks_{i}_0`) followed, with
    `conv_block`, by a res/basic block (`blocks_{i}_1`); without `conv_block` the upsampler is `blocks_{i}`."""

    features: int
    num_layer: int
    conv_block: bool = True
    res_block: bool = True
    norm_name: str = "instance"
    norm_affine: bool | None = None
    norm_groups: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        nd = x.ndim - 2
        norm = dict(norm_name=self.norm_name, norm_affine=self.norm_affine, norm_groups=self.norm_groups)
        x = _upsample(self.features, nd, self.dtype, "transp_conv_init")(x)
        for i in range(self.num_layer):
            if self.conv_block:
                x = _upsample(self.features, nd, self.dtype, f"blocks_{i}_0")(x)
                x = _conv_block(self.res_block, self.features, norm, self.dtype, f"blocks_{i}_1")(x)
            else:
                x = _upsample(self.features, nd, self.dtype, f"blocks_{i}")(x)
        return x


class UnetrUpBlock(nn.Module):
    """MONAI `UnetrUpBlock`: bias-free x2 transposed conv (`transp_conv`), concat the skip (upsampled first), then a
    res/basic block (`conv_block`) on 2*features channels."""

    features: int
    res_block: bool = True
    norm_name: str = "instance"
    norm_affine: bool | None = None
    norm_groups: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, skip):
        norm = dict(norm_name=self.norm_name, norm_affine=self.norm_affine, norm_groups=self.norm_groups)
        x = _upsample(self.features, x.ndim - 2, self.dtype, "transp_conv")(x)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        return _conv_block(self.res_block, self.features, norm, self.dtype, "conv_block")(x)


class SABlock(nn.Module):
    """MONAI `SABlock` (use_combined_linear=True, include_fc=True): fused `qkv` Linear, softmax attention,
    `out_proj`."""

    hidden_size: int
    num_heads: int
    qkv_bias: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        batch, length, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        qkv = nn.Dense(3 * self.hidden_size, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        # MONAI: Rearrange("b h (qkv l d) -> qkv b l h d", qkv=3, l=num_heads)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, heads, head_dim), jax's layout
        # the XLA implementation takes logits and softmax in float32 also for bfloat16 inputs
        out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5)
        out = out.reshape(batch, length, self.hidden_size)  # "b l h d -> b h (l d)": heads outer, head_dim inner
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="out_proj")(out)


class MLPBlock(nn.Module):
    """MONAI `MLPBlock` (act GELU = torch's exact erf form)."""

    hidden_size: int
    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.mlp_dim or self.hidden_size, dtype=self.dtype, name="linear1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="linear2")(x)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)  # torch's eps (flax's default is 1e-6)


class TransformerBlock(nn.Module):
    """MONAI `TransformerBlock` without cross-attention (its unused `norm_cross_attn` has no counterpart here)."""

    hidden_size: int
    mlp_dim: int
    num_heads: int
    qkv_bias: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = x + SABlock(self.hidden_size, self.num_heads, self.qkv_bias, self.dtype, name="attn")(
            _layer_norm(self.dtype, "norm1")(x))
        return x + MLPBlock(self.hidden_size, self.mlp_dim, self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))


class PatchEmbeddingBlock(nn.Module):
    """MONAI `PatchEmbeddingBlock` (pos_embed_type="learnable", no class token):
    (N, *S, C) -> (N, prod(S/p), hidden)."""

    hidden_size: int
    img_size: Sequence[int]
    patch_size: Sequence[int]
    proj_type: str = "conv"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        patch = tuple(self.patch_size)
        grid = tuple(s // p for s, p in zip(self.img_size, patch))
        batch, channels = x.shape[0], x.shape[-1]
        if self.proj_type == "conv":
            x = nn.Conv(self.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype,
                        name="patch_embeddings")(x)
            x = x.reshape(batch, -1, self.hidden_size)  # torch flatten(2).transpose: row-major over the grid
        elif self.proj_type == "perceptron":
            nd = len(patch)
            # "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" on channels-last input
            x = x.reshape(batch, *[v for g, p in zip(grid, patch) for v in (g, p)], channels)
            x = x.transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
            x = x.reshape(batch, math.prod(grid), math.prod(patch) * channels)
            x = nn.Dense(self.hidden_size, dtype=self.dtype, name="patch_embeddings")(x)
        else:
            raise ValueError(f"proj_type must be 'conv' or 'perceptron', not '{self.proj_type}'")
        pos = self.param("position_embeddings", nn.initializers.truncated_normal(0.02),
                         (1, math.prod(grid), self.hidden_size), jnp.float32)
        return x + pos.astype(x.dtype)


class ViT(nn.Module):
    """MONAI `ViT` as UNETR configures it (classification=False): returns (norm(x), [hidden state after each block])."""

    img_size: Sequence[int]
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    num_layers: int = NUM_LAYERS
    proj_type: str = "conv"
    qkv_bias: bool = False
    dtype: jnp.dtype | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        nd = len(self.img_size)
        x = PatchEmbeddingBlock(self.hidden_size, tuple(self.img_size), (PATCH,) * nd, self.proj_type,
                                self.dtype, name="patch_embedding")(x)
        block_cls = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        hidden_states = []
        for i in range(self.num_layers):
            x = block_cls(self.hidden_size, self.mlp_dim, self.num_heads, self.qkv_bias, self.dtype,
                          name=f"blocks_{i}")(x)
            hidden_states.append(x)
        return _layer_norm(self.dtype, "norm")(x), hidden_states


class UNETR(nn.Module):
    """MONAI's UNETR. Input (N, *img_size, in_channels) channels-last; returns float32 logits (N, *img_size,
    num_classes). Param names follow MONAI's module names; the encoder is the `vit` subtree (`ENCODER_PARAMS`)."""

    num_classes: int
    in_channels: int
    img_size: tuple[int, ...]
    feature_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    proj_type: str = "conv"
    norm_name: str = "instance"  # "instance" or "group"
    norm_affine: bool | None = None  # None: torch's default (instance: False, group: True)
    norm_groups: int = 8  # for norm_name="group" (MONAI's ("group", {"num_groups": n}))
    res_block: bool = True
    conv_block: bool = True
    qkv_bias: bool = False
    spatial_dims: int = 3
    dtype: jnp.dtype | None = None
    remat: bool = False

    def total_downsampling(self) -> tuple[int, ...]:
        """The factor every input axis must divide by: the ViT patch size, 16 per axis."""
        return (PATCH,) * self.spatial_dims

    def feat_size(self) -> tuple[int, ...]:
        return tuple(int(s) // PATCH for s in self.img_size)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout, no batch statistics: training and inference are the same function
        nd = self.spatial_dims
        img_size = tuple(int(s) for s in self.img_size)
        if len(img_size) != nd or any(s % PATCH for s in img_size):
            raise ValueError(f"img_size {img_size} must have {nd} entries, each a multiple of {PATCH}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}")
        if x.ndim != nd + 2 or tuple(x.shape[1:-1]) != img_size or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNETR expects input (N, *{img_size}, {self.in_channels}), got {tuple(x.shape)}")
        if self.dtype is not None:
            x = x.astype(self.dtype)

        norm = dict(norm_name=self.norm_name, norm_affine=self.norm_affine, norm_groups=self.norm_groups,
                    dtype=self.dtype)
        up = dict(conv_block=self.conv_block, res_block=self.res_block, **norm)
        wrap = nn.remat if self.remat else (lambda cls: cls)
        f = self.feature_size

        x_out, hidden = ViT(img_size, self.hidden_size, self.mlp_dim, self.num_heads, NUM_LAYERS, self.proj_type,
                            self.qkv_bias, self.dtype, self.remat, name="vit")(x)

        def proj_feat(tokens):  # MONAI: view (N, *feat, hidden) then permute to channels-first = our channels-last
            return tokens.reshape(tokens.shape[0], *self.feat_size(), self.hidden_size)

        enc1 = wrap(UnetrBasicBlock)(f, self.res_block, name="encoder1", **norm)(x)
        enc2 = wrap(UnetrPrUpBlock)(f * 2, 2, name="encoder2", **up)(proj_feat(hidden[SKIP_LAYERS[0]]))
        enc3 = wrap(UnetrPrUpBlock)(f * 4, 1, name="encoder3", **up)(proj_feat(hidden[SKIP_LAYERS[1]]))
        enc4 = wrap(UnetrPrUpBlock)(f * 8, 0, name="encoder4", **up)(proj_feat(hidden[SKIP_LAYERS[2]]))
        dec4 = proj_feat(x_out)
        dec3 = wrap(UnetrUpBlock)(f * 8, self.res_block, name="decoder5", **norm)(dec4, enc4)
        dec2 = wrap(UnetrUpBlock)(f * 4, self.res_block, name="decoder4", **norm)(dec3, enc3)
        dec1 = wrap(UnetrUpBlock)(f * 2, self.res_block, name="decoder3", **norm)(dec2, enc2)
        out = wrap(UnetrUpBlock)(f, self.res_block, name="decoder2", **norm)(dec1, enc1)
        # MONAI UnetOutBlock: a 1x1 conv with bias, i.e. a Dense over channels
        return nn.Dense(self.num_classes, dtype=self.dtype, name="out")(out).astype(jnp.float32)
