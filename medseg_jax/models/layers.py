"""Building blocks shared by the U-Net family (channels-last, 2D or 3D by the length of the kernel tuple)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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

    @nn.compact
    def __call__(self, x):
        if self.kind == "instance":
            return nn.GroupNorm(num_groups=None, group_size=1, epsilon=self.epsilon)(x)
        if self.kind == "group":
            return nn.GroupNorm(num_groups=min(8, x.shape[-1]), epsilon=self.epsilon)(x)
        if self.kind == "layer":
            return nn.LayerNorm(epsilon=self.epsilon)(x)
        if self.kind == "none":
            return x
        raise ValueError(f"unknown norm '{self.kind}'")


class ConvNormAct(nn.Module):
    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, tuple(self.kernel_size), strides=self.strides, padding="SAME",
                    use_bias=self.norm == "none", dtype=self.dtype)(x)
        x = Norm(self.norm)(x)
        return get_activation(self.activation)(x)


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
    depth-to-space.

    Mathematically identical to `nn.ConvTranspose(features, kernel_size=stride, strides=stride)` (each output voxel
    receives exactly one input voxel times one kernel tap), but XLA lowers the transposed conv to an lhs-dilated
    convolution whose gradient is far slower (jax issue 31662); this form is a plain matmul plus a reshape.
    """

    features: int
    strides: Sequence[int]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        factors = tuple(int(s) for s in self.strides)
        x = nn.Dense(math.prod(factors) * self.features, use_bias=True, dtype=self.dtype)(x)
        return depth_to_space(x, factors)
