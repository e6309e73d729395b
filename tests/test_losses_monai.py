"""The losses equal MONAI's (and torch's) on random logits and labels, 2D and 3D, for several option combinations.

MONAI takes channels first: logits (N, K, *spatial) with `softmax=True`, labels (N, 1, *spatial) with
`to_onehot_y=True`.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import losses

torch = pytest.importorskip("torch", reason="torch/MONAI are test extras (make test installs them)")
monai_losses = pytest.importorskip("monai.losses", reason="torch/MONAI are test extras (make test installs them)")

RTOL = 1e-5
SHAPES = {"2d": (3, 16, 12), "3d": (2, 10, 8, 6)}  # (N, *spatial)
K = 4


def _data(dims, seed=0, classes=K, empty_class=False):
    rng = np.random.default_rng(seed)
    shape = SHAPES[dims]
    logits = (2.0 * rng.standard_normal(shape + (classes,))).astype(np.float32)
    labels = rng.integers(0, classes - 1 if empty_class else classes, shape)  # empty_class: the last one absent
    return logits, labels


def _torch(logits, labels):
    """Channels-last numpy -> MONAI's channels-first torch tensors."""
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy())
    y = torch.from_numpy(labels[:, None].astype(np.int64))
    return x, y


def _check(ours, theirs):
    np.testing.assert_allclose(float(ours), float(theirs), rtol=RTOL)


DICE_OPTIONS = [
    dict(include_background=True, batch=False, squared_pred=False),
    dict(include_background=False, batch=False, squared_pred=False),
    dict(include_background=False, batch=True, squared_pred=False),
    dict(include_background=True, batch=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6),
    dict(include_background=False, batch=False, squared_pred=True, smooth_nr=1.0, smooth_dr=1.0),
    dict(include_background=True, batch=False, weight=[0.5, 1.0, 2.0, 0.0]),
    dict(include_background=False, batch=True, weight=[1.0, 3.0, 0.25]),
]


def _dice_kwargs(options):
    return dict(batch_dice=options.get("batch", False), include_background=options["include_background"],
                smooth_nr=options.get("smooth_nr", 1e-5), smooth_dr=options.get("smooth_dr", 1e-5),
                squared_pred=options.get("squared_pred", False))


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("options", DICE_OPTIONS)
def test_dice_equals_monai(dims, options):
    for seed, empty_class in ((0, False), (1, True)):
        logits, labels = _data(dims, seed, empty_class=empty_class)
        weight = options.get("weight")
        theirs = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, **options)(*_torch(logits, labels))
        class_weights = None
        if weight is not None:  # ours takes K weights, background first, and drops the background's with it
            class_weights = weight if options["include_background"] else [1.0] + weight
        _check(losses.soft_dice_loss(logits, labels, class_weights=class_weights, **_dice_kwargs(options)), theirs)


DICE_CE_OPTIONS = [
    dict(include_background=True, batch=False, lambda_dice=1.0, lambda_ce=1.0),
    dict(include_background=False, batch=True, lambda_dice=1.0, lambda_ce=1.0),
    dict(include_background=False, batch=False, squared_pred=True, lambda_dice=0.3, lambda_ce=1.7),
    dict(include_background=True, batch=True, lambda_dice=2.0, lambda_ce=0.5, weight=[0.2, 1.0, 2.0, 3.0]),
    dict(include_background=False, batch=False, smooth_nr=0.0, smooth_dr=1e-3, weight=[1.0, 0.5, 4.0, 1.0]),
]


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("options", DICE_CE_OPTIONS)
def test_dice_ce_equals_monai(dims, options):
    logits, labels = _data(dims, seed=2)
    weight = options.get("weight")
    monai_options = dict(options, weight=None if weight is None else torch.tensor(weight))
    theirs = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, **monai_options)(*_torch(logits, labels))
    ours = losses.dice_ce_loss(logits, labels, dice_weight=options["lambda_dice"] if "lambda_dice" in options else 1.0,
                               ce_weight=options.get("lambda_ce", 1.0), class_weights=weight, **_dice_kwargs(options))
    _check(ours, theirs)


