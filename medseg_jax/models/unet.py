"""A configurable U-Net (nnU-Net's PlainConvUNet topology) in flax.linen, channels-last, 2D or 3D.

Stage i applies `convs_per_stage` conv-norm-activation blocks; stage 0 keeps the input resolution and every later stage
first downsamples with a strided conv (stride `strides[i]`, which may differ per axis for anisotropic data). The decoder
upsamples with `UpsampleConv` (the fast kernel=stride transposed conv), concatenates the skip and applies the same
blocks. With deep supervision the model returns the logits of every decoder level, full resolution first.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from medseg_jax.models.layers import ConvNormAct, UpsampleConv


class UNet(nn.Module):
    num_classes: int
    features: Sequence[int] = (8, 16, 32, 64)
    strides: Sequence[Sequence[int]] | None = None  # per stage; None: (1,..) then 2 on every axis
    kernel_sizes: Sequence[Sequence[int]] | None = None  # per stage; None: 3 on every axis
    convs_per_stage: int = 2
    norm: str = "instance"
    activation: str = "leaky_relu"
    deep_supervision: bool = False
    spatial_dims: int = 3
    dtype: jnp.dtype | None = None

    def stage_strides(self) -> list[tuple[int, ...]]:
        if self.strides is not None:
            return [tuple(int(v) for v in s) for s in self.strides]
        return [(1,) * self.spatial_dims] + [(2,) * self.spatial_dims] * (len(self.features) - 1)

    def stage_kernels(self) -> list[tuple[int, ...]]:
        if self.kernel_sizes is not None:
            return [tuple(int(v) for v in k) for k in self.kernel_sizes]
        return [(3,) * self.spatial_dims] * len(self.features)

    def total_downsampling(self) -> tuple[int, ...]:
        """The factor every input axis must divide by (product of strides)."""
        total = [1] * self.spatial_dims
        for stride in self.stage_strides():
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)

    @nn.compact
    def __call__(self, x, train: bool = False):
        strides, kernels = self.stage_strides(), self.stage_kernels()
        if len(strides) != len(self.features) or len(kernels) != len(self.features):
            raise ValueError("features, strides and kernel_sizes need one entry per stage")
        block = dict(norm=self.norm, activation=self.activation, dtype=self.dtype)

        skips = []
        for stage, (features, stride, kernel) in enumerate(zip(self.features, strides, kernels)):
            for conv in range(self.convs_per_stage):
                x = ConvNormAct(features, kernel, strides=stride if conv == 0 else None,
                                name=f"encoder{stage}_conv{conv}", **block)(x)
            skips.append(x)

        outputs = []
        x = skips.pop()
        for stage in range(len(self.features) - 2, -1, -1):
            x = UpsampleConv(self.features[stage], strides[stage + 1], dtype=self.dtype, name=f"up{stage}")(x)
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            for conv in range(self.convs_per_stage):
                x = ConvNormAct(self.features[stage], kernels[stage], name=f"decoder{stage}_conv{conv}", **block)(x)
            if self.deep_supervision or stage == 0:
                outputs.append(nn.Dense(self.num_classes, dtype=self.dtype, name=f"head{stage}")(x))
        outputs = [o.astype(jnp.float32) for o in reversed(outputs)]  # full resolution first
        if self.deep_supervision and train:
            return outputs
        return outputs[0]
