import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.models.layers import UpsampleConv, depth_to_space
from medseg_jax.models.registry import build_model, model_config
from medseg_jax.models.unet import ResidualEncoderUNet, UNet


@pytest.mark.parametrize("strides", [(2, 2, 2), (2, 2, 1), (1, 2, 2)])
def test_upsample_conv_equals_conv_transpose(strides):
    """The 1x1x1-conv + depth-to-space form equals flax's ConvTranspose(kernel=stride) with the same weights."""
    features, channels = 3, 5
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 5, channels))
    transpose = nn.ConvTranspose(features, kernel_size=strides, strides=strides, padding="VALID")
    tvars = transpose.init(jax.random.key(1), x)
    # flax's ConvTranspose (transpose_kernel=False) convolves the dilated input with the kernel as stored, so output
    # voxel s*i + k takes kernel tap (stride - 1 - k): flip the taps to get the scatter form UpsampleConv uses.
    kernel = tvars["params"]["kernel"][::-1, ::-1, ::-1]  # (*strides, C_in, C_out)
    volume = int(np.prod(strides))
    dense_kernel = jnp.transpose(kernel.reshape(volume, channels, features), (1, 0, 2)).reshape(channels,
                                                                                                 volume * features)
    ours = UpsampleConv(features, strides).apply({"params": {"Dense_0": {"kernel": dense_kernel},
                                                             "bias": tvars["params"]["bias"]}}, x)
    expected = transpose.apply(tvars, x)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_depth_to_space_places_each_channel_block():
    x = jnp.arange(2 * 2 * 8, dtype=jnp.float32).reshape(1, 1, 2, 2, 8)
    y = depth_to_space(x, (2, 2, 2))
    assert y.shape == (1, 2, 4, 4, 1)
    # output voxel (a, 2b + j, 2c + k) comes from input (0, b, c) channel a*4 + j*2 + k
    assert float(y[0, 1, 3, 2, 0]) == float(x[0, 0, 1, 1, 1 * 4 + 1 * 2 + 0])


def test_unet_shapes_and_deep_supervision():
    model = UNet(num_classes=3, features=(4, 8, 16), deep_supervision=True)
    x = jnp.zeros((2, 16, 16, 8, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    apply = jax.jit(model.apply, static_argnames="train")  # one compilation, not one per operation
    outputs = apply(variables, x, train=True)
    assert [o.shape for o in outputs] == [(2, 16, 16, 8, 3), (2, 8, 8, 4, 3)]
    assert apply(variables, x).shape == (2, 16, 16, 8, 3)
    assert model.total_downsampling() == (4, 4, 4)


def test_unet_anisotropic_strides():
    model = UNet(num_classes=2, features=(4, 8, 16), strides=((1, 1, 1), (2, 2, 1), (2, 2, 2)))
    x = jnp.zeros((1, 16, 16, 6, 1))
    assert jax.jit(model.apply)(jax.jit(model.init)(jax.random.key(0), x), x).shape == (1, 16, 16, 6, 2)
    assert model.total_downsampling() == (4, 4, 2)


@pytest.mark.parametrize("name", ["plain_unet", "resenc_unet"])
def test_remat_gives_identical_outputs_and_gradients(name):
    config = model_config(name, features=(4, 8), deep_supervision=True)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4, 2))
    plain = build_model(config, num_classes=3, in_channels=2)
    config.remat = True
    remat = build_model(config, num_classes=3, in_channels=2)
    params = plain.init(jax.random.key(1), x)["params"]

    def loss(model, p):
        return sum(jnp.sum(o ** 2) for o in model.apply({"params": p}, x, train=True))

    np.testing.assert_array_equal(loss(plain, params), loss(remat, params))
    grads = [jax.tree.leaves(jax.grad(lambda p, m=m: loss(m, p))(params)) for m in (plain, remat)]
    scale = max(float(jnp.max(jnp.abs(g))) for g in grads[0])
    # conv biases before an instance norm have zero gradient in exact arithmetic: compare against the largest
    # gradient, not elementwise, or their float noise decides the test
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_bfloat16_compute_keeps_float32_params_and_logits_close():
    config = model_config("resenc_unet", features=(4, 8, 16))
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 8, 1))
    full = build_model(config, num_classes=3)
    config.dtype = "bfloat16"
    half = build_model(config, num_classes=3)
    params = full.init(jax.random.key(1), x)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(half.init(jax.random.key(1), x)))
    a, b = full.apply({"params": params}, x), half.apply({"params": params}, x)
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 5e-2


def test_resenc_uses_nnunet_block_counts_and_residual_skips():
    model = ResidualEncoderUNet(num_classes=2, features=(4, 8, 16, 16))
    assert model.stage_blocks() == (1, 3, 4, 6)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))["params"]
    assert "skip_conv" in params["encoder1"]["block0"]  # width changes 4 -> 8: projected skip
    assert "skip_conv" not in params["encoder3"]["block0"]  # 16 -> 16: identity skip (average-pooled)
    assert len(params["encoder2"]) == 4


def test_unknown_model_and_key_are_one_line_errors():
    from medseg_jax.errors import MedsegError

    with pytest.raises(MedsegError, match="unknown model 'vnet'"):
        model_config("vnet")
    with pytest.raises(MedsegError, match="model.blocks_per_stage"):
        model_config("plain_unet", blocks_per_stage=(1, 2))


@pytest.mark.parametrize("name, overrides, patch", [
    ("plain_unet", dict(features=(4, 8, 16)), (16, 16, 8)),
    ("resenc_unet", dict(features=(4, 8, 16)), (16, 16, 8)),
    ("unetr", dict(feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2), (32, 32, 16)),
    ("swin_unetr", dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), (32, 32, 32)),
    ("segresnet", dict(init_filters=8), (16, 16, 8)),
])
def test_every_registered_model_builds_from_its_config(name, overrides, patch):
    """Shapes only (jax.eval_shape): each model's config keys reach its module and the logits come out full size."""
    config = model_config(name, **overrides)
    model = build_model(config, num_classes=3, in_channels=2, patch_size=patch)
    x = jax.ShapeDtypeStruct((1, *patch, 2), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (1, *patch, 3) and out.dtype == jnp.float32
    assert all(p % f == 0 for p, f in zip(patch, model.total_downsampling()))
