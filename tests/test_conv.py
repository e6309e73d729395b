"""models/conv.py: XLA's convolution with im2col gradients on CPU — the same function and gradients as
lax.conv_general_dilated (to float32 rounding), and on CPU really the im2col path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medseg_jax.models import conv


@pytest.fixture(autouse=True)
def every_size_takes_the_im2col_path(monkeypatch):
    """The sizes here are below conv.MIN_OUTPUT_VOXELS, where XLA's gradient is kept; force our path."""
    monkeypatch.setattr(conv, "MIN_OUTPUT_VOXELS", 0)


SPECS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _value_and_grads(fn, x, w, strides, padding, **kwargs):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, SPECS[x.ndim - 2])

    def loss(x, w):
        # sin: a gradient that depends on the output, so the forward is exercised too
        return jnp.sum(jnp.sin(fn(x, w, strides, padding, dimension_numbers=dn, **kwargs)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


CASES = [
    # spatial, c_in, c_out, kernel, strides, padding
    ((12, 9, 8), 8, 6, (3, 3, 3), (1, 1, 1), [(1, 1)] * 3),
    ((12, 9, 8), 8, 6, (3, 3, 3), (2, 2, 2), [(1, 1)] * 3),     # odd and even sizes at stride 2
    ((9, 10, 11), 5, 7, (3, 3, 3), (1, 2, 2), [(1, 1)] * 3),    # anisotropic stride (nnU-Net's first stages)
    ((9, 10, 11), 5, 7, (1, 3, 3), (1, 1, 1), [(0, 0), (1, 1), (1, 1)]),  # anisotropic kernel
    ((13, 10, 7), 1, 8, (3, 3, 3), (1, 1, 1), [(1, 1)] * 3),    # thin input: the per-tap forward on CPU
    ((13, 10, 7), 3, 5, (3, 3, 3), (2, 2, 2), [(1, 1)] * 3),
    ((5, 6, 7), 6, 4, (1, 1, 1), (1, 1, 1), [(0, 0)] * 3),
    ((16, 12), 4, 8, (3, 3), (1, 1), [(1, 1)] * 2),
    ((16, 13), 8, 16, (3, 3), (2, 2), [(1, 1)] * 2),
    ((12, 9, 8), 8, 6, (3, 3, 3), (1, 1, 1), "SAME"),
    ((12, 9, 8), 8, 6, (3, 3, 3), (2, 2, 2), "VALID"),
]


@pytest.mark.parametrize("spatial,c_in,c_out,kernel,strides,padding", CASES)
def test_same_function_and_gradients_as_lax(spatial, c_in, c_out, kernel, strides, padding):
    rng = np.random.default_rng(len(spatial) * 100 + c_in)
    x = jnp.asarray(rng.normal(size=(2, *spatial, c_in)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(*kernel, c_in, c_out)).astype(np.float32) / np.sqrt(np.prod(kernel) * c_in))
    ours = _value_and_grads(conv.conv_general_dilated, x, w, strides, padding)
    ref = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def _convolutions_in_gradient(fn, strides):
    x, w = jnp.ones((1, 8, 8, 8, 8)), jnp.ones((3, 3, 3, 8, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, SPECS[3])

    def loss(x, w):
        return jnp.sum(jnp.sin(fn(x, w, strides, [(1, 1)] * 3, dimension_numbers=dn)))

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text().count(" convolution(")


def test_cpu_gradient_takes_the_im2col_path():
    assert jax.default_backend() == "cpu"
    # XLA's gradient of a strided conv is the forward plus two convolutions; ours keeps only the forward.
    assert _convolutions_in_gradient(lax.conv_general_dilated, (2, 2, 2)) == 3
    assert _convolutions_in_gradient(conv.conv_general_dilated, (2, 2, 2)) == 1
    # stride 1: the input gradient stays XLA's (a forward conv), the kernel gradient is im2col
    assert _convolutions_in_gradient(lax.conv_general_dilated, (1, 1, 1)) == 3
    assert _convolutions_in_gradient(conv.conv_general_dilated, (1, 1, 1)) == 2


def test_small_convolutions_keep_xlas_gradient_unless_strided(monkeypatch):
    monkeypatch.setattr(conv, "MIN_OUTPUT_VOXELS", 8 ** 3 + 1)  # the 8^3 output below is one voxel short
    assert _convolutions_in_gradient(conv.conv_general_dilated, (1, 1, 1)) == 3
    assert _convolutions_in_gradient(conv.conv_general_dilated, (2, 2, 2)) == 1


def test_unsupported_convolutions_fall_through_to_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 9, 9, 9, 4)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 4)).astype(np.float32))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, SPECS[3])
    for kwargs in ({"rhs_dilation": (2, 2, 2)}, {"lhs_dilation": (2, 2, 2)}):
        a = conv.conv_general_dilated(x, w, (1, 1, 1), [(1, 1)] * 3, dimension_numbers=dn, **kwargs)
        b = lax.conv_general_dilated(x, w, (1, 1, 1), [(1, 1)] * 3, dimension_numbers=dn, **kwargs)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # more than 27 taps: XLA's gradient (a per-tap unroll would be thousands of ops)
    big = jnp.ones((4, 4, 4, 4, 4))
    assert _convolutions_in_gradient_big(big) == 3


def _convolutions_in_gradient_big(w):
    x = jnp.ones((1, 8, 8, 8, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, SPECS[3])

    def loss(x, w):
        return jnp.sum(jnp.sin(conv.conv_general_dilated(x, w, (4, 4, 4), "VALID", dimension_numbers=dn)))

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text().count(" convolution(")


def test_flax_conv_keeps_its_parameters():
    x = jnp.ones((1, 8, 8, 8, 2))
    plain = nn.Conv(4, (3, 3, 3), strides=2, padding=[(1, 1)] * 3)
    ours = nn.Conv(4, (3, 3, 3), strides=2, padding=[(1, 1)] * 3, conv_general_dilated=conv.conv_general_dilated)
    params = plain.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(plain.apply(params, x)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow  # about a minute on 2 cores (two whole train steps compiled)
def test_bench_conv_tiny_runs_and_prints_every_ratio(tmp_path):
    """scripts/bench_conv.py at its tiny size: every layer's and the whole step's ratio printed (no timing asserted)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "bench_conv.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conv.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [row["layer"] for row in figures["layers"]] == ["enc0.conv0", "enc0.conv1", "dec0.conv0", "enc1.conv0",
                                                           "enc1.conv1"]
    for row in figures["layers"]:
        assert f"| {row['layer']} |" in result.stdout
    assert {"xla_step_s", "medseg_step_s", "xla_compile_and_first_step_s"} <= set(figures["step"])
    assert "whole train step: xla " in result.stdout and "(xla / ours = " in result.stdout
