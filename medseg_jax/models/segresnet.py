"""MONAI's SegResNet (Myronenko 2018, without the VAE branch) in flax.linen, channels-last, 2D or 3D.

Weight-exact with `monai.networks.nets.SegResNet` (converter: `medseg_jax.transfer.monai_segresnet`):

- `convInit`: 3x3(x3) conv, no bias, `in_channels -> init_filters`; optional channel dropout (torch Dropout{2,3}d).
- encoder level i (channels `init_filters * 2**i`): for i > 0 a stride-2 3x3(x3) conv (padding 1, no bias) that
  doubles the channels, then `blocks_down[i]` pre-activation residual blocks
  `x + conv2(act(norm2(conv1(act(norm1(x))))))` (3x3(x3) convs, no bias).
- decoder stage i: 1x1(x1) conv halving the channels (no bias), 2x upsampling (`nontrainable`: torch's
  `nn.Upsample(mode="(bi|tri)linear", align_corners=False)`; `deconv`: transposed conv kernel = stride = 2 with bias),
  add the encoder output of the same resolution, then `blocks_up[i]` residual blocks.
- `conv_final` (when `use_conv_final`): norm, activation, 1x1(x1) conv with bias to `num_classes`.

Parameter names mirror the torch module's (`down_layers_2_1` is torch's `down_layers.2.1`), so the converter is a
renaming. Torch axes (D, H, W) are our (X, Y, Z) in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models.conv import conv_general_dilated
from medseg_jax.models.layers import Norm, UpsampleConv, get_activation, torch_padding
from medseg_jax.parallel.mesh import constrain

UPSAMPLE_MODES = ("nontrainable", "deconv")


def upsample_linear_2x(x: jax.Array) -> jax.Array:
    """2x (bi|tri)linear upsampling of every spatial axis of (N, *S, C), equal to torch's
    `F.interpolate(scale_factor=2, mode="(bi|tri)linear", align_corners=False)`.

    With half-pixel centres, output 2i samples input i - 1/4 and output 2i + 1 samples i + 1/4, the out-of-range
    neighbour clamped to the edge (torch clamps the source index): a separable two-tap stencil, no gather and no dense
    resize matrix.
    """
    for axis in range(1, x.ndim - 1):
        n = x.shape[axis]
        first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
        last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
        prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
        nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
        three_quarters = x * jnp.asarray(0.75, x.dtype)
        even = three_quarters + prev * jnp.asarray(0.25, x.dtype)
        odd = three_quarters + nxt * jnp.asarray(0.25, x.dtype)
        x = jnp.stack([even, odd], axis=axis + 1)
        x = x.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 2:])
    return x


def _conv(features: int, spatial_dims: int, kernel: int, *, strides: int = 1, use_bias: bool = False,
          dtype=None, name: str | None = None) -> nn.Conv:
    """MONAI's `get_conv_layer`: kernel k, stride s, padding (k - 1) // 2 on both sides (torch's symmetric padding;
    flax's "SAME" would pad (0, 1) at stride 2)."""
    kernel_size = (kernel,) * spatial_dims
    return nn.Conv(features, kernel_size, strides=(strides,) * spatial_dims, padding=torch_padding(kernel_size),
                   use_bias=use_bias, dtype=dtype, conv_general_dilated=conv_general_dilated, name=name)


class ResBlock(nn.Module):
    """MONAI's segresnet ResBlock: x + conv2(act(norm2(conv1(act(norm1(x))))))."""

    features: int
    spatial_dims: int = 3
    norm: str = "group"
    num_groups: int = 8
    norm_affine: bool = True
    norm_epsilon: float = 1e-5
    activation: str = "relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        act = get_activation(self.activation)
        norm = dict(kind=self.norm, num_groups=self.num_groups, affine=self.norm_affine, epsilon=self.norm_epsilon,
                    dtype=self.dtype)
        identity = x
        x = Norm(**norm, name="norm1")(x)
        x = _conv(self.features, self.spatial_dims, 3, dtype=self.dtype, name="conv1")(act(x))
        x = Norm(**norm, name="norm2")(x)
        x = _conv(self.features, self.spatial_dims, 3, dtype=self.dtype, name="conv2")(act(x))
        return x + identity


