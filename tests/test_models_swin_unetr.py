"""SwinUNETR (v1 and v2): weight-exact equivalence with MONAI's SwinUNETR through the state-dict converter, the
encoder-only (self-supervised pre-training) conversion, mixed precision, remat, and the converter's errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.models.swin_unetr import (
    ENCODER_PARAMS,
    SwinUNETR,
    compute_mask,
    relative_position_index,
    window_partition,
    window_reverse,
)
from medseg_jax.transfer.monai_swin_unetr import convert, module_from_kwargs

torch = pytest.importorskip("torch",
                            reason="torch is a test extra (make test installs it): SwinUNETR equivalence needs it")
monai_swin = pytest.importorskip("monai.networks.nets.swin_unetr",
                                 reason="monai is a test extra (make test installs it): SwinUNETR equivalence needs it")

# feature_size 12 is MONAI's minimum; stages 1-3 have a shifted-window block (the 4th stage's map is never larger
# than the window, so MONAI does not shift there)
TINY = dict(in_channels=1, out_channels=3, feature_size=12, depths=(2, 2, 2, 1), num_heads=(1, 2, 3, 4))
# 2D: 128 x 64 input -> stage-1 map 64 x 32, padded to windows of 5 (65 x 35), shifted by 2; stage 4 (8 x 4) shrinks
# the window to (5, 4) with shift (2, 0) (MONAI then indexes the bias table with the top-left block of the configured
# 5 x 5 window's index). Inputs are sized so that the bottleneck has >= 4 voxels: instance norm over 1-2 voxels
# amplifies float rounding (and torch refuses a single voxel).
TINY_2D = dict(TINY, depths=(2, 1, 1, 2), spatial_dims=2, window_size=5, norm_name=("group", {"num_groups": 4}))
SHAPE_2D = (2, 1, 128, 64)


def monai_swin_unetr(seed=0, **kwargs):
    """A MONAI SwinUNETR in eval mode with every parameter perturbed (so LayerNorm affines, zero-init biases and the
    small relative position tables are distinguishable from their defaults) and its state dict as numpy."""
    torch.manual_seed(seed)
    model = monai_swin.SwinUNETR(**kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


def is_v2_conv(key: str) -> bool:
    return re.search(r"\.layers\dc\.", key) is not None


def channels_last(t):
    return jnp.asarray(np.moveaxis(t.numpy(), 1, -1))


def fast_jit(fn, *args):
    """`jax.jit(fn)(*args)` compiled at XLA's lowest backend optimisation level (compiling dominates this file's
    time on a small CPU; the function computed is the same)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def random_params(module, x, seed=0) -> dict:
    """Fresh random params of the template's shapes, without compiling `module.init`'s many random initialisers."""
    template = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32), template)


def rel_l2(ours, reference) -> float:
    return float(np.linalg.norm(np.asarray(ours, np.float64) - reference) / np.linalg.norm(reference))


def num_params(tree) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def torch_logits(model, x) -> np.ndarray:
    with torch.no_grad():
        return np.moveaxis(model(x).numpy(), 1, -1)


@pytest.fixture(scope="module")
def tiny_2d():
    model, state = monai_swin_unetr(**TINY_2D)
    module = module_from_kwargs(**TINY_2D)
    params = convert(state, module)
    x = torch.randn(*SHAPE_2D)
    return dict(model=model, state=state, module=module, params=params, x=x, reference=torch_logits(model, x))


def test_logits_equal_monai_3d():
    # 64 x 64 x 32 with window 7: stage 1 (32 x 32 x 16) pads to 35 x 35 x 21 and shifts by 3; stage 3 (8 x 8 x 4)
    # shrinks the window to (7, 7, 4) with shift (3, 3, 0); stage 4 (4 x 4 x 2) to (4, 4, 2) unshifted
    kwargs = dict(TINY, window_size=7)
    model, state = monai_swin_unetr(**kwargs)
    module = module_from_kwargs(**kwargs)
    params = convert(state, module)
    assert all(isinstance(leaf, np.ndarray) and leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))
    assert num_params(params) == sum(p.numel() for p in model.parameters())
    assert module.total_downsampling() == (32, 32, 32)
    x = torch.randn(1, 1, 64, 64, 32)
    ours = fast_jit(module.apply, {"params": params}, channels_last(x))
    assert ours.dtype == jnp.float32 and ours.shape == (1, 64, 64, 32, 3)
    assert rel_l2(ours, torch_logits(model, x)) < 1e-4


def test_logits_equal_monai_2d(tiny_2d):
    assert num_params(tiny_2d["params"]) == sum(p.numel() for p in tiny_2d["model"].parameters())
    ours = fast_jit(tiny_2d["module"].apply, {"params": tiny_2d["params"]}, channels_last(tiny_2d["x"]))
    assert ours.shape == (2, 128, 64, 3)
    assert rel_l2(ours, tiny_2d["reference"]) < 1e-4


