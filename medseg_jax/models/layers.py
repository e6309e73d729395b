"""Building blocks shared by the U-Net family (channels-last, 2D or 3D by the length of the kernel tuple)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models.conv import conv_general_dilated

ACTIVATIONS: dict[str, Callable] = {
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.01),
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}

NORMS = ("instance", "group", "layer", "none")


def get_activation(name: str) -> Callable:
    return ACTIVATIONS[name]


class Norm(nn.Module):
    """Per-sample normalisation. `instance` equals PyTorch's InstanceNorm{2,3}d(affine=True, eps=1e-5).

    Batch norm is deliberately absent: segmentation batches are 2-4 patches, and instance norm needs no running
    statistics, so training and inference are the same function.
    """

    kind: str = "instance"
    epsilon: float = 1e-5
    affine: bool = True  # False: MONAI's "instance" (torch InstanceNorm default, no scale/bias)
    num_groups: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        common = dict(epsilon=self.epsilon, use_scale=self.affine, use_bias=self.affine, dtype=self.dtype)
        if self.kind == "instance":
            return nn.GroupNorm(num_groups=None, group_size=1, **common)(x)
        if self.kind == "group":
            return nn.GroupNorm(num_groups=min(self.num_groups, x.shape[-1]), **common)(x)
        if self.kind == "layer":
            return nn.LayerNorm(**common)(x)
        if self.kind == "none":
            return x
        raise ValueError(f"unknown norm '{self.kind}'")


def torch_padding(kernel_size: Sequence[int]) -> list[tuple[int, int]]:
    """PyTorch's symmetric `padding=(k - 1) // 2` (nnU-Net, MONAI). Equal to "SAME" for stride 1 and odd kernels, but
    not for stride 2 on even sizes, where "SAME" pads only the high side."""
    return [((k - 1) // 2, (k - 1) // 2) for k in kernel_size]


class ConvNormAct(nn.Module):
    """Conv -> norm -> activation (nnU-Net's ConvDropoutNormReLU without dropout); `activation=None` stops after the
    norm (the second conv of a residual block)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    conv_bias: bool = True
    norm: str = "instance"
    activation: str | None = "leaky_relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        kernel = tuple(int(k) for k in self.kernel_size)
        x = nn.Conv(self.features, kernel, strides=self.strides, padding=torch_padding(kernel),
                    use_bias=self.conv_bias, dtype=self.dtype, conv_general_dilated=conv_general_dilated,
                    name="conv")(x)
        x = Norm(self.norm, dtype=self.dtype, name="norm")(x)
        return x if self.activation is None else get_activation(self.activation)(x)


def depth_to_space(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """(N, *S, prod(f)*C) -> (N, *(S*f), C): the pixel shuffle, for any number of spatial axes."""
    spatial = x.shape[1:-1]
    ndim = len(spatial)
    channels = x.shape[-1] // math.prod(factors)
    x = x.reshape(x.shape[0], *spatial, *factors, channels)
    # interleave each spatial axis with its factor axis: (N, S0, f0, S1, f1, ..., C)
    order = [0]
    for axis in range(ndim):
        order += [1 + axis, 1 + ndim + axis]
    x = x.transpose(*order, 1 + 2 * ndim)
    return x.reshape(x.shape[0], *(s * f for s, f in zip(spatial, factors)), channels)


class UpsampleConv(nn.Module):
    """A transposed convolution with kernel = stride, written as a 1x1x1 conv to prod(stride)*C channels followed by
    depth-to-space, then one bias per output channel.

    Mathematically identical to `nn.ConvTranspose(features, kernel_size=stride, strides=stride)` (each output voxel
    receives exactly one input voxel times one kernel tap), with the same number of parameters, but XLA lowers the
    transposed conv to an lhs-dilated convolution whose gradient is far slower (jax issue 31662); this form is a plain
    matmul plus a reshape. Params: `Dense_0/kernel` (C_in, prod(stride)*C_out), ordered (*stride, C_out) along its
    output axis, and `bias` (C_out,).
    """

    features: int
    strides: Sequence[int]
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        factors = tuple(int(s) for s in self.strides)
        x = nn.Dense(math.prod(factors) * self.features, use_bias=False, dtype=self.dtype, name="Dense_0")(x)
        x = depth_to_space(x, factors)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(x.dtype)
        return x


class Upsample(nn.Module):
    """A kernel = stride transposed conv, as `UpsampleConv` ("pixel_shuffle", the default: a matmul and a reshape) or
    as flax's `nn.ConvTranspose` ("transpose", kept to benchmark the two side by side; same function, other weights
    layout)."""

    features: int
    strides: Sequence[int]
    mode: str = "pixel_shuffle"
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        strides = tuple(int(s) for s in self.strides)
        if self.mode == "pixel_shuffle":
            return UpsampleConv(self.features, strides, use_bias=self.use_bias, dtype=self.dtype, name="shuffle")(x)
        if self.mode == "transpose":
            return nn.ConvTranspose(self.features, strides, strides=strides, padding="VALID", use_bias=self.use_bias,
                                    dtype=self.dtype, name="transpose")(x)
        raise ValueError(f"unknown upsample mode '{self.mode}' (pixel_shuffle | transpose)")
