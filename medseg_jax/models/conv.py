"""A drop-in `lax.conv_general_dilated` whose gradient is fast on XLA:CPU.

XLA:CPU computes the forward 2D/3D convolution well, but lowers its gradients (the input gradient of a strided conv,
and the kernel gradient of every conv) to convolutions it executes slowly: for the demo U-Net's first strided
3x3x3 conv (2x48x48x32x8 -> 16 channels) the gradient took 777 ms against 46 ms written as below, and the stride-1
convs 1.2-2x longer (scripts/bench_conv.py). On CPU the backward pass here is written as im2col matmuls:

- kernel gradient: one matmul per kernel tap, that tap's strided slice of the padded input against the output
  gradient (the same sums as one matmul over the K concatenated taps, "im2col", without writing a K times larger
  array);
- input gradient of a strided conv: the output gradient times the kernel (one matmul to K*C_in channels), each tap's
  block put back into its strided place of the padded input ("col2im"), then the padding cut off. A stride-1 conv
  keeps XLA's input gradient (a forward conv, fast on CPU).

The forward pass is XLA's convolution (on CPU, inputs of at most THIN_INPUT_CHANNELS channels use a per-tap sum); on
every other platform (GPU, TPU) the backward is XLA's too: `platform_dependent` picks the branch when the step is
lowered, so the same model runs cuDNN's gradients there. Same function, same
parameters; the gradients agree with XLA's to float32 rounding (tests/test_conv.py). Dilated, grouped or
non-channels-last convolutions, kernels of more than 27 taps and stride-1 convs of fewer than MIN_OUTPUT_VOXELS output
voxels fall through to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax


def _channels_last(ndim: int):
    spatial = "DHW"[3 - (ndim - 2):]
    specs = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, specs)


def _tap_slices(kernel, strides, out_spatial):
    """Index of each kernel tap's input voxels in the padded input: tap offset o, every stride-th voxel, one per output
    voxel along each axis."""
    for offsets in itertools.product(*(range(k) for k in kernel)):
        yield (slice(None),) + tuple(slice(o, o + s * (n - 1) + 1, s)
                                     for o, s, n in zip(offsets, strides, out_spatial)) + (slice(None),)


def _xla_conv(x, w, strides, padding, dimension_numbers, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dimension_numbers, precision=precision)


# The backward pass is unrolled per kernel tap: larger kernels (a ViT's 16^3 patch embedding) keep XLA's gradient.
MAX_TAPS = 27

# Below this many output voxels per sample a stride-1 conv keeps XLA's gradient: it costs little either way
# there, and the per-tap unroll adds compile time (a U-Net's coarse levels, the test suite's 16^3 patches). Strided
# convs take the im2col path at every size: XLA's gradient is slow even small (2x12x12x8x32 -> 64: 58 ms vs 3 ms).
MIN_OUTPUT_VOXELS = 8192  # per sample, not per batch: an exported model's batch size is symbolic

# Up to this many input channels the CPU forward is a sum of per-tap products instead of XLA's convolution, which is
# slow for thin inputs: the demo's first conv (2x48x48x32x1 -> 8 channels) took 64 ms in XLA and 2 ms this way.
THIN_INPUT_CHANNELS = 4


def _tap_sum_conv(x, w, strides, padding, precision):
    padded = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    out_spatial = tuple((size - k) // s + 1 for size, k, s in zip(padded.shape[1:-1], w.shape[:-2], strides))
    taps = _tap_slices(w.shape[:-2], strides, out_spatial)
    weights = w.reshape(-1, *w.shape[-2:])
    return sum(jnp.einsum("...c,co->...o", padded[tap], weights[t], precision=precision) for t, tap in enumerate(taps))


def _forward(x, w, strides, padding, dimension_numbers, precision):
    if x.shape[-1] > THIN_INPUT_CHANNELS:
        return _xla_conv(x, w, strides, padding, dimension_numbers, precision)
    return lax.platform_dependent(
        x, w, cpu=lambda x, w: _tap_sum_conv(x, w, strides, padding, precision).astype(x.dtype),
        default=lambda x, w: _xla_conv(x, w, strides, padding, dimension_numbers, precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, dimension_numbers, precision):
    return _forward(x, w, strides, padding, dimension_numbers, precision)


def _conv_fwd(x, w, strides, padding, dimension_numbers, precision):
    return _forward(x, w, strides, padding, dimension_numbers, precision), (x, w)


def _im2col_grads(strides, padding, dimension_numbers, precision, x, w, dy):
    kernel, (c_in, c_out) = w.shape[:-2], w.shape[-2:]
    padded = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    taps = list(_tap_slices(kernel, strides, dy.shape[1:-1]))
    # Kernel gradient, one matmul per tap (tap voxels^T @ output gradient), accumulated in float32 whatever the
    # compute dtype: the contraction runs over every output voxel of the batch. Per tap rather than one matmul over
    # the concatenated columns: the same sums without writing a K times larger array (2.3x faster at 48x48x32x8).
    dw = jnp.stack([jnp.einsum("...c,...o->co", padded[tap], dy, precision=precision,
                               preferred_element_type=jnp.float32) for tap in taps])
    dw = dw.reshape(w.shape).astype(w.dtype)
    if all(s == 1 for s in strides):
        # Input gradient of a stride-1 conv: XLA's own (a forward conv of dy with the flipped kernel; fast on CPU).
        _, vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, dimension_numbers, precision), x)
        return vjp(dy)[0], dw
    # Strided: col2im. dy times the kernel gives each tap's contribution; each goes back to its strided place in the
    # padded input (lax.pad with interior padding: a fusion, where `.at[].add` compiles to K scatters).
    dcolumns = jnp.einsum("...o,ko->...k", dy, w.reshape(-1, c_out), precision=precision)
    dpadded = None
    for t, offsets in enumerate(itertools.product(*(range(k) for k in kernel))):
        placement = [(0, 0, 0)]
        for o, s, n, size in zip(offsets, strides, dy.shape[1:-1], padded.shape[1:-1]):
            placement.append((o, size - (o + s * (n - 1) + 1), s - 1))
        placement.append((0, 0, 0))
        block = lax.pad(dcolumns[..., t * c_in:(t + 1) * c_in], jnp.zeros((), dcolumns.dtype), placement)
        dpadded = block if dpadded is None else dpadded + block
    interior = tuple(slice(lo, lo + n) for (lo, _), n in zip(padding, x.shape[1:-1]))
    return dpadded[(slice(None), *interior, slice(None))], dw


def _conv_bwd(strides, padding, dimension_numbers, precision, residuals, dy):
    x, w = residuals

    def xla_grads(x, w, dy):
        _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, strides, padding, dimension_numbers, precision), x, w)
        return vjp(dy)

    cpu_grads = functools.partial(_im2col_grads, strides, padding, dimension_numbers, precision)
    return lax.platform_dependent(x, w, dy, cpu=cpu_grads, default=xla_grads)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """`lax.conv_general_dilated`'s signature (what flax's `nn.Conv(conv_general_dilated=...)` calls)."""
    spatial = lhs.ndim - 2
    plain = (all(d == 1 for d in (lhs_dilation or (1,))) and all(d == 1 for d in (rhs_dilation or (1,)))
             and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
             and spatial in (1, 2, 3) and math.prod(rhs.shape[:-2]) <= MAX_TAPS
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _channels_last(lhs.ndim))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    out_spatial = [(size + lo + hi - k) // s + 1
                   for size, (lo, hi), k, s in zip(lhs.shape[1:-1], padding, rhs.shape[:-2], strides)]
    if all(s == 1 for s in strides) and math.prod(out_spatial) < MIN_OUTPUT_VOXELS:
        return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=dimension_numbers,
                                        precision=precision)
    return _conv(lhs, rhs, strides, padding, _channels_last(lhs.ndim), precision)