def test_logits_equal_monai_3d_v2_variant():
    """v2 residual conv blocks, "mergingv2", an anisotropic window (stage 3 shrinks it on one axis only), 2 input
    channels, patch norm, no qkv bias, no output normalisation and affine instance norm."""
    kwargs = dict(TINY, depths=(2, 1, 1, 1), in_channels=2, use_v2=True, downsample="mergingv2", window_size=(4, 7, 3),
                  patch_norm=True, qkv_bias=False, normalize=False, norm_name=("instance", {"affine": True}))
    model, state = monai_swin_unetr(seed=1, **kwargs)
    assert any(k.startswith("swinViT.layers3c.0.") for k in state)
    module = module_from_kwargs(**kwargs)
    params = convert(state, module)
    assert num_params(params) == sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 2, 32, 64, 64)
    ours = fast_jit(module.apply, {"params": params}, channels_last(x))
    assert rel_l2(ours, torch_logits(model, x)) < 1e-4


def test_window_helpers_match_monai():
    for window, dims, shift in [((7, 7, 7), (21, 35, 21), (3, 3, 3)), ((4, 7, 4), (4, 14, 4), (0, 3, 0)),
                                ((5, 5), (35, 20), (2, 2))]:
        np.testing.assert_array_equal(
            relative_position_index(window),
            monai_swin.WindowAttention(12, 1, window).relative_position_index.numpy())
        np.testing.assert_array_equal(compute_mask(dims, window, shift),
                                      monai_swin.compute_mask(list(dims), window, shift, "cpu").numpy())
        x = np.random.default_rng(0).standard_normal((2, *dims, 3)).astype(np.float32)
        windows = window_partition(x, window)
        np.testing.assert_array_equal(windows.reshape(-1, *windows.shape[2:]),
                                      monai_swin.window_partition(torch.from_numpy(x), window).numpy())
        np.testing.assert_array_equal(window_reverse(windows, window, dims), x)


def test_encoder_only_merges_into_fresh_params_and_hidden_states_equal_monai():
    kwargs = dict(TINY_2D, use_v2=True)
    model, state = monai_swin_unetr(seed=2, **kwargs)
    module = module_from_kwargs(**kwargs)
    x = torch.randn(*SHAPE_2D)
    fresh = random_params(module, channels_last(x), seed=3)
    # only the encoder keys, plus a decoder key of the wrong shape: everything outside swinViT is ignored
    encoder_state = {k: v for k, v in state.items() if k.startswith("swinViT.")}
    encoder_state["decoder1.transp_conv.conv.weight"] = np.zeros((1, 2, 3), np.float32)
    encoder = convert(encoder_state, module, encoder_only=True)
    assert set(encoder) == set(ENCODER_PARAMS) == {"swinViT"}
    assert "layers2c" in encoder["swinViT"]
    merged = {**fresh, **encoder}
    for (path, leaf), (_, fresh_leaf) in zip(jax.tree_util.tree_leaves_with_path(merged),
                                             jax.tree_util.tree_leaves_with_path(fresh)):
        if path[0].key == "swinViT":
            expected = encoder
            for p in path:
                expected = expected[p.key]
            np.testing.assert_array_equal(leaf, expected)
        else:
            np.testing.assert_array_equal(leaf, fresh_leaf)

    ours = fast_jit(lambda p, v: module.apply({"params": p}, v, method=SwinUNETR.swin_hidden_states),
                    merged, channels_last(x))
    with torch.no_grad():
        reference = model.swinViT(x, model.normalize)
    assert len(ours) == len(reference) == 5
    for a, b in zip(ours, reference):
        assert a.shape == np.moveaxis(b.numpy(), 1, -1).shape
        assert rel_l2(a, np.moveaxis(b.numpy(), 1, -1)) < 1e-4

    # MONAI's self-supervised checkpoint (model_swinvit.pt["state_dict"], what SwinUNETR.load_from reads): keys
    # "module.patch_embed.*" / "module.layersN.0.*", no v2 conv blocks, other heads alongside
    ssl = {"module." + k[len("swinViT."):]: v for k, v in encoder_state.items()
           if k.startswith("swinViT.") and not is_v2_conv(k)}
    ssl["module.rotation_head.weight"] = np.zeros((4, 96), np.float32)
    from_ssl = convert(ssl, module, encoder_only=True)
    without_convs = {k: v for k, v in encoder["swinViT"].items() if not k.endswith("c")}
    assert set(from_ssl["swinViT"]) == set(without_convs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_ssl["swinViT"], without_convs)
    # a full-model key style must carry v2's conv blocks
    with pytest.raises(MedsegError, match="swinViT.layers1c.0.layer.conv1.conv.weight"):
        convert({k: v for k, v in encoder_state.items() if not is_v2_conv(k)}, module, encoder_only=True)
    # an encoder key the architecture lacks is still an error
    with pytest.raises(MedsegError, match="swinViT.layers1.0.blocks.2.norm1.weight"):
        convert({**encoder_state, "swinViT.layers1.0.blocks.2.norm1.weight": np.ones(12, np.float32)}, module,
                encoder_only=True)


