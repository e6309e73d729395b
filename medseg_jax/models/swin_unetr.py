"""MONAI's SwinUNETR (Hatamizadeh et al., https://arxiv.org/abs/2201.01266) and SwinUNETR-v2 in flax.linen,
channels-last, 2D or 3D.

Weight-exact with `monai.networks.nets.SwinUNETR` (MONAI 1.6): with the weights converted by
`medseg_jax.transfer.monai_swin_unetr.convert` the logits equal MONAI's up to float rounding. Module and parameter
names mirror MONAI's attribute names (`swinViT.layers1.blocks_0.attn.qkv` is MONAI's
`swinViT.layers1.0.blocks.0.attn.qkv`), so the converter is a name-by-name mapping. Torch's (D, H, W) are our (X, Y, Z).

What is reproduced from MONAI's source (and easy to get wrong):

* `PatchEmbed`: pad the input at the far end of each axis to a multiple of the patch size, Conv(kernel = stride =
  patch) with bias, optional LayerNorm (`patch_norm`).
* Swin stage (`BasicLayer`): `depth` blocks alternating unshifted / shifted (by window // 2) windows, then patch
  merging. Per stage, an axis no longer than the window uses the whole axis as window and no shift there
  (`get_window_size`).
  Block: `x + attn(norm1(x))`, `x + mlp(norm2(x))`; before the attention the normalised features are zero-padded at
  the far end to whole windows (padded tokens take part in the attention unmasked, as in MONAI), rolled by -shift,
  partitioned into windows (row-major window order, row-major tokens inside), and everything undone afterwards.
* `WindowAttention`: fused qkv Linear ordered (q/k/v, head, head_dim), q scaled by head_dim**-0.5 before q k^T, a
  learnt relative position bias `table[index]` and, for shifted windows, MONAI's `compute_mask` (-100 between tokens
  of different regions). When the window shrank to the feature map, MONAI still indexes the bias with the top-left
  `[:n, :n]` block of the *configured* window's relative position index (not the shrunken window's); that quirk is
  reproduced. Index and mask depend only on static shapes and are numpy constants.
* `PatchMerging` ("merging", MONAI's default and the v0.9 layout) concatenates the 8 sub-voxels in the order
  (0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,1,0), (1,0,1), (0,1,1), (1,1,1) (offsets along d, h, w); "mergingv2" uses
  `itertools.product` order (0,0,0), (0,0,1), (0,1,0), ... In 2D both modes take MONAI v2's
  `x[:, j::2, i::2] for i, j in product(range(2), range(2))`, i.e. offsets (0,0), (1,0), (0,1), (1,1). Odd sizes are
  zero-padded at the far end first. Then LayerNorm(8C) (4C in 2D) and a bias-free Linear(8C -> 2C).
* `proj_out` (normalize=True): a LayerNorm without scale/bias (eps 1e-5) on each of the 5 hidden states.
* v2 (`use_v2=True`): a residual `UnetrBasicBlock` (`layersNc`, always "instance" norm) before each Swin stage.
* torch LayerNorm eps 1e-5 everywhere (flax's default is 1e-6), exact erf GELU, MONAI "instance" norm = torch
  InstanceNorm with affine=False, LeakyReLU 0.01, every conv bias-free except the patch embedding and the final 1x1
  `out` conv; the decoder's x2 transposed convs are bias-free `UpsampleConv`s.
* Input spatial sizes must divide by 32 (patch 2, then 4 halvings), as MONAI's `_check_input_size` demands. Note
  that a bottleneck (input / 32) of only 1-2 voxels makes the instance norms there ill-conditioned (torch even refuses
  a single voxel), so prefer patches of >= 64 along some axis.

Dropout (`drop_rate`, `attn_drop_rate`) and stochastic depth (`dropout_path_rate`, linearly increasing over the
blocks) act only with `train=True` and a "dropout" rng; all default to 0 as in MONAI. Not reproduced: the HyenaND
blocks (`use_hyena`), user-supplied downsample modules, `norm_layer` other than LayerNorm, patch sizes other than 2
(MONAI's decoder only fits patch size 2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.models.unetr import UnetrBasicBlock, UnetrUpBlock  # MONAI's CNN blocks, shared with UNETR

NUM_STAGES = 4  # MONAI's SwinTransformer hard-codes layers1..layers4 and the decoder uses all of them
MERGING_MODES = ("merging", "mergingv2")
ENCODER_PARAMS = ("swinViT",)  # top-level param names of the Swin encoder (`convert(..., encoder_only=True)` output)
LN_EPS = 1e-5  # torch's LayerNorm eps



# ----------------------------------------------------------------------------------------------------- static helpers

def get_window_size(x_size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]):
    """MONAI `get_window_size`: an axis no longer than the window becomes one window, unshifted."""
    window, shift = list(window_size), list(shift_size)
    for i, size in enumerate(x_size):
        if size <= window_size[i]:
            window[i] = size
            shift[i] = 0
    return tuple(window), tuple(shift)


def relative_position_index(window_size: Sequence[int]) -> np.ndarray:
    """MONAI `WindowAttention.relative_position_index` for the configured window: (n, n) ints into the bias table."""
    window_size = tuple(int(w) for w in window_size)
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in window_size], indexing="ij"))
    flat = coords.reshape(len(window_size), -1)
    rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0).copy()
    for axis, w in enumerate(window_size):
        rel[:, :, axis] += w - 1
    for axis in range(len(window_size) - 1):
        rel[:, :, axis] *= math.prod(2 * w - 1 for w in window_size[axis + 1:])
    return rel.sum(-1)


def window_partition(x, window_size: Sequence[int]):
    """(B, *S, C) -> (B, num_windows, window_volume, C); windows and the tokens inside them in row-major order."""
    batch, *dims, channels = x.shape
    nd = len(dims)
    split = [v for d, w in zip(dims, window_size) for v in (d // w, w)]
    x = x.reshape(batch, *split, channels)
    x = x.transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    return x.reshape(batch, math.prod(d // w for d, w in zip(dims, window_size)), math.prod(window_size), channels)


def window_reverse(windows, window_size: Sequence[int], dims: Sequence[int]):
    """Inverse of `window_partition`: (B, num_windows, window_volume, C) -> (B, *dims, C)."""
    batch, channels = windows.shape[0], windows.shape[-1]
    nd = len(dims)
    x = windows.reshape(batch, *(d // w for d, w in zip(dims, window_size)), *window_size, channels)
    order = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
    return x.transpose(*order).reshape(batch, *dims, channels)


def compute_mask(dims: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]) -> np.ndarray:
    """MONAI `compute_mask` on the padded feature map: (num_windows, n, n), 0 within a region and -100 across."""
    img_mask = np.zeros((1, *dims, 1), np.float32)
    regions = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window_size, shift_size)]
    for count, index in enumerate(itertools.product(*regions)):  # MONAI's nested loops, later slices overwrite
        img_mask[(slice(None), *index, slice(None))] = count
    windows = window_partition(img_mask, window_size)[0, :, :, 0]  # (num_windows, n)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _layer_norm(dtype, name: str, **kwargs) -> nn.LayerNorm:
    # torch's eps (flax's default is 1e-6) and two-pass variance like torch
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name, **kwargs)


def _plain_layer_norm(x):
    """torch `F.layer_norm(x, [C])` (no weight/bias), statistics in float32."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    return ((y - mean) * jax.lax.rsqrt(var + LN_EPS)).astype(x.dtype)


