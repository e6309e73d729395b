"""SegResNet equals MONAI's, weight for weight: the converter, the interpolation, mixed precision and remat."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a test extra (make test installs it): SegResNet equivalence "
                                            "needs it")
monai_nets = pytest.importorskip("monai.networks.nets", reason="monai is a test extra (make test installs it): "
                                                               "SegResNet equivalence needs it")

from medseg_jax.errors import MedsegError  # noqa: E402
from medseg_jax.models.segresnet import SegResNet, upsample_linear_2x  # noqa: E402
from medseg_jax.transfer.monai_segresnet import convert, module_from_kwargs  # noqa: E402

TINY = dict(init_filters=8, in_channels=2, out_channels=3)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_model(seed=0, **kwargs):
    """MONAI's SegResNet with every parameter random (so norm affines and biases are exercised too)."""
    torch.manual_seed(seed)
    model = monai_nets.SegResNet(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def state_dict(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def torch_forward(model, x_channels_first: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.moveaxis(model(torch.from_numpy(x_channels_first)).numpy(), 1, -1)


def random_input(shape, channels=2, batch=2, seed=0) -> np.ndarray:
    """(N, C, *spatial) float32 for torch; ours is np.moveaxis(x, 1, -1)."""
    return np.random.default_rng(seed).standard_normal((batch, channels, *shape)).astype(np.float32)


@pytest.mark.parametrize("spatial", [(6, 5, 3), (4, 7), (1, 2, 2)])
def test_upsample_linear_2x_equals_torch_interpolate(spatial):
    x = random_input(spatial, channels=3)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode=mode, align_corners=False)
    ours = upsample_linear_2x(jnp.asarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(ours, np.moveaxis(expected.numpy(), 1, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, spatial", [
    (dict(spatial_dims=3, upsample_mode="nontrainable"), (32, 16, 16)),
    (dict(spatial_dims=3, upsample_mode="deconv"), (16, 16, 16)),
    (dict(spatial_dims=2, upsample_mode="nontrainable", blocks_down=(1, 2, 2), blocks_up=(1, 1)), (32, 16)),
    (dict(spatial_dims=2, upsample_mode="deconv", blocks_down=(1, 2, 2), blocks_up=(1, 1)), (16, 32)),
    # MONAI's plain "instance" (no affine), leaky relu, group-norm via the deprecated norm_name, fewer levels
    (dict(spatial_dims=3, norm="instance", act="leakyrelu", blocks_down=(1, 2, 1), blocks_up=(2, 1)), (8, 8, 16)),
    (dict(spatial_dims=3, norm_name="group", num_groups=4, act=("swish", {}), blocks_down=(1, 1), blocks_up=(1,),
          upsample_mode="deconv"), (8, 8, 8)),
])
def test_equals_monai(kwargs, spatial):
    model = torch_model(**TINY, **kwargs)
    module = module_from_kwargs(**TINY, **kwargs)
    params = convert(state_dict(model), module)
    x = random_input(spatial, batch=1)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: compare float32 with float32
        ours = jax.jit(module.apply)({"params": params}, np.moveaxis(x, 1, -1))
    expected = torch_forward(model, x)
    assert ours.dtype == jnp.float32 and ours.shape == expected.shape == (1, *spatial, 3)
    assert rel_l2(ours, expected) < 1e-4


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(upsample_mode="deconv"),
    dict(spatial_dims=2, init_filters=16, blocks_down=(1, 2, 2, 4, 4), blocks_up=(1, 1, 1, 1)),
    dict(norm=("INSTANCE", {"affine": True}), in_channels=4),
])
def test_parameter_count_equals_monai(kwargs):
    model = monai_nets.SegResNet(**kwargs)
    module = module_from_kwargs(**kwargs)
    shape = (1, *module.total_downsampling(), kwargs.get("in_channels", 1))
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
    assert ours == sum(p.numel() for p in model.parameters())


def test_default_module_matches_monai_defaults():
    assert module_from_kwargs() == SegResNet(num_classes=2, in_channels=1, init_filters=8, blocks_down=(1, 2, 2, 4),
                                             blocks_up=(1, 1, 1), num_groups=8, upsample_mode="nontrainable")
    assert SegResNet().total_downsampling() == (8, 8, 8)
    assert SegResNet(spatial_dims=2, blocks_down=(1, 1, 1), blocks_up=(1, 1)).total_downsampling() == (4, 4)


@pytest.fixture(scope="module")
def small():
    kwargs = dict(**TINY, blocks_down=(1, 1, 1), blocks_up=(1, 1), upsample_mode="deconv")
    return state_dict(torch_model(**kwargs)), module_from_kwargs(**kwargs)


def test_wrong_shape_names_the_key(small):
    sd, module = small
    sd = dict(sd, **{"down_layers.1.0.conv.weight": np.zeros((16, 4, 3, 3, 3), np.float32)})
    with pytest.raises(MedsegError, match=r"'down_layers\.1\.0\.conv\.weight' has shape \(16, 4, 3, 3, 3\)"):
        convert(sd, module)


def test_extra_key_is_named(small):
    sd, module = small
    with pytest.raises(MedsegError, match=r"does not have: up_layers\.1\.5\.norm1\.weight"):
        convert(dict(sd, **{"up_layers.1.5.norm1.weight": np.ones(8, np.float32)}), module)


@pytest.mark.parametrize("key", [
    "up_samples.0.1.deconv.bias", "down_layers.2.1.norm2.weight", "conv_final.2.conv.bias", "convInit.conv.weight"])
def test_missing_key_is_named(small, key):
    sd, module = small
    with pytest.raises(MedsegError, match=f"missing key '{key}'"):
        convert({k: v for k, v in sd.items() if k != key}, module)


def test_encoder_only_converts_only_the_encoder(small):
    sd, module = small
    full = convert(sd, module)
    encoder = convert({k: v for k, v in sd.items() if not k.startswith("up_layers.")}, module, encoder_only=True)
    assert sorted(encoder) == ["convInit", "down_layers_0_1", "down_layers_1_0", "down_layers_1_1",
                               "down_layers_2_0", "down_layers_2_1"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, encoder, {k: full[k] for k in encoder})
    with pytest.raises(MedsegError, match=r"missing key 'down_layers\.1\.1\.conv1\.conv\.weight'"):
        convert({k: v for k, v in sd.items() if k != "down_layers.1.1.conv1.conv.weight"}, module, encoder_only=True)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(norm="batch"), "norm"),
    (dict(norm=("BATCH", {})), "norm"),
    (dict(upsample_mode="pixelshuffle"), "upsample_mode"),
    (dict(act="prelu"), "act"),
    (dict(act=("gelu", {})), "act"),
    (dict(norm_name="instance"), "norm_name"),
    (dict(blocks_up=(1, 1)), "blocks_up"),
    (dict(init_filters=12), "init_filters"),
    (dict(spatial_dims=1), "spatial_dims"),
    (dict(channels=4), "channels"),
])
def test_unsupported_arguments_are_named(kwargs, argument):
    with pytest.raises(MedsegError, match=f"argument '{argument}'"):
        module_from_kwargs(**kwargs)


