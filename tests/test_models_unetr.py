"""UNETR: weight-exact equivalence with MONAI's UNETR through the state-dict converter, and the converter's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.models.unetr import ENCODER_PARAMS, UNETR
from medseg_jax.transfer.monai_unetr import convert, module_from_kwargs

torch = pytest.importorskip("torch", reason="torch is a test extra (make test installs it): UNETR equivalence needs it")
monai_nets = pytest.importorskip("monai.networks.nets",
                                 reason="monai is a test extra (make test installs it): UNETR equivalence needs it")

TINY = dict(in_channels=2, out_channels=3, img_size=(32, 32, 16), feature_size=8, hidden_size=48, mlp_dim=96,
            num_heads=4)


def cross_attention_key(key: str) -> bool:
    """MONAI issue 8845: TransformerBlock creates cross-attention weights it never uses."""
    return ".cross_attn." in key or ".norm_cross_attn." in key


def monai_unetr(seed=0, **kwargs):
    """A MONAI UNETR in eval mode with every parameter perturbed (so norm affines and zero-init biases are
    distinguishable from their defaults) and its state dict as numpy."""
    torch.manual_seed(seed)
    model = monai_nets.UNETR(**kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


def channels_last(t):
    return jnp.asarray(np.moveaxis(t.numpy(), 1, -1))


def fast_jit(fn, *args):
    """`jax.jit(fn)(*args)` compiled at XLA's lowest backend optimisation level: the 12 unrolled transformer blocks
    otherwise take most of this file's time to compile on a small CPU; the numbers computed are the same function."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def random_params(module, x, seed=0) -> dict:
    """Random params of the template's shapes, without `module.init` (compiling its random initialisers for every
    parameter shape takes tens of seconds on a small CPU)."""
    template = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32), template)


def rel_l2(ours, reference) -> float:
    return float(np.linalg.norm(np.asarray(ours) - reference) / np.linalg.norm(reference))


def apply_capturing_vit(module, params, x):
    """Our logits, plus the `vit` submodule's outputs (final LayerNorm output, hidden state after every block)."""
    logits, state = fast_jit(lambda p, v: module.apply({"params": p}, v, mutable=["intermediates"],
                                                       capture_intermediates=lambda mdl, _: mdl.name == "vit"),
                             params, x)
    return logits, state["intermediates"]["vit"]["__call__"][0]


@pytest.fixture(scope="module")
def tiny():
    model, state = monai_unetr(**TINY)
    module = module_from_kwargs(**TINY)
    params = convert(state, module)
    x = torch.randn(2, TINY["in_channels"], *TINY["img_size"])
    with torch.no_grad():
        reference = model(x).numpy()
    return dict(model=model, state=state, module=module, params=params, x=x, reference=reference)


def test_logits_and_encoder_equal_monai_3d(tiny):
    logits, (vit_out, hidden) = apply_capturing_vit(tiny["module"], tiny["params"], channels_last(tiny["x"]))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 32, 32, 16, 3)
    assert rel_l2(np.moveaxis(np.asarray(logits), -1, 1), tiny["reference"]) < 1e-4
    with torch.no_grad():
        ref_out, ref_hidden = tiny["model"].vit(tiny["x"])
    assert len(hidden) == len(ref_hidden) == 12
    assert rel_l2(vit_out, ref_out.numpy()) < 1e-4
    for i in (3, 6, 9):  # the hidden states UNETR's encoder2..4 read
        assert rel_l2(hidden[i], ref_hidden[i].numpy()) < 1e-4


@pytest.mark.parametrize("variant", [
    # 2D, UnetBasicBlock instead of UnetResBlock, group norm with affine params, non-square grid
    dict(spatial_dims=2, img_size=(32, 48), res_block=False, norm_name=("group", {"num_groups": 4})),
    # no conv blocks in UnetrPrUpBlock, perceptron patch embedding, qkv bias, affine instance norm
    dict(conv_block=False, proj_type="perceptron", qkv_bias=True, norm_name=("instance", {"affine": True})),
], ids=["2d-basic-group", "3d-noconv-perceptron-qkvbias-affine"])
def test_logits_equal_monai_variants(variant):
    kwargs = {**TINY, **variant}
    model, state = monai_unetr(seed=1, **kwargs)
    module = module_from_kwargs(**kwargs)
    x = torch.randn(1, kwargs["in_channels"], *kwargs["img_size"])
    with torch.no_grad():
        reference = model(x).numpy()
    ours = fast_jit(module.apply, {"params": convert(state, module)}, channels_last(x))
    assert rel_l2(np.moveaxis(np.asarray(ours), -1, 1), reference) < 1e-4