def _drop_path(module: nn.Module, x, rate: float, train: bool):
    """MONAI `DropPath` (scale_by_keep=True): drop whole samples of the residual branch, rescale the kept ones."""
    if rate == 0.0 or not train:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _pad_end(x, spatial_pad: Sequence[int]):
    if not any(spatial_pad):
        return x
    return jnp.pad(x, [(0, 0), *[(0, p) for p in spatial_pad], (0, 0)])


# ------------------------------------------------------------------------------------------------- CNN (MONAI) blocks

# ------------------------------------------------------------------------------------------------------ Swin blocks

class MLPBlock(nn.Module):
    """MONAI `MLPBlock(act="GELU", dropout_mode="swin")`: linear1, exact GELU, dropout, linear2, the same dropout."""

    hidden_size: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="linear1")(x), approximate=False)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.hidden_size, dtype=self.dtype, name="linear2")(x)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class WindowAttention(nn.Module):
    """MONAI `WindowAttention` on windows (B, num_windows, n, C), with the relative position bias of the configured
    `window_size` and an optional (num_windows, n, n) mask; logits and softmax in float32."""

    dim: int
    num_heads: int
    window_size: Sequence[int]
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, mask: np.ndarray | None = None, train: bool = False):
        batch, num_windows, n, channels = x.shape
        head_dim = channels // self.num_heads
        window = tuple(int(w) for w in self.window_size)
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           (math.prod(2 * w - 1 for w in window), self.num_heads), jnp.float32)
        qkv = nn.Dense(3 * channels, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, num_windows, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (B, W, n, heads, head_dim)
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=jnp.float32)
        index = relative_position_index(window)[:n, :n]  # MONAI's [:n, :n] even when the window shrank
        bias = table[index.reshape(-1)].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        logits = logits + bias
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.attn_drop, deterministic=not train)(attn).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(batch, num_windows, n, channels)
        out = nn.Dense(channels, dtype=self.dtype, name="proj")(out)
        return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class SwinTransformerBlock(nn.Module):
    """MONAI `SwinTransformerBlock` on (B, *S, C): (shifted) window attention and an MLP, both pre-norm residual."""

    dim: int
    num_heads: int
    window_size: Sequence[int]
    shift_size: Sequence[int]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        dims = tuple(x.shape[1:-1])
        axes = tuple(range(1, 1 + len(dims)))
        window, shift = get_window_size(dims, self.window_size, self.shift_size)
        shortcut = x
        x = _layer_norm(self.dtype, "norm1")(x)
        x = _pad_end(x, [(w - d % w) % w for d, w in zip(dims, window)])
        padded = tuple(x.shape[1:-1])
        mask = None
        if any(s > 0 for s in shift):
            x = jnp.roll(x, tuple(-s for s in shift), axis=axes)
            mask = compute_mask(padded, window, shift)
        windows = window_partition(x, window)
        windows = WindowAttention(self.dim, self.num_heads, tuple(self.window_size), self.qkv_bias, self.attn_drop,
                                  self.drop, self.dtype, name="attn")(windows, mask, train)
        x = window_reverse(windows, window, padded)
        if any(s > 0 for s in shift):
            x = jnp.roll(x, tuple(shift), axis=axes)
        x = x[(slice(None), *(slice(0, d) for d in dims), slice(None))]
        x = shortcut + _drop_path(self, x, self.drop_path, train)
        y = MLPBlock(self.dim, int(self.dim * self.mlp_ratio), self.drop, self.dtype, name="mlp")(
            _layer_norm(self.dtype, "norm2")(x), train)
        return x + _drop_path(self, y, self.drop_path, train)