def test_bfloat16_compute_is_close_and_keeps_float32_params(tiny_2d):
    module = tiny_2d["module"].clone(dtype=jnp.bfloat16)
    x = channels_last(tiny_2d["x"])
    template = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(template))
    ours = fast_jit(module.apply, {"params": tiny_2d["params"]}, x)
    assert ours.dtype == jnp.float32
    assert rel_l2(ours, tiny_2d["reference"]) < 5e-2


@pytest.mark.slow  # 25-35 s on 2 cores; the U-Nets' and SegResNet's remat stay in `make test`
def test_remat_gives_identical_outputs_and_gradients():
    plain = SwinUNETR(num_classes=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), window_size=4,
                      spatial_dims=2, use_v2=True)
    remat = plain.clone(remat=True)
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 1))
    params = random_params(plain, x)

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, x, train=True) ** 2)

    value_a, grad_a = fast_jit(jax.value_and_grad(lambda p: loss(plain, p)), params)
    value_b, grad_b = fast_jit(jax.value_and_grad(lambda p: loss(remat, p)), params)
    # the recomputed forward may be fused differently: equal up to float32 rounding, which in this deep random
    # network reaches ~1e-5 per gradient leaf (as much as compiling the plain model at another XLA level changes them)
    np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
    assert jax.tree_util.tree_structure(grad_a) == jax.tree_util.tree_structure(grad_b)
    for a, b in zip(jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b)):
        assert rel_l2(a, np.asarray(b)) < 1e-4


def test_converter_errors_name_the_key(tiny_2d):
    state, module = tiny_2d["state"], tiny_2d["module"]
    key = "swinViT.layers2.0.blocks.0.attn.qkv.weight"
    with pytest.raises(MedsegError, match=f"'{key}' has shape \\(72, 12\\), the architecture needs \\(72, 24\\)"):
        convert({**state, key: np.zeros((72, 12), np.float32)}, module)
    with pytest.raises(MedsegError, match="decoder9.conv.weight"):
        convert({**state, "decoder9.conv.weight": np.zeros(3, np.float32)}, module)
    missing = "swinViT.layers4.0.downsample.norm.bias"
    with pytest.raises(MedsegError, match=f"missing key '{missing}'"):
        convert({k: v for k, v in state.items() if k != missing}, module)
    # the relative position index buffers are recomputed by the module: absent is as good as present
    params = convert({k: v for k, v in state.items() if not k.endswith("relative_position_index")}, module)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, tiny_2d["params"])
    # a v1 checkpoint into a v2 module
    with pytest.raises(MedsegError, match="missing key 'swinViT.layers1c.0.layer.conv1.conv.weight'"):
        convert(state, module.clone(use_v2=True))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(use_hyena=True), "use_hyena"),
    (dict(hyena_stages=(True, False, False, False)), "hyena_stages"),
    (dict(patch_size=4), "patch_size"),
    (dict(downsample="pooling"), "downsample"),
    (dict(norm_name="batch"), "norm_name"),
    (dict(feature_size=16), "feature_size"),
    (dict(depths=(2, 2, 2)), "depths"),
    (dict(num_heads=(5, 2, 3, 4)), "num_heads"),
    (dict(spatial_dims=1), "spatial_dims"),
    (dict(dropout_path_rate=1.5), "dropout_path_rate"),
    (dict(not_an_argument=1), "not_an_argument"),
])
def test_module_from_kwargs_refuses_unsupported_arguments(kwargs, argument):
    with pytest.raises(MedsegError, match=f"'{argument}'"):
        module_from_kwargs(**{**TINY, **kwargs})


def test_module_from_kwargs_maps_monai_arguments():
    module = module_from_kwargs(**TINY, img_size=(96, 96, 96), use_checkpoint=True, use_flash_attention=True,
                                norm_layer=torch.nn.LayerNorm, hyena_kernel_size=5)
    assert module.remat and module.window_size == (7, 7, 7) and module.num_classes == 3
    assert module.downsample == "merging" and not module.use_v2
    with pytest.raises(ValueError, match="must divide by \\(32, 32\\)"):
        jax.eval_shape(module_from_kwargs(**TINY_2D).init, jax.random.key(0), jnp.zeros((1, 48, 32, 1)))
    # dropout and stochastic depth act in training (traced only: shapes and the "dropout" rng plumbing)
    dropping = module_from_kwargs(**TINY_2D, drop_rate=0.1, attn_drop_rate=0.1, dropout_path_rate=0.2)
    x = jnp.zeros((2, 64, 64, 1))
    params = jax.eval_shape(dropping.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda p: dropping.apply(p, x, train=True, rngs={"dropout": jax.random.key(1)}), params)
    assert out.shape == (2, 64, 64, 3) and out.dtype == jnp.float32
