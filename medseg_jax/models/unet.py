"""nnU-Net's U-Nets in flax.linen, channels-last, 2D or 3D: `PlainConvUNet` and `ResidualEncoderUNet`.

Both follow dynamic_network_architectures (the package nnU-Net v2 builds its networks with) layer for layer, so that
nnU-Net checkpoints load one-to-one (`medseg_jax.transfer.nnunet`) and give the same logits:

- a stage `s` starts with a conv of stride `strides[s]` (the first stage's stride is normally 1) and keeps
  `features[s]` channels; convs pad symmetrically by (k - 1) // 2 like PyTorch (not XLA's "SAME");
- PlainConvUNet: `convs_per_stage[s]` conv -> InstanceNorm -> LeakyReLU(0.01) blocks per encoder stage;
- ResidualEncoderUNet: a stem conv, then `blocks_per_stage[s]` residual BasicBlockD (conv-norm-act, conv-norm, plus
  the skip: average-pooled when strided, 1x1 conv-norm when the width changes; activation after the sum);
- decoder (shared): upsample by the stage's stride with a kernel = stride transposed conv (computed as a 1x1 conv and
  depth-to-space, see `layers.UpsampleConv`), concatenate the skip, `decoder_convs_per_stage` conv blocks, and a 1x1
  head.
  With deep supervision the model returns the logits of every decoder level, full resolution first.

Mixed precision: `dtype=jnp.bfloat16` computes in bfloat16 with float32 params (norm statistics and the logits stay
float32). `remat=True` recomputes each stage's activations in the backward pass (less memory, ~1/3 more compute).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from medseg_jax.models.layers import ConvNormAct, Norm, Upsample, get_activation
from medseg_jax.parallel.mesh import constrain

# nnU-Net's ResEnc presets (nnUNetPlannerResEnc{M,L,XL}): the same topology rule, sized for a GPU memory target.
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_PRESETS = {"M": 8.0, "L": 24.0, "XL": 40.0}  # GB of GPU memory the planner sizes patch and batch for


def _per_stage(value, count: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * count
    value = tuple(int(v) for v in value)
    if len(value) != count:
        raise ValueError(f"{name} needs {count} entries (one per stage), got {len(value)}")
    return value


class _UNetBase(nn.Module):
    num_classes: int
    features: Sequence[int] = (8, 16, 32, 64)
    strides: Sequence[Sequence[int]] | None = None  # per stage; None: 1 then 2 on every axis
    kernel_sizes: Sequence[Sequence[int]] | None = None  # per stage; None: 3 on every axis
    decoder_convs_per_stage: int | Sequence[int] = 2
    conv_bias: bool = True
    norm: str = "instance"
    activation: str = "leaky_relu"
    deep_supervision: bool = False
    upsample: str = "pixel_shuffle"  # or "transpose" (flax ConvTranspose; slow gradient in XLA, for benchmarks)
    spatial_dims: int = 3
    dtype: jnp.dtype | None = None
    remat: bool = False

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

    def _check(self):
        stages = len(self.features)
        strides, kernels = self.stage_strides(), self.stage_kernels()
        if len(strides) != stages or len(kernels) != stages:
            raise ValueError("features, strides and kernel_sizes need one entry per stage")
        return strides, kernels

    def _block(self):
        return dict(conv_bias=self.conv_bias, norm=self.norm, activation=self.activation, dtype=self.dtype)

    def _decode(self, skips, strides, kernels):
        decoder_convs = _per_stage(self.decoder_convs_per_stage, len(self.features) - 1, "decoder_convs_per_stage")
        stage_cls = nn.remat(DecoderStage) if self.remat else DecoderStage
        outputs = []
        x = skips[-1]
        for stage in range(len(self.features) - 2, -1, -1):
            x = stage_cls(self.features[stage], strides[stage + 1], kernels[stage], decoder_convs[stage],
                          upsample=self.upsample, name=f"decoder{stage}", **self._block())(x, skips[stage])
            x = constrain(x, stage)
            if self.deep_supervision or stage == 0:
                outputs.append(constrain(nn.Dense(self.num_classes, dtype=self.dtype, name=f"head{stage}")(x), stage))
        return [o.astype(jnp.float32) for o in reversed(outputs)]  # full resolution first

    def _select(self, outputs, train: bool):
        return outputs if (self.deep_supervision and train) else outputs[0]


class DecoderStage(nn.Module):
    features: int
    stride: Sequence[int]
    kernel: Sequence[int]
    convs: int
    upsample: str = "pixel_shuffle"
    conv_bias: bool = True
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, skip):
        x = Upsample(self.features, self.stride, mode=self.upsample, use_bias=self.conv_bias, dtype=self.dtype,
                     name="up")(x)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        for conv in range(self.convs):
            x = ConvNormAct(self.features, self.kernel, conv_bias=self.conv_bias, norm=self.norm,
                            activation=self.activation, dtype=self.dtype, name=f"conv{conv}")(x)
        return x


class PlainStage(nn.Module):
    features: int
    stride: Sequence[int]
    kernel: Sequence[int]
    convs: int
    conv_bias: bool = True
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        for conv in range(self.convs):
            x = ConvNormAct(self.features, self.kernel, strides=self.stride if conv == 0 else None,
                            conv_bias=self.conv_bias, norm=self.norm, activation=self.activation, dtype=self.dtype,
                            name=f"conv{conv}")(x)
        return x


class PlainConvUNet(_UNetBase):
    """nnU-Net's PlainConvUNet (the default nnU-Net v2 network)."""

    convs_per_stage: int | Sequence[int] = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        strides, kernels = self._check()
        convs = _per_stage(self.convs_per_stage, len(self.features), "convs_per_stage")
        stage_cls = nn.remat(PlainStage) if self.remat else PlainStage
        skips = []
        for stage, features in enumerate(self.features):
            x = stage_cls(features, strides[stage], kernels[stage], convs[stage], name=f"encoder{stage}",
                          **self._block())(x)
            x = constrain(x, stage)  # a spatially sharded mesh keeps every level split (parallel/mesh.py)
            skips.append(x)
        return self._select(self._decode(skips, strides, kernels), train)


