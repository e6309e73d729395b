import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.models.layers import UpsampleConv, depth_to_space
from medseg_jax.models.unet import UNet


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
    dense_bias = jnp.tile(tvars["params"]["bias"], volume)
    ours = UpsampleConv(features, strides).apply({"params": {"Dense_0": {"kernel": dense_kernel,
                                                                         "bias": dense_bias}}}, x)
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
    variables = model.init(jax.random.key(0), x)
    outputs = model.apply(variables, x, train=True)
    assert [o.shape for o in outputs] == [(2, 16, 16, 8, 3), (2, 8, 8, 4, 3)]
    assert model.apply(variables, x).shape == (2, 16, 16, 8, 3)
    assert model.total_downsampling() == (4, 4, 4)


def test_unet_anisotropic_strides():
    model = UNet(num_classes=2, features=(4, 8, 16), strides=((1, 1, 1), (2, 2, 1), (2, 2, 2)))
    x = jnp.zeros((1, 16, 16, 6, 1))
    assert model.apply(model.init(jax.random.key(0), x), x).shape == (1, 16, 16, 6, 2)
    assert model.total_downsampling() == (4, 4, 2)
