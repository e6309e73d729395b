import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medseg_jax import losses
from medseg_jax.config import load_config
from medseg_jax.errors import MedsegError
from medseg_jax.train.step import make_loss_fn
from tests.conftest import REPO


def _labels(shape=(2, 8, 8, 4), classes=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, classes, shape))


def test_perfect_prediction_is_the_minimum():
    labels = _labels()
    perfect = 50.0 * jax.nn.one_hot(labels, 3)
    random = jax.random.normal(jax.random.key(0), perfect.shape)
    assert float(losses.dice_ce_loss(perfect, labels)) < 1e-4
    assert float(losses.dice_ce_loss(random, labels)) > 0.5


def test_soft_dice_value_by_hand():
    labels = jnp.array([[[[1, 1, 0, 0]]]])
    logits = jnp.log(jnp.array([[[[[0.5, 0.5], [0.5, 0.5], [1.0, 1e-30], [1.0, 1e-30]]]]]))  # p(1)=0.5,0.5,0,0
    # class 1: intersection 1.0, sum p 1.0, sum g 2 -> dice 2/3
    np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, smooth=0.0), 1 - 2 / 3, rtol=1e-5)


def test_gradients_are_finite():
    labels = _labels()
    logits = jax.random.normal(jax.random.key(1), labels.shape + (3,))
    grads = jax.grad(lambda x: losses.dice_ce_loss(x, labels))(logits)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_deep_supervision_weights_match_nnunet():
    np.testing.assert_allclose(losses.deep_supervision_weights(3), [2 / 3, 1 / 3, 0.0])
    assert losses.deep_supervision_weights(1) == [1.0]


def test_deep_supervision_loss_uses_downsampled_labels():
    labels = _labels((1, 8, 8, 4))
    outputs = [50.0 * jax.nn.one_hot(labels, 3), 50.0 * jax.nn.one_hot(labels[:, ::2, ::2, ::2], 3),
               jnp.zeros((1, 2, 2, 1, 3))]
    assert float(losses.deep_supervision_loss(outputs, labels, losses.dice_ce_loss)) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Every loss of the package, through `config.loss` (build_loss) so that the config path is exercised too.

K = 3
REGIONS = ((1, 2), (2,))
CASES = {  # id -> config.loss options
    "dice_ce": dict(name="dice_ce"),
    "dice_ce_weighted": dict(name="dice_ce", batch_dice=False, include_background=True, squared_pred=True,
                             class_weights=(0.5, 1.0, 2.0)),
    "dice": dict(name="dice"),
    "ce": dict(name="ce", class_weights=(1.0, 2.0, 3.0)),
    "focal": dict(name="focal", focal_alpha=0.25),
    "tversky": dict(name="tversky", tversky_alpha=0.3, tversky_beta=0.7),
    "focal_tversky": dict(name="focal_tversky", tversky_alpha=0.3, tversky_beta=0.7),
    "generalized_dice": dict(name="generalized_dice"),
    "generalized_dice_simple": dict(name="generalized_dice", gdl_weight_type="simple", batch_dice=False),
    "dice_cldice": dict(name="dice_cldice"),
    "dice_boundary": dict(name="dice_boundary", boundary_weight=0.1, boundary_max_distance=4),
    "regions": dict(name="dice_ce", regions=REGIONS),
}


def _build(case, **extra):
    return losses.build_loss(losses.loss_config(**{**CASES[case], **extra}))


def _channels(case):
    return len(REGIONS) if "regions" in CASES[case] else K


def _perfect_logits(case, labels):
    if "regions" in CASES[case]:
        return 50.0 * (2.0 * losses.region_targets(labels, REGIONS) - 1.0)
    return 50.0 * jax.nn.one_hot(labels, K)