class BasicBlockD(nn.Module):
    """dynamic_network_architectures' BasicBlockD: two convs with a (pooled, projected) identity skip."""

    features: int
    kernel: Sequence[int]
    stride: Sequence[int]
    conv_bias: bool = True
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        residual = x
        if any(s != 1 for s in self.stride):
            residual = nn.avg_pool(residual, tuple(self.stride), strides=tuple(self.stride), padding="VALID")
        if x.shape[-1] != self.features:
            residual = nn.Conv(self.features, (1,) * len(self.kernel), use_bias=False, dtype=self.dtype,
                               name="skip_conv")(residual)
            residual = Norm(self.norm, dtype=self.dtype, name="skip_norm")(residual)
        out = ConvNormAct(self.features, self.kernel, strides=self.stride, conv_bias=self.conv_bias, norm=self.norm,
                          activation=self.activation, dtype=self.dtype, name="conv1")(x)
        out = ConvNormAct(self.features, self.kernel, conv_bias=self.conv_bias, norm=self.norm, activation=None,
                          dtype=self.dtype, name="conv2")(out)
        return get_activation(self.activation)(out + residual.astype(out.dtype))


class ResidualStage(nn.Module):
    features: int
    stride: Sequence[int]
    kernel: Sequence[int]
    blocks: int
    conv_bias: bool = True
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        ones = (1,) * len(self.stride)
        for block in range(self.blocks):
            x = BasicBlockD(self.features, self.kernel, self.stride if block == 0 else ones, conv_bias=self.conv_bias,
                            norm=self.norm, activation=self.activation, dtype=self.dtype, name=f"block{block}")(x)
        return x


class ResidualEncoderUNet(_UNetBase):
    """nnU-Net's ResidualEncoderUNet (the ResEnc M/L/XL presets): residual encoder, plain decoder."""

    blocks_per_stage: int | Sequence[int] | None = None  # None: nnU-Net's (1, 3, 4, 6, 6, 6, ...)
    decoder_convs_per_stage: int | Sequence[int] = 1
    stem_features: int | None = None  # None: features[0]

    def stage_blocks(self) -> tuple[int, ...]:
        if self.blocks_per_stage is None:
            return RESENC_BLOCKS[:len(self.features)]
        return _per_stage(self.blocks_per_stage, len(self.features), "blocks_per_stage")

    @nn.compact
    def __call__(self, x, train: bool = False):
        strides, kernels = self._check()
        x = ConvNormAct(self.stem_features or self.features[0], kernels[0], name="stem", **self._block())(x)
        stage_cls = nn.remat(ResidualStage) if self.remat else ResidualStage
        skips = []
        for stage, (features, blocks) in enumerate(zip(self.features, self.stage_blocks())):
            x = stage_cls(features, strides[stage], kernels[stage], blocks, name=f"encoder{stage}",
                          **self._block())(x)
            x = constrain(x, stage)  # a spatially sharded mesh keeps every level split (parallel/mesh.py)
            skips.append(x)
        return self._select(self._decode(skips, strides, kernels), train)


UNet = PlainConvUNet  # the name earlier versions used
