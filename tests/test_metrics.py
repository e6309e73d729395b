"""Metrics against the field's references: surface="surfel" against DeepMind's surface-distance, surface="voxel"
against MONAI 1.6, overlap metrics against direct NumPy counts; empty-mask conventions; argument errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.errors import MedsegError
from medseg_jax.metrics import dice_per_class, evaluate_case, nanmean, surface_distances, surface_metrics

RTOL = 1e-6
SURFACE = ("hd", "hd95", "assd", "nsd")
N_CASES = 120
ISSUE_SPACING = (1.0, 0.8, 2.5)


# ---------------------------------------------------------------------------------------------------------------------
# Random cases


def _blob(rng, shape, density=0.5):
    smooth = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.7, 2.0))
    return smooth > np.quantile(smooth, 1 - density)


def _ellipsoid(shape, center, radii):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1


def _one_voxel(rng, shape):
    mask = np.zeros(shape, bool)
    mask[tuple(int(rng.integers(0, s)) for s in shape)] = True
    return mask


def _case(seed: int):
    """(pred, ref, spacing, tolerance, kind): label maps with labels 1 and 2 (label 3 is absent from both)."""
    rng = np.random.default_rng(seed)
    ndim = 2 if seed % 3 == 0 else 3
    shape = tuple(int(s) for s in rng.integers(6, 25 if ndim == 2 else 17, ndim))
    kind = ("blobs", "ellipsoids", "one_voxel", "empty_pred", "empty_ref", "border", "identical", "slab")[seed % 8]
    masks = []
    for _ in range(2):  # (pred, ref) masks of labels 1 and 2
        if kind == "ellipsoids":
            center = np.array(shape) / 2 + rng.uniform(-2, 2, ndim)
            radii = np.array(shape) * rng.uniform(0.15, 0.4, ndim)
            p, r = _ellipsoid(shape, center + rng.uniform(-1.5, 1.5, ndim), radii * rng.uniform(0.8, 1.2, ndim)), \
                _ellipsoid(shape, center, radii)
        elif kind == "one_voxel":
            p, r = _one_voxel(rng, shape), (_one_voxel(rng, shape) if rng.random() < 0.7 else _blob(rng, shape, 0.2))
        elif kind == "border":  # masks reaching the faces of the volume
            p, r = _blob(rng, shape, 0.6), _blob(rng, shape, 0.6)
            p[(slice(None),) * (ndim - 1) + (slice(0, 2),)] = True
            r[(0,) + (slice(None),) * (ndim - 1)] = True
        elif kind == "slab":
            p, r = np.zeros(shape, bool), np.zeros(shape, bool)
            axis = int(rng.integers(0, ndim))
            p[(slice(None),) * axis + (slice(0, int(rng.integers(1, shape[axis]))),)] = True
            r[(slice(None),) * axis + (slice(int(rng.integers(0, shape[axis])), None),)] = True
        else:
            density = rng.uniform(0.1, 0.5)
            p, r = _blob(rng, shape, density), _blob(rng, shape, density)
            if kind == "identical":
                p = r.copy()
        masks.append((p, r))
    if kind == "empty_pred":
        masks[0] = (np.zeros(shape, bool), masks[0][1])
    if kind == "empty_ref":
        masks[1] = (masks[1][0], np.zeros(shape, bool))
    pred, ref = np.zeros(shape, np.int16), np.zeros(shape, np.int16)
    for label, (p, r) in ((2, masks[1]), (1, masks[0])):  # label 1 wins where they overlap
        pred[p], ref[r] = label, label
    spacings = [(1.0,) * ndim, ISSUE_SPACING[:ndim], tuple(rng.uniform(0.3, 3.0, ndim)), (0.5, 2.0, 1.0)[:ndim]]
    spacing = spacings[seed % 4]
    tolerance = [0.0, 0.5, 1.0, 2.0, float(rng.uniform(0.1, 4.0))][seed % 5]
    return pred, ref, tuple(float(s) for s in spacing), tolerance, kind


CASES = [_case(seed) for seed in range(N_CASES)]


def _same(ours: float, theirs: float) -> bool:
    if math.isnan(theirs):
        return math.isnan(ours)
    if math.isinf(theirs):
        return ours == theirs
    return math.isclose(ours, theirs, rel_tol=RTOL, abs_tol=1e-12)


def test_random_cases_cover_the_hard_ones():
    kinds = {kind for *_, kind in CASES}
    assert {"one_voxel", "empty_pred", "empty_ref", "border"} <= kinds
    assert {p.ndim for p, *_ in CASES} == {2, 3} and len(CASES) >= 100
    border = [c for c in CASES if c[4] == "border"]
    assert all(ref[(0,) + (slice(None),) * (ref.ndim - 1)].all() for _, ref, *_ in border)


# ---------------------------------------------------------------------------------------------------------------------
# Overlap against NumPy


def test_overlap_metrics_equal_direct_numpy_counts():
    for pred, ref, spacing, tolerance, _ in CASES:
        scores = evaluate_case(pred, ref, spacing, [1, 2, 3], tolerance)
        voxel = float(np.prod(spacing))
        for label in (1, 2, 3):
            p, r = pred == label, ref == label
            tp, n_p, n_r = int((p & r).sum()), int(p.sum()), int(r.sum())
            s = scores[label]
            assert s["ref_voxels"] == n_r and s["pred_voxels"] == n_p
            expected = {
                "dice": 2 * tp / (n_p + n_r) if n_p + n_r else math.nan,
                "iou": tp / (p | r).sum() if n_p + n_r else math.nan,
                "precision": tp / n_p if n_p else math.nan,
                "recall": tp / n_r if n_r else math.nan,
                "volume_difference_mm3": (n_p - n_r) * voxel,
                "relative_volume_difference": (n_p - n_r) / n_r if n_r else math.nan,
                "pred_volume_mm3": n_p * voxel, "ref_volume_mm3": n_r * voxel,
            }
            for key, value in expected.items():
                assert type(s[key]) is float and _same(s[key], float(value)), (label, key, s[key], value)
        assert {k: v["dice"] for k, v in scores.items()} == pytest.approx(dice_per_class(pred, ref, [1, 2, 3]),
                                                                           nan_ok=True)


def test_dice_per_class_and_nanmean_unchanged():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    ref = np.array([[0, 1, 0], [2, 0, 0]])
    scores = dice_per_class(pred, ref, [1, 2, 3])
    assert scores[1] == pytest.approx(2 / 3) and scores[2] == pytest.approx(2 / 3) and math.isnan(scores[3])
    assert nanmean(scores.values()) == pytest.approx(2 / 3) and math.isnan(nanmean([math.nan]))
    with pytest.raises(ValueError):
        dice_per_class(pred, ref[:1], [1])


def test_empty_mask_conventions():
    ref = np.zeros((6, 7, 5), np.uint8)
    ref[2:4, 2:5, 1:3] = 1
    empty = np.zeros_like(ref)
    for surface in ("surfel", "voxel"):
        missed = evaluate_case(empty, ref, ISSUE_SPACING, [1], surface=surface)[1]
        hallucinated = evaluate_case(ref, empty, ISSUE_SPACING, [1], surface=surface)[1]
        absent = evaluate_case(empty, empty, ISSUE_SPACING, [1], surface=surface)[1]
        for scores in (missed, hallucinated):
            assert scores["dice"] == 0 and scores["iou"] == 0 and scores["nsd"] == 0
            assert scores["hd"] == scores["hd95"] == scores["assd"] == math.inf
        assert math.isnan(missed["precision"]) and missed["recall"] == 0
        assert hallucinated["precision"] == 0 and math.isnan(hallucinated["recall"])
        assert missed["relative_volume_difference"] == -1 and math.isnan(hallucinated["relative_volume_difference"])
        assert missed["volume_difference_mm3"] == pytest.approx(-12 * 2.0)
        assert all(math.isnan(absent[k]) for k in ("dice", "iou", "precision", "recall", *SURFACE))
        assert absent["volume_difference_mm3"] == 0 and absent["ref_voxels"] == absent["pred_voxels"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# Surface metrics against surface-distance (surfel) and MONAI (voxel)


@pytest.fixture
def surface_distance(monkeypatch):
    module = pytest.importorskip("surface_distance", reason="surface-distance (pip install surface-distance) needed")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)  # surface-distance 0.1 still uses np.Inf (gone in NumPy 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield module


@pytest.fixture
def monai_metrics():
    pytest.importorskip("monai", reason="MONAI needed for the voxel-convention references")
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
    from monai.metrics.utils import get_edge_surface_distance

    def one_hot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    def scores(p, r, spacing, tolerance):
        a, b, s = one_hot(p), one_hot(r), list(spacing)
        return {"hd": compute_hausdorff_distance(a, b, spacing=s).item(),
                "hd95": compute_hausdorff_distance(a, b, percentile=95, spacing=s).item(),
                "assd": compute_average_surface_distance(a, b, symmetric=True, spacing=s).item(),
                "nsd": compute_surface_dice(a, b, class_thresholds=[tolerance], spacing=s).item()}

    def distances(p, r, spacing):
        _, (pred_to_ref, ref_to_pred), _ = get_edge_surface_distance(
            torch.from_numpy(p), torch.from_numpy(r), spacing=list(spacing), symmetric=True)
        return pred_to_ref.numpy(), ref_to_pred.numpy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield scores, distances


def _surface_distance_scores(sd, p, r, spacing, tolerance):
    d = sd.compute_surface_distances(r, p, list(spacing))
    with np.errstate(all="ignore"):
        to_pred, to_ref = sd.compute_average_surface_distance(d)
        return {"hd": float(sd.compute_robust_hausdorff(d, 100)), "hd95": float(sd.compute_robust_hausdorff(d, 95)),
                "assd": float((to_pred + to_ref) / 2), "nsd": float(sd.compute_surface_dice_at_tolerance(d, tolerance))}


def _check_against(ours: dict, theirs: dict, p, r, where) -> set:
    """Equal where the reference defines a value; with empty masks ours is the documented value, and the returned
    {(pred non-empty, ref non-empty, metric, str(reference value))} lists where the reference returns another one."""
    if p.any() and r.any():
        for key in SURFACE:
            assert _same(ours[key], theirs[key]), (where, key, ours[key], theirs[key])
        return set()
    documented = dict.fromkeys(SURFACE, math.nan) if not (p.any() or r.any()) \
        else {"hd": math.inf, "hd95": math.inf, "assd": math.inf, "nsd": 0.0}
    for key in SURFACE:
        assert _same(ours[key], documented[key]), (where, key, ours[key])
    return {(bool(p.any()), bool(r.any()), key, str(theirs[key])) for key in SURFACE
            if not _same(theirs[key], documented[key])}


def _compare_all(surface: str, reference) -> tuple[float, set]:
    worst, differences = 0.0, set()
    for seed, (pred, ref, spacing, tolerance, kind) in enumerate(CASES):
        ours = evaluate_case(pred, ref, spacing, [1, 2, 3], tolerance, surface=surface)
        for label in (1, 2, 3):
            p, r = pred == label, ref == label
            theirs = reference(p, r, spacing, tolerance)
            differences |= _check_against(ours[label], theirs, p, r, (seed, kind, label))
            if p.any() and r.any():
                worst = max(worst, *(abs(ours[label][k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in SURFACE))
    return worst, differences


def test_surfel_equals_surface_distance(surface_distance):
    worst, differences = _compare_all("surfel", lambda *args: _surface_distance_scores(surface_distance, *args))
    assert worst <= RTOL
    # surface-distance gives HD/HD95 inf with both masks empty and ASSD NaN (mean of inf and 0/0) with one empty
    assert differences == {(False, False, "hd", "inf"), (False, False, "hd95", "inf"),
                           (True, False, "assd", "nan"), (False, True, "assd", "nan")}


def test_surfel_distances_equal_surface_distance(surface_distance):
    for pred, ref, spacing, _, _ in CASES[:60]:
        p, r = pred == 1, ref == 1
        if not (p.any() and r.any()):
            continue
        theirs = surface_distance.compute_surface_distances(r, p, list(spacing))
        ours = surface_distances(p, r, spacing)
        for key, their_key in (("distances_ref_to_pred", "distances_gt_to_pred"),
                               ("distances_pred_to_ref", "distances_pred_to_gt"),
                               ("areas_ref", "surfel_areas_gt"), ("areas_pred", "surfel_areas_pred")):
            np.testing.assert_allclose(ours[key], theirs[their_key], rtol=1e-12, atol=0)


def test_voxel_equals_monai(monai_metrics):
    worst, differences = _compare_all("voxel", monai_metrics[0])
    assert worst <= RTOL
    # MONAI gives HD95 NaN with one mask empty (torch.quantile of infinities); it agrees everywhere else
    assert differences == {(True, False, "hd95", "nan"), (False, True, "hd95", "nan")}


def test_voxel_distances_equal_monai(monai_metrics):
    _, distances = monai_metrics
    for pred, ref, spacing, _, _ in CASES[:60]:
        p, r = pred == 2, ref == 2
        if not (p.any() and r.any()):
            continue
        pred_to_ref, ref_to_pred = distances(p, r, spacing)
        ours = surface_distances(p, r, spacing, surface="voxel")
        np.testing.assert_array_equal(ours["distances_pred_to_ref"], pred_to_ref)
        np.testing.assert_array_equal(ours["distances_ref_to_pred"], ref_to_pred)


def _issue_masks():
    """A reference ellipsoid and a prediction that is shifted and a little larger, on a 1 x 0.8 x 2.5 mm grid."""
    shape = (40, 48, 18)
    ref = _ellipsoid(shape, (20, 24, 9), (11, 14, 5))
    pred = _ellipsoid(shape, (21.5, 22.5, 9.6), (12, 14.5, 5.4))
    return pred, ref


def test_issue_example_conventions_differ(surface_distance, monai_metrics):
    pred, ref = _issue_masks()
    surfel = surface_metrics(pred, ref, ISSUE_SPACING, 1.0, surface="surfel")
    voxel = surface_metrics(pred, ref, ISSUE_SPACING, 1.0, surface="voxel")
    deepmind = _surface_distance_scores(surface_distance, pred, ref, ISSUE_SPACING, 1.0)
    monai = monai_metrics[0](pred, ref, ISSUE_SPACING, 1.0)
    for key in SURFACE:
        assert _same(surfel[key], deepmind[key]) and _same(voxel[key], monai[key]), key
    # the two conventions give different numbers on the same masks (issue: HD95 3.40 vs 4.39, NSD 0.696 vs 0.415)
    assert abs(surfel["hd95"] - voxel["hd95"]) > 0.1 and abs(surfel["nsd"] - voxel["nsd"]) > 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Cropping, inputs, errors


def test_results_do_not_depend_on_the_volume_around_the_masks():
    pred, ref, spacing, tolerance, _ = CASES[1]
    pad = [(3, 5), (0, 2), (4, 0)][: pred.ndim]
    for surface in ("surfel", "voxel"):
        small = evaluate_case(pred, ref, spacing, [1, 2], tolerance, surface)
        large = evaluate_case(np.pad(pred, pad), np.pad(ref, pad), spacing, [1, 2], tolerance, surface)
        assert small == large


def test_input_types():
    pred, ref, spacing, tolerance, _ = CASES[9]
    expected = evaluate_case(pred, ref, spacing, [1], tolerance)
    assert evaluate_case(pred == 1, ref == 1, np.array(spacing), (1,), tolerance) == expected
    assert evaluate_case(pred.astype(np.float32), ref.astype(np.uint8), list(spacing), np.array([1]), tolerance) \
        == expected
    assert all(type(v) is float for k, v in expected[1].items() if not k.endswith("voxels"))
    assert type(expected[1]["ref_voxels"]) is int
    assert evaluate_case(pred, ref, spacing, []) == {}


@pytest.mark.parametrize("kwargs, message", [
    ({"surface": "mesh"}, "surface must be"),
    ({"spacing": (1.0, 1.0)}, "spacing"),
    ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
    ({"ref": np.zeros((4, 4, 5), np.uint8)}, "shape"),
    ({"labels": [0, 1]}, "labels"),
    ({"labels": [1.5]}, "labels"),
    ({"tolerance_mm": -1.0}, "tolerance_mm"),
    ({"pred": np.zeros((4,), np.uint8), "ref": np.zeros((4,), np.uint8), "spacing": (1.0,)}, "2D or 3D"),
])
def test_bad_arguments_raise_one_line_medseg_errors(kwargs, message):
    arguments = {"pred": np.zeros((4, 4, 4), np.uint8), "ref": np.zeros((4, 4, 4), np.uint8),
                 "spacing": (1.0, 1.0, 1.0), "labels": [1], **kwargs}
    with pytest.raises(MedsegError, match=message) as info:
        evaluate_case(**arguments)
    assert "\n" not in str(info.value)