def _floor(case, labels):
    """The loss's minimum on `labels`: 0 except for the boundary term (the negative mean inner depth)."""
    if CASES[case]["name"] != "dice_boundary":
        return 0.0
    phi = losses.capped_signed_distance(jax.nn.one_hot(labels, K), CASES[case]["boundary_max_distance"])
    return CASES[case]["boundary_weight"] * float(jnp.mean((jax.nn.one_hot(labels, K) * phi)[..., 1:]))


def _label_kinds():
    random = _labels((2, 8, 8, 4), K, seed=3)
    background = jnp.zeros((2, 8, 8, 4), jnp.int32)
    empty_class = jnp.asarray(np.random.default_rng(4).integers(0, 2, (2, 8, 8, 4)))  # class 2 absent
    block = np.zeros((2, 8, 8, 4), np.int64)
    block[:, 2:7, 1:6, 1:3] = 1
    block[:, 3:5, 2:4, 1:3] = 2
    return {"random": random, "background": background, "empty_class": empty_class, "block": jnp.asarray(block)}


@pytest.mark.parametrize("case", CASES)
def test_every_loss_perfect_prediction_is_its_minimum(case):
    loss_fn = _build(case)
    for kind, labels in _label_kinds().items():
        perfect = float(loss_fn(_perfect_logits(case, labels), labels))
        floor = _floor(case, labels)
        assert abs(perfect - floor) < 1e-4, (kind, perfect, floor)
        if kind == "background" and CASES[case]["name"] == "generalized_dice":
            continue  # no foreground voxel: every class weight is 0 and the loss is 0 whatever the logits (as MONAI)
        random = jax.random.normal(jax.random.key(5), labels.shape + (_channels(case),))
        assert float(loss_fn(random, labels)) > perfect + 1e-3, kind


@pytest.mark.parametrize("case", CASES)
def test_every_loss_has_finite_gradients(case):
    loss_fn = _build(case)
    for kind, labels in _label_kinds().items():
        for logits in (jax.random.normal(jax.random.key(6), labels.shape + (_channels(case),)),
                       _perfect_logits(case, labels)):
            value, grads = jax.value_and_grad(loss_fn)(logits, labels)
            assert bool(jnp.isfinite(value)), kind
            assert bool(jnp.all(jnp.isfinite(grads))), kind


@pytest.mark.parametrize("case", CASES)
def test_every_loss_jits_and_computes_bfloat16_in_float32(case):
    loss_fn = _build(case)
    labels = _labels((2, 8, 8, 4), K, seed=7)
    logits = jax.random.normal(jax.random.key(8), labels.shape + (_channels(case),))
    eager = loss_fn(logits, labels)
    jitted = jax.jit(loss_fn)(logits, labels)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-7)
    half = jax.jit(loss_fn)(logits.astype(jnp.bfloat16), labels)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, loss_fn(logits.astype(jnp.bfloat16).astype(jnp.float32), labels), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ignore_label", [K, -1])
def test_ignored_voxels_change_nothing(case, ignore_label):
    loss_fn = _build(case, ignore_label=ignore_label)
    labels = np.asarray(_labels((2, 8, 8, 4), K, seed=9))
    ignored = np.random.default_rng(10).random(labels.shape) < 0.3
    labels = jnp.asarray(np.where(ignored, ignore_label, labels))
    logits = jax.random.normal(jax.random.key(11), labels.shape + (_channels(case),))
    changed = jnp.where(jnp.asarray(ignored)[..., None], 10.0 * jax.random.normal(jax.random.key(12), logits.shape),
                        logits)
    np.testing.assert_allclose(loss_fn(changed, labels), loss_fn(logits, labels), rtol=1e-6, atol=1e-7)
    grads = jax.grad(loss_fn)(logits, labels)
    assert bool(jnp.all(jnp.isfinite(grads)))
    assert float(jnp.max(jnp.abs(jnp.where(jnp.asarray(ignored)[..., None], grads, 0.0)))) == 0.0
    assert float(jnp.max(jnp.abs(grads))) > 0.0