class SegResNet(nn.Module):
    """MONAI's SegResNet; fields mirror its constructor (`num_classes` is `out_channels`).

    `in_channels` None infers the channel count from the input; an int is checked against it. `norm` is "group"
    (`num_groups` groups, torch GroupNorm) or "instance" (torch InstanceNorm; MONAI's plain "instance" is
    `norm_affine=False`). `dropout_prob` applies channel dropout (torch Dropout{2,3}d) after `convInit` when
    `train=True`, drawing from the 'dropout' rng. `use_conv_final=False` returns the `init_filters` decoder features
    (float32) instead of logits, as MONAI does.
    """

    num_classes: int = 2
    in_channels: int | None = None
    init_filters: int = 8
    blocks_down: Sequence[int] = (1, 2, 2, 4)
    blocks_up: Sequence[int] = (1, 1, 1)
    num_groups: int = 8
    upsample_mode: str = "nontrainable"
    use_conv_final: bool = True
    dropout_prob: float | None = None
    norm: str = "group"
    norm_affine: bool = True
    norm_epsilon: float = 1e-5
    activation: str = "relu"
    spatial_dims: int = 3
    dtype: jnp.dtype | None = None
    remat: bool = False

    def total_downsampling(self) -> tuple[int, ...]:
        """The factor every input axis must divide by."""
        return (2 ** (len(self.blocks_down) - 1),) * self.spatial_dims

    def stage_strides(self) -> list[tuple[int, ...]]:
        """The downsampling of each level (the first keeps full resolution), as the U-Nets report it."""
        return [(1,) * self.spatial_dims] + [(2,) * self.spatial_dims] * (len(self.blocks_down) - 1)

    def _check(self, x) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"SegResNet: spatial_dims must be 2 or 3, not {self.spatial_dims}")
        if len(self.blocks_down) < 1 or len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(f"SegResNet: blocks_up needs len(blocks_down) - 1 = {len(self.blocks_down) - 1} entries, "
                             f"got {tuple(self.blocks_up)}")
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"SegResNet: upsample_mode '{self.upsample_mode}' is not one of {UPSAMPLE_MODES}")
        if self.norm == "group" and self.init_filters % self.num_groups:
            raise ValueError(f"SegResNet: init_filters {self.init_filters} is not divisible by num_groups "
                             f"{self.num_groups} (torch GroupNorm refuses it)")
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"SegResNet: input of shape {x.shape} is not (N, *spatial, C) with "
                             f"{self.spatial_dims} spatial axes")
        if self.in_channels is not None and x.shape[-1] != self.in_channels:
            raise ValueError(f"SegResNet: input has {x.shape[-1]} channels, in_channels is {self.in_channels}")
        factors = self.total_downsampling()
        if any(s % f for s, f in zip(x.shape[1:-1], factors)):
            raise ValueError(f"SegResNet: spatial shape {x.shape[1:-1]} is not divisible by {factors}")

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._check(x)
        nd, dtype = self.spatial_dims, self.dtype
        block_cls = nn.remat(ResBlock) if self.remat else ResBlock
        block = dict(spatial_dims=nd, norm=self.norm, num_groups=self.num_groups, norm_affine=self.norm_affine,
                     norm_epsilon=self.norm_epsilon, activation=self.activation, dtype=dtype)

        x = _conv(self.init_filters, nd, 3, dtype=dtype, name="convInit")(x)
        if self.dropout_prob is not None:
            # torch Dropout{2,3}d: one Bernoulli draw per (sample, channel), broadcast over the spatial axes
            x = nn.Dropout(self.dropout_prob, broadcast_dims=tuple(range(1, nd + 1)))(x, deterministic=not train)

        skips = []
        for i, count in enumerate(self.blocks_down):
            features = self.init_filters * 2 ** i
            if i > 0:
                x = _conv(features, nd, 3, strides=2, dtype=dtype, name=f"down_layers_{i}_0")(x)
            for j in range(count):
                x = block_cls(features, **block, name=f"down_layers_{i}_{j + 1}")(x)
            x = constrain(x, i)  # a spatially sharded mesh keeps every level split (parallel/mesh.py)
            skips.append(x)

        skips.pop()
        n_up = len(self.blocks_up)
        for i in range(n_up):
            features = self.init_filters * 2 ** (n_up - i - 1)
            x = _conv(features, nd, 1, dtype=dtype, name=f"up_samples_{i}_0")(x)
            if self.upsample_mode == "deconv":
                x = UpsampleConv(features, (2,) * nd, dtype=dtype, name=f"up_samples_{i}_1")(x)
            else:
                x = upsample_linear_2x(x)
            x = x + skips.pop()
            for j in range(self.blocks_up[i]):
                x = block_cls(features, **block, name=f"up_layers_{i}_{j}")(x)
            x = constrain(x, n_up - i - 1)

        if self.use_conv_final:
            x = Norm(self.norm, num_groups=self.num_groups, affine=self.norm_affine, epsilon=self.norm_epsilon,
                     dtype=dtype, name="conv_final_0")(x)
            x = get_activation(self.activation)(x)
            x = _conv(self.num_classes, nd, 1, use_bias=True, dtype=dtype, name="conv_final_2")(x)
        return x.astype(jnp.float32)