TVERSKY_OPTIONS = [
    dict(alpha=0.5, beta=0.5, include_background=True, batch=False),
    dict(alpha=0.3, beta=0.7, include_background=False, batch=False),
    dict(alpha=0.7, beta=0.3, include_background=False, batch=True),
    dict(alpha=0.1, beta=0.9, include_background=True, batch=True, smooth_nr=0.0, smooth_dr=1e-4),
]


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("options", TVERSKY_OPTIONS)
def test_tversky_equals_monai(dims, options):
    for seed, empty_class in ((3, False), (4, True)):
        logits, labels = _data(dims, seed, empty_class=empty_class)
        theirs = monai_losses.TverskyLoss(softmax=True, to_onehot_y=True, **options)(*_torch(logits, labels))
        ours = losses.tversky_loss(logits, labels, alpha=options["alpha"], beta=options["beta"],
                                   batch_dice=options["batch"], include_background=options["include_background"],
                                   smooth_nr=options.get("smooth_nr", 1e-5), smooth_dr=options.get("smooth_dr", 1e-5))
        _check(ours, theirs)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
@pytest.mark.parametrize("include_background, batch", [(True, False), (False, False), (False, True), (True, True)])
def test_generalized_dice_equals_monai(dims, w_type, include_background, batch):
    for seed, empty_class in ((5, False), (6, True)):  # an empty class has an infinite weight, replaced as MONAI
        logits, labels = _data(dims, seed, empty_class=empty_class)
        theirs = monai_losses.GeneralizedDiceLoss(softmax=True, to_onehot_y=True, w_type=w_type, batch=batch,
                                                  include_background=include_background)(*_torch(logits, labels))
        ours = losses.generalized_dice_loss(logits, labels, weight_type=w_type, batch_dice=batch,
                                            include_background=include_background)
        _check(ours, theirs)


FOCAL_OPTIONS = [
    dict(gamma=2.0),
    dict(gamma=0.0),
    dict(gamma=1.5, alpha=0.25),
    dict(gamma=2.0, alpha=[0.1, 0.3, 0.3, 0.3]),
    dict(gamma=3.0, weight=[1.0, 2.0, 0.5, 1.0]),
    dict(gamma=2.0, alpha=0.75, weight=[0.5, 1.0, 1.0, 2.0]),
]


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("options", FOCAL_OPTIONS)
def test_focal_equals_monai(dims, options):
    """MONAI's `mean` also averages over the K classes (ours sums them: the cross-entropy's scale), so ours = K x
    MONAI's; with `ignore_index` MONAI averages over voxels only, and the two are equal."""
    logits, labels = _data(dims, seed=7)
    theirs = monai_losses.FocalLoss(use_softmax=True, to_onehot_y=True, include_background=True,
                                    **options)(*_torch(logits, labels))
    ours = losses.focal_loss(logits, labels, gamma=options["gamma"], alpha=options.get("alpha"),
                             class_weights=options.get("weight"))
    _check(ours, K * float(theirs))
    ignore = np.where(np.random.default_rng(8).random(labels.shape) < 0.25, K, labels)  # ignore label K
    theirs = monai_losses.FocalLoss(use_softmax=True, to_onehot_y=True, include_background=True, ignore_index=K,
                                    **options)(*_torch(logits, ignore))
    _check(losses.focal_loss(logits, ignore, gamma=options["gamma"], alpha=options.get("alpha"),
                             class_weights=options.get("weight"), ignore_label=K), theirs)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("ignore_label", [K, 1])  # a label value outside the classes (nnU-Net) or one of them