def test_ignored_voxels_are_as_if_absent():
    """Dice over the batch and CE with an ignore label equal the losses on the annotated voxels alone."""
    labels = np.asarray(_labels((2, 8, 8, 4), K, seed=13))
    ignored = np.random.default_rng(14).random(labels.shape) < 0.4
    logits = np.asarray(jax.random.normal(jax.random.key(15), labels.shape + (K,)))
    with_ignore = jnp.asarray(np.where(ignored, 255, labels))
    kept_logits, kept_labels = logits[~ignored][None, :, None, None], labels[~ignored][None, :, None, None]
    for fn in (losses.cross_entropy_loss, functools.partial(losses.soft_dice_loss, batch_dice=True),
               functools.partial(losses.cross_entropy_loss, class_weights=(1.0, 2.0, 0.5))):
        np.testing.assert_allclose(fn(logits, with_ignore, ignore_label=255), fn(kept_logits, kept_labels),
                                   rtol=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
    labels = _labels(seed=16)
    logits = 3.0 * jax.random.normal(jax.random.key(17), labels.shape + (3,))
    np.testing.assert_allclose(losses.focal_loss(logits, labels, gamma=0.0),
                               losses.cross_entropy_loss(logits, labels), rtol=1e-6)
    assert float(losses.focal_loss(logits, labels, gamma=2.0)) < float(losses.cross_entropy_loss(logits, labels))


def test_tversky_family_reduces_to_dice():
    labels = _labels(seed=18)
    logits = jax.random.normal(jax.random.key(19), labels.shape + (3,))
    options = dict(include_background=True, batch_dice=False)
    dice = losses.soft_dice_loss(logits, labels, **options)
    np.testing.assert_allclose(losses.tversky_loss(logits, labels, alpha=0.5, beta=0.5, **options), dice, rtol=1e-5)
    np.testing.assert_allclose(losses.focal_tversky_loss(logits, labels, alpha=0.5, beta=0.5, gamma=1.0, **options),
                               dice, rtol=1e-5)
    np.testing.assert_allclose(losses.generalized_dice_loss(logits[:1], labels[:1], weight_type="uniform",
                                                            include_background=True, smooth_nr=0.0, smooth_dr=0.0),
                               _pooled_dice(logits[:1], labels[:1]), rtol=1e-5)


def _pooled_dice(logits, labels):
    probs, onehot = jax.nn.softmax(logits), jax.nn.one_hot(labels, logits.shape[-1])
    return 1.0 - 2.0 * jnp.sum(probs * onehot) / (jnp.sum(probs) + jnp.sum(onehot))


def test_uniform_class_weights_change_nothing():
    labels = _labels(seed=20)
    logits = jax.random.normal(jax.random.key(21), labels.shape + (3,))
    np.testing.assert_allclose(losses.cross_entropy_loss(logits, labels, class_weights=(2.0, 2.0, 2.0)),
                               losses.cross_entropy_loss(logits, labels), rtol=1e-6)
    np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, class_weights=(1.0, 1.0, 1.0)),
                               losses.soft_dice_loss(logits, labels), rtol=1e-6)