def test_param_count_matches_monai_without_unused_cross_attention(tiny):
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tiny["params"]))
    monai = sum(p.numel() for name, p in tiny["model"].named_parameters() if not cross_attention_key(name))
    assert ours == monai
    assert any(cross_attention_key(k) for k in tiny["state"])  # the converter did have to skip them
    assert all(leaf.dtype == np.float32 and isinstance(leaf, np.ndarray)
               for leaf in jax.tree_util.tree_leaves(tiny["params"]))


def test_converter_names_bad_keys(tiny):
    state, module = tiny["state"], tiny["module"]
    key = "decoder3.conv_block.conv1.conv.weight"
    wrong = dict(state)
    wrong[key] = np.zeros((1, 2, 3, 3, 3), np.float32)
    with pytest.raises(MedsegError, match=key.replace(".", r"\.")):
        convert(wrong, module)
    extra = {**state, "decoder9.conv.weight": np.zeros((1,), np.float32)}
    with pytest.raises(MedsegError, match=r"decoder9\.conv\.weight"):
        convert(extra, module)
    missing = {k: v for k, v in state.items() if k != "vit.blocks.7.attn.qkv.weight"}
    with pytest.raises(MedsegError, match=r"vit\.blocks\.7\.attn\.qkv\.weight"):
        convert(missing, module)
    with pytest.raises(MedsegError, match="norm_name"):
        module_from_kwargs(**TINY, norm_name="batch")
    with pytest.raises(MedsegError, match="pos_embed_type"):
        module_from_kwargs(**TINY, pos_embed_type="sincos")


def test_encoder_only_conversion(tiny):
    module, state = tiny["module"], tiny["state"]
    # only the encoder's keys, plus a decoder key of a different shape that must be ignored
    encoder_state = {k: v for k, v in state.items() if k.startswith("vit.")}
    encoder_state["out.conv.conv.weight"] = np.zeros((7,), np.float32)
    encoder = convert(encoder_state, module, encoder_only=True)
    assert set(encoder) == set(ENCODER_PARAMS) == {"vit"}
    from_full = convert(state, module, encoder_only=True)  # a full state dict: the decoder keys are ignored
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_full, encoder)

    # merged into fresh params: the encoder is exactly the full conversion's (whose ViT outputs equal MONAI's, see
    # test_logits_and_encoder_equal_monai_3d), the decoder keeps its fresh initialisation
    fresh = random_params(module, channels_last(tiny["x"]))
    merged = {**fresh, **encoder}
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tiny["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged["vit"], tiny["params"]["vit"])
    for name in set(fresh) - set(ENCODER_PARAMS):
        jax.tree_util.tree_map(np.testing.assert_array_equal, merged[name], fresh[name])


def test_bfloat16_close_to_float32(tiny):
    x = channels_last(tiny["x"])
    module = tiny["module"].clone(dtype=jnp.bfloat16)
    ours = fast_jit(module.apply, {"params": tiny["params"]}, x)
    assert ours.dtype == jnp.float32
    assert rel_l2(np.moveaxis(np.asarray(ours), -1, 1), tiny["reference"]) < 5e-2


@pytest.mark.slow  # 25-35 s on 2 cores; the U-Nets' and SegResNet's remat stay in `make test`
def test_remat_same_outputs_and_gradients():
    module = UNETR(num_classes=2, in_channels=1, img_size=(16, 32), feature_size=4, hidden_size=16, mlp_dim=16,
                   num_heads=2, spatial_dims=2)
    x = jax.random.normal(jax.random.key(1), (1, 16, 32, 1))
    params = random_params(module, x)
    remat = module.clone(remat=True)
    assert jax.tree_util.tree_structure(random_params(remat, x)) == jax.tree_util.tree_structure(params)

    def grad_and_output(m):  # the gradient of the output's sum, and the output, in one compilation
        def f(p):
            out = m.apply({"params": p}, x)
            return jnp.sum(out), out
        return fast_jit(jax.grad(f, has_aux=True), params)

    grads, out = grad_and_output(module)
    grads_remat, out_remat = grad_and_output(remat)
    np.testing.assert_allclose(out_remat, out, rtol=1e-6, atol=1e-6)
    # the same function; XLA may fuse the recomputation differently, so allow float rounding
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_remat, grads)
    assert module.total_downsampling() == (16, 16)


def test_input_must_match_img_size():
    module = UNETR(num_classes=2, in_channels=1, img_size=(16, 16), feature_size=4, hidden_size=16, mlp_dim=16,
                   num_heads=2, spatial_dims=2)
    with pytest.raises(ValueError, match="expects input"):
        module.init(jax.random.key(0), jnp.zeros((1, 32, 16, 1)))