class PatchMerging(nn.Module):
    """MONAI `PatchMerging` ("merging") / `PatchMergingV2` ("mergingv2"): (B, *S, C) -> (B, *ceil(S/2), 2C)."""

    dim: int
    mode: str = "merging"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        dims = x.shape[1:-1]
        nd = len(dims)
        x = _pad_end(x, [d % 2 for d in dims])
        if nd == 3 and self.mode == "merging":
            offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
        elif nd == 3:
            offsets = list(itertools.product(range(2), range(2), range(2)))
        else:  # MONAI's 2D path (both modes): x[:, j::2, i::2] for i, j in product(range(2), range(2))
            offsets = [(j, i) for i, j in itertools.product(range(2), range(2))]
        x = jnp.concatenate([x[(slice(None), *(slice(o, None, 2) for o in off), slice(None))] for off in offsets], -1)
        x = _layer_norm(self.dtype, "norm")(x)
        return nn.Dense(2 * self.dim, use_bias=False, dtype=self.dtype, name="reduction")(x)


class BasicLayer(nn.Module):
    """MONAI `BasicLayer`: `depth` Swin blocks (`blocks_{i}`, odd ones shifted by window // 2), then `downsample`."""

    dim: int
    depth: int
    num_heads: int
    window_size: Sequence[int]
    drop_path: Sequence[float]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    downsample: str = "merging"
    dtype: jnp.dtype | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        window = tuple(int(w) for w in self.window_size)
        shift = tuple(w // 2 for w in window)
        block = nn.remat(SwinTransformerBlock, static_argnums=(2,)) if self.remat else SwinTransformerBlock
        for i in range(self.depth):
            x = block(self.dim, self.num_heads, window, (0,) * len(window) if i % 2 == 0 else shift,
                      self.mlp_ratio, self.qkv_bias, self.drop, self.attn_drop, float(self.drop_path[i]),
                      self.dtype, name=f"blocks_{i}")(x, train)
        return PatchMerging(self.dim, self.downsample, self.dtype, name="downsample")(x)


class PatchEmbed(nn.Module):
    """MONAI `PatchEmbed`: pad to whole patches at the far end, Conv(kernel = stride = patch) with bias, LayerNorm
    if `patch_norm`."""

    patch_size: Sequence[int]
    embed_dim: int
    patch_norm: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        patch = tuple(int(p) for p in self.patch_size)
        x = _pad_end(x, [(p - d % p) % p for d, p in zip(x.shape[1:-1], patch)])
        x = nn.Conv(self.embed_dim, patch, strides=patch, padding="VALID", dtype=self.dtype, name="proj")(x)
        if self.patch_norm:
            x = _layer_norm(self.dtype, "norm")(x)
        return x


class SwinTransformer(nn.Module):
    """MONAI `SwinTransformer`: returns the 5 hidden states [patch embedding, stage 1..4 outputs (after merging)],
    each passed through `proj_out` (a parameter-free LayerNorm) when `normalize`."""

    embed_dim: int
    window_size: Sequence[int]
    patch_size: Sequence[int]
    depths: Sequence[int]
    num_heads: Sequence[int]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    patch_norm: bool = False
    downsample: str = "merging"
    use_v2: bool = False
    dtype: jnp.dtype | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x, normalize: bool = True, train: bool = False):
        depths = tuple(int(d) for d in self.depths)
        dpr = [float(r) for r in np.linspace(0.0, self.drop_path_rate, sum(depths))]

        def proj_out(h):
            return _plain_layer_norm(h) if normalize else h

        x = PatchEmbed(tuple(self.patch_size), self.embed_dim, self.patch_norm, self.dtype, name="patch_embed")(x)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        hidden = [proj_out(x)]
        conv_block = nn.remat(UnetrBasicBlock) if self.remat else UnetrBasicBlock
        for i, depth in enumerate(depths):
            dim = int(self.embed_dim * 2 ** i)
            if self.use_v2:
                x = conv_block(dim, norm_name="instance", norm_affine=None, norm_groups=8, dtype=self.dtype,
                               name=f"layers{i + 1}c")(x)
            x = BasicLayer(dim, depth, int(self.num_heads[i]), tuple(self.window_size),
                           tuple(dpr[sum(depths[:i]):sum(depths[:i + 1])]), self.mlp_ratio, self.qkv_bias,
                           self.drop_rate, self.attn_drop_rate, self.downsample, self.dtype, self.remat,
                           name=f"layers{i + 1}")(x, train)
            hidden.append(proj_out(x))
        return hidden