def test_region_targets_and_region_loss():
    labels = jnp.asarray([[[0, 1, 2, 3]]])  # (1, 1, 4)
    targets = losses.region_targets(labels, ((1, 2, 3), (2, 3), (3,)))  # BraTS: whole tumour, core, enhancing
    assert targets.shape == (1, 1, 4, 3) and targets.dtype == jnp.float32
    np.testing.assert_array_equal(targets[0, 0], [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    labels = _labels((2, 8, 8, 4), 4, seed=22)
    regions = ((1, 2, 3), (2, 3), (3,))
    perfect = 50.0 * (2.0 * losses.region_targets(labels, regions) - 1.0)
    assert float(losses.region_loss(perfect, labels, regions)) < 1e-4
    assert float(losses.region_loss(jnp.zeros_like(perfect), labels, regions)) > 0.5
    loss_fn = make_loss_fn(losses.loss_config("dice_ce", regions=regions))
    outputs = [perfect, perfect[:, ::2, ::2, ::2], jnp.zeros((2, 2, 2, 1, 3))]  # deep supervision
    assert float(loss_fn(outputs, labels)) < 1e-4
    with pytest.raises(MedsegError, match="loss.regions"):
        loss_fn(jnp.zeros((2, 8, 8, 4, 4)), labels)  # 4 channels for 3 regions


def test_soft_skeleton_thins_a_bar_to_its_centre_line():
    bar = np.zeros((1, 9, 15, 1), np.float32)
    bar[0, 3:6, 2:13, 0] = 1.0  # 3 voxels thick
    skeleton = np.asarray(losses.soft_skeleton(jnp.asarray(bar), iterations=3))[0, ..., 0]
    assert np.all(skeleton <= bar[0, ..., 0] + 1e-6)  # inside the bar
    assert skeleton[4, 4:11].min() > 0.99  # its centre line
    assert skeleton[3].max() < 1e-6 and skeleton[5].max() < 1e-6  # not its sides
    perfect = 50.0 * jax.nn.one_hot(jnp.asarray(bar[..., 0], jnp.int32), 2)
    assert float(losses.soft_cldice_loss(perfect, jnp.asarray(bar[..., 0], jnp.int32))) < 1e-4


def test_capped_signed_distance_is_the_clipped_exact_map():
    grid = np.stack(np.meshgrid(*[np.arange(21)] * 3, indexing="ij"), -1)
    ball = (np.sum((grid - [10, 9, 11]) ** 2, -1) <= 36).astype(np.int64)
    labels = np.stack([ball, np.where(grid[..., 0] > 12, 2, ball)])  # a ball; a ball and a slab (class 2)
    exact = losses.signed_distance_maps(labels, 3)
    for cap in (3, 8, 40):
        capped = np.asarray(jax.jit(losses.capped_signed_distance, static_argnums=1)(jax.nn.one_hot(labels, 3), cap))
        np.testing.assert_allclose(capped, np.clip(exact, -cap, cap), atol=2e-6)
    assert exact.max() > 8 and exact.min() < -4  # the caps did clip
    # Empty and full classes have no map.
    np.testing.assert_array_equal(losses.capped_signed_distance(jnp.zeros((1, 4, 4, 1))), 0.0)
    np.testing.assert_array_equal(losses.capped_signed_distance(jnp.ones((1, 4, 4, 1))), 0.0)


def test_boundary_loss_with_precomputed_maps():
    labels = np.zeros((2, 12, 12, 10), np.int64)
    labels[:, 2:11, 1:10, 1:9] = 1
    labels[0, 4:8, 4:8, 3:7] = 2
    maps = losses.signed_distance_maps(labels, K)
    perfect = 50.0 * jax.nn.one_hot(labels, K)
    floor = float(np.mean((np.asarray(jax.nn.one_hot(labels, K)) * maps)[..., 1:]))
    assert floor < -0.05
    np.testing.assert_allclose(losses.boundary_loss(perfect, labels, distance_maps=maps), floor, rtol=1e-5)
    random = jax.random.normal(jax.random.key(31), perfect.shape)
    assert float(losses.boundary_loss(random, labels, distance_maps=maps)) > floor + 0.05
    for logits in (perfect, random):  # the in-step maps, capped beyond the labels' extent, give the same loss
        np.testing.assert_allclose(losses.boundary_loss(logits, labels, max_distance=20),
                                   losses.boundary_loss(logits, labels, distance_maps=maps), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# config.loss

def test_demo_loss_config_is_the_complete_default():
    demo = load_config(REPO / "experiments" / "demo_ct.py").loss.to_dict()
    assert demo == losses.loss_config().to_dict() == losses.LOSS_DEFAULTS
    from medseg_jax.experiments.base import get_config as base_config
    assert base_config().loss.to_dict() == losses.LOSS_DEFAULTS


def test_config_without_the_new_keys_builds_the_default_loss():
    old = ml_collections.ConfigDict(dict(name="dice_ce", dice_weight=1.0, ce_weight=1.0, batch_dice=True))
    labels = _labels(seed=23)
    outputs = [jax.random.normal(jax.random.key(24), labels.shape + (3,)),
               jax.random.normal(jax.random.key(25), (2, 4, 4, 2, 3))]
    expected = losses.dice_ce_loss(outputs[0], labels, batch_dice=True)  # 2 outputs: weights 1, 0
    np.testing.assert_allclose(make_loss_fn(old)(outputs, labels), expected, rtol=1e-6)
    np.testing.assert_allclose(make_loss_fn(losses.loss_config())(outputs, labels), expected, rtol=1e-6)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_make_loss_fn_builds_every_name(name):
    labels = _labels(seed=26)
    outputs = [jax.random.normal(jax.random.key(27), labels.shape + (3,)),
               jax.random.normal(jax.random.key(28), (2, 4, 4, 2, 3)), jnp.zeros((2, 2, 2, 1, 3))]
    value = make_loss_fn(losses.loss_config(name))(outputs, labels)
    assert value.shape == () and bool(jnp.isfinite(value))


def test_command_line_overrides_of_loss_options():
    config = load_config(REPO / "experiments" / "demo_ct.py",
                         ["--config.loss.regions=((1,2),(2,))", "--config.loss.ignore_label=3",
                          "--config.loss.name=dice"])
    labels = jnp.asarray(np.where(np.asarray(_labels(seed=29)) == 0, 3, np.asarray(_labels(seed=29))))
    value = make_loss_fn(config.loss)(jnp.zeros(labels.shape + (2,)), labels)
    assert bool(jnp.isfinite(value))


@pytest.mark.parametrize("options, key", [
    (dict(name="dcie"), "loss.name"),
    (dict(nope=1), "loss.nope"),
    (dict(name="generalized_dice", gdl_weight_type="cube"), "loss.gdl_weight_type"),
    (dict(name="dice_ce", tversky_alpha=0.3), "loss.tversky_alpha"),  # set but not used by dice_ce
    (dict(name="dice_ce", focal_gamma=1.0), "loss.focal_gamma"),
    (dict(name="focal", regions=((1,),)), "loss.regions"),
    (dict(regions=(1, 2)), "loss.regions"),
    (dict(class_weights=(1.0, -1.0, 1.0)), "loss.class_weights"),
    (dict(name="tversky", class_weights=(1.0, 1.0, 1.0)), "loss.class_weights"),
    (dict(ignore_label=1.5), "loss.ignore_label"),
    (dict(dice_weight="one"), "loss.dice_weight"),
    (dict(batch_dice="yes"), "loss.batch_dice"),
    (dict(name="dice_cldice", cldice_alpha=2.0), "loss.cldice_alpha"),
    (dict(name="dice_cldice", cldice_iterations=1.5), "loss.cldice_iterations"),
    (dict(name="focal", focal_alpha=1.5), "loss.focal_alpha"),
])
def test_bad_loss_config_is_one_line_naming_the_key(options, key):
    config = ml_collections.ConfigDict(dict(losses.LOSS_DEFAULTS))
    with config.ignore_type():
        for k, v in options.items():
            config[k] = v
    with pytest.raises(MedsegError, match=key.replace(".", r"\.")) as info:
        make_loss_fn(config)
    assert "\n" not in str(info.value)


def test_class_weights_of_the_wrong_length_are_named_at_trace_time():
    loss_fn = make_loss_fn(losses.loss_config(class_weights=(1.0, 2.0)))
    labels = _labels(seed=30)
    with pytest.raises(MedsegError, match=r"loss\.class_weights"):
        loss_fn(jnp.zeros(labels.shape + (3,)), labels)