def test_bad_input_shape_is_refused():
    module = SegResNet(num_classes=2, in_channels=1, blocks_down=(1, 1), blocks_up=(1,))
    with pytest.raises(ValueError, match="not divisible by"):
        module.init(jax.random.key(0), jnp.zeros((1, 8, 7, 8, 1)))
    with pytest.raises(ValueError, match="in_channels is 1"):
        module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 2)))


@pytest.fixture(scope="module")
def two_levels():
    kwargs = dict(**TINY, blocks_down=(1, 1), blocks_up=(1,))
    model, module = torch_model(**kwargs), module_from_kwargs(**kwargs)
    return convert(state_dict(model), module), module, model


def test_bfloat16_is_close(two_levels):
    params, module, model = two_levels
    x = random_input((8, 8, 8), batch=1)
    half = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, np.moveaxis(x, 1, -1))
    assert half.dtype == jnp.float32
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))
    assert rel_l2(half, torch_forward(model, x)) < 5e-2


def test_remat_gives_identical_outputs_and_gradients(two_levels):
    params, module, _ = two_levels
    x = jnp.asarray(np.moveaxis(random_input((8, 8, 8), batch=1), 1, -1))

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, x) ** 2)

    plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, module)
    remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, module.clone(remat=True))
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(remat)
    # bit-identical on CPU; a tolerance leaves room for other backends fusing the recomputation differently
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)


def test_dropout_is_channel_dropout_in_training_only(two_levels):
    params, _, _ = two_levels
    assert module_from_kwargs(dropout_prob=0.5).dropout_prob == 0.5
    # convInit, the dropout and one residual block; the intermediates hold the dropout's output
    probe = SegResNet(num_classes=3, in_channels=2, blocks_down=(1,), blocks_up=(), dropout_prob=0.5,
                      use_conv_final=False)
    variables = {"params": {k: params[k] for k in ("convInit", "down_layers_0_1")}}
    x = np.moveaxis(random_input((4, 4, 4)), 1, -1)  # two samples: one draw per (sample, channel)

    @functools.partial(jax.jit, static_argnums=0)
    def dropout_output(train):
        _, state = probe.apply(variables, x, train=train, rngs={"dropout": jax.random.key(3)},
                               capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout))
        return state["intermediates"]["Dropout_0"]["__call__"][0]

    kept, dropped = np.asarray(dropout_output(False)), np.asarray(dropout_output(True))
    assert np.all(kept != 0)
    zero = np.all(dropped == 0, axis=(1, 2, 3), keepdims=True)  # (N, 1, 1, 1, C): whole channels dropped
    assert zero.any() and not zero.all()
    np.testing.assert_allclose(dropped, np.where(zero, 0.0, 2 * kept), rtol=1e-6)  # the rest scaled by 1/(1 - p)