def test_ignore_label_equals_monai_and_torch(dims, ignore_label):
    logits, labels = _data(dims, seed=9)
    labels = np.where(np.random.default_rng(10).random(labels.shape) < 0.3, ignore_label, labels)
    x, y = _torch(logits, labels)
    for options in DICE_OPTIONS[:5]:
        theirs = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, ignore_index=ignore_label, **options)(x, y)
        _check(losses.soft_dice_loss(logits, labels, ignore_label=ignore_label, **_dice_kwargs(options)), theirs)
    for options in TVERSKY_OPTIONS:
        theirs = monai_losses.TverskyLoss(softmax=True, to_onehot_y=True, ignore_index=ignore_label, **options)(x, y)
        _check(losses.tversky_loss(logits, labels, alpha=options["alpha"], beta=options["beta"],
                                   batch_dice=options["batch"], include_background=options["include_background"],
                                   smooth_nr=options.get("smooth_nr", 1e-5), smooth_dr=options.get("smooth_dr", 1e-5),
                                   ignore_label=ignore_label), theirs)
    for weight in (None, [0.5, 1.0, 2.0, 3.0]):
        theirs = torch.nn.functional.cross_entropy(x, y[:, 0], ignore_index=ignore_label,
                                                   weight=None if weight is None else torch.tensor(weight))
        _check(losses.cross_entropy_loss(logits, labels, class_weights=weight, ignore_label=ignore_label), theirs)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("include_background, iterations", [(True, 3), (False, 3), (False, 1), (True, 5)])
def test_cldice_equals_monai(dims, include_background, iterations):
    logits, labels = _data(dims, seed=11)
    x, y = _torch(logits, labels)
    theirs = monai_losses.SoftclDiceLoss(iter_=iterations, softmax=True, to_onehot_y=True,
                                         include_background=include_background)(x, y)
    _check(losses.soft_cldice_loss(logits, labels, iterations=iterations, include_background=include_background),
           theirs)
    theirs = monai_losses.SoftDiceclDiceLoss(iter_=iterations, alpha=0.3, softmax=True, to_onehot_y=True,
                                             include_background=include_background)(x, y)
    ours = losses.dice_cldice_loss(logits, labels, alpha=0.3, iterations=iterations, cldice_smooth=1.0,
                                   smooth_nr=1.0, smooth_dr=1.0, include_background=include_background)
    _check(ours, theirs)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("include_background", [True, False])
def test_boundary_loss_equals_monai(dims, include_background):
    logits, labels = _data(dims, seed=12)
    labels = _blobs(labels.shape, seed=13)
    x, y = _torch(logits, labels)
    loss = monai_losses.BoundaryLoss(softmax=True, to_onehot_y=True, include_background=include_background)
    maps = losses.signed_distance_maps(labels, K)
    theirs_maps = loss.compute_distance_map(torch.nn.functional.one_hot(y[:, 0], K).movedim(-1, 1).float())
    np.testing.assert_allclose(maps, np.moveaxis(theirs_maps.numpy(), 1, -1), rtol=1e-6, atol=1e-6)
    theirs = loss(x, y)
    _check(losses.boundary_loss(logits, labels, distance_maps=maps, include_background=include_background), theirs)
    # The in-step maps, with a cap beyond the largest distance in the patch, are the exact ones.
    _check(losses.boundary_loss(logits, labels, max_distance=25, include_background=include_background), theirs)


def _blobs(shape, seed):
    """Labels with some thickness (random labels have no inside): nested boxes of classes 1..3, class 3 absent from
    the first sample."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    for n in range(shape[0]):
        for k in range(1, K if n else K - 1):
            lo = [int(rng.integers(0, s // 2)) for s in shape[1:]]
            hi = [int(rng.integers(lo_ + 2, s + 1)) for lo_, s in zip(lo, shape[1:])]
            labels[(n, *[slice(a, b) for a, b in zip(lo, hi)])] = k
    return labels


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("batch", [False, True])
def test_region_loss_equals_torch_bce_plus_monai_sigmoid_dice(dims, batch):
    regions = ((1, 2, 3), (2, 3), (3,))
    logits, labels = _data(dims, seed=14, classes=3)
    labels = np.random.default_rng(15).integers(0, 4, labels.shape)
    targets = np.asarray(losses.region_targets(jnp.asarray(labels), regions))
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy())
    t = torch.from_numpy(np.moveaxis(targets, -1, 1).copy())
    dice = monai_losses.DiceLoss(sigmoid=True, include_background=True, batch=batch)(x, t)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t)
    _check(losses.region_loss(logits, labels, regions, dice_weight=0.7, bce_weight=1.3, batch_dice=batch),
           0.7 * float(dice) + 1.3 * float(bce))