# ----------------------------------------------------------------------------------------------------------- network

class SwinUNETR(nn.Module):
    """MONAI's SwinUNETR (v1, or v2 with `use_v2`). Input (N, *S, C) channels-last with every S divisible by 32;
    returns float32 logits (N, *S, num_classes). Param names follow MONAI's module names; the encoder is the
    `swinViT` subtree (`ENCODER_PARAMS`). `swin_hidden_states` returns MONAI's `swinViT(x, normalize)` outputs."""

    num_classes: int
    in_channels: int | None = None  # None: taken from the input; otherwise the input must have this many channels
    depths: Sequence[int] = (2, 2, 2, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    feature_size: int = 24
    norm_name: str = "instance"  # "instance" or "group" (encoders/decoders; v2's layersNc are always "instance")
    norm_affine: bool | None = None  # None: torch's default (instance: False, group: True)
    norm_groups: int = 8  # for norm_name="group" (MONAI's ("group", {"num_groups": n}))
    normalize: bool = True
    use_v2: bool = False
    window_size: int | Sequence[int] = 7
    patch_size: int = 2
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    downsample: str = "merging"  # MONAI's default; or "mergingv2"
    patch_norm: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dropout_path_rate: float = 0.0
    spatial_dims: int = 3
    dtype: jnp.dtype | None = None
    remat: bool = False

    def total_downsampling(self) -> tuple[int, ...]:
        """The factor every input axis must divide by: patch 2 then 4 patch mergings, 32 per axis."""
        return (int(self.patch_size) * 2 ** NUM_STAGES,) * self.spatial_dims

    def _windows(self) -> tuple[int, ...]:
        window = self.window_size
        if isinstance(window, int):
            return (int(window),) * self.spatial_dims
        return tuple(int(w) for w in window)

    def setup(self):
        nd = self.spatial_dims
        if nd not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {nd}")
        if self.patch_size != 2:
            raise ValueError(f"patch_size must be 2 (MONAI's decoder only fits 2), not {self.patch_size}")
        if len(self.depths) != NUM_STAGES or len(self.num_heads) != NUM_STAGES:
            raise ValueError(f"depths and num_heads need {NUM_STAGES} entries, got {self.depths}, {self.num_heads}")
        if len(self._windows()) != nd:
            raise ValueError(f"window_size {self.window_size} must be an int or have {nd} entries")
        if self.downsample not in MERGING_MODES:
            raise ValueError(f"downsample must be one of {MERGING_MODES}, not '{self.downsample}'")
        if self.norm_name not in ("instance", "group"):
            raise ValueError(f"norm_name must be 'instance' or 'group', not '{self.norm_name}'")
        for i, heads in enumerate(self.num_heads):
            if (self.feature_size * 2 ** i) % heads:
                raise ValueError(f"stage {i}: {self.feature_size * 2 ** i} channels do not divide by {heads} heads")
        f = self.feature_size
        self.swinViT = SwinTransformer(
            f, self._windows(), (self.patch_size,) * nd, tuple(self.depths), tuple(self.num_heads), self.mlp_ratio,
            self.qkv_bias, self.drop_rate, self.attn_drop_rate, self.dropout_path_rate, self.patch_norm,
            self.downsample, self.use_v2, self.dtype, self.remat)
        norm = dict(norm_name=self.norm_name, norm_affine=self.norm_affine, norm_groups=self.norm_groups,
                    dtype=self.dtype)
        basic = nn.remat(UnetrBasicBlock) if self.remat else UnetrBasicBlock
        up = nn.remat(UnetrUpBlock) if self.remat else UnetrUpBlock
        self.encoder1 = basic(f, **norm)
        self.encoder2 = basic(f, **norm)
        self.encoder3 = basic(2 * f, **norm)
        self.encoder4 = basic(4 * f, **norm)
        self.encoder10 = basic(16 * f, **norm)
        self.decoder5 = up(8 * f, **norm)
        self.decoder4 = up(4 * f, **norm)
        self.decoder3 = up(2 * f, **norm)
        self.decoder2 = up(f, **norm)
        self.decoder1 = up(f, **norm)
        # MONAI UnetOutBlock: a 1x1 conv with bias, i.e. a Dense over channels
        self.out = nn.Dense(self.num_classes, dtype=self.dtype)

    def _check_input(self, x):
        nd = self.spatial_dims
        if x.ndim != nd + 2:
            raise ValueError(f"SwinUNETR expects input (N, *spatial ({nd} axes), C), got {tuple(x.shape)}")
        if self.in_channels is not None and x.shape[-1] != self.in_channels:
            raise ValueError(f"SwinUNETR expects {self.in_channels} input channels, got {x.shape[-1]}")
        factor = self.total_downsampling()
        if any(s % f for s, f in zip(x.shape[1:-1], factor)):
            raise ValueError(f"SwinUNETR input spatial shape {tuple(x.shape[1:-1])} must divide by {factor}")
        return x.astype(self.dtype) if self.dtype is not None else x

    def swin_hidden_states(self, x, train: bool = False) -> list:
        """MONAI's `swinViT(x, normalize)`: the 5 (normalised) hidden states, channels-last."""
        return self.swinViT(self._check_input(x), self.normalize, train)

    def __call__(self, x, train: bool = False):
        x = self._check_input(x)
        hidden = self.swinViT(x, self.normalize, train)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return self.out(out).astype(jnp.float32)
