"""Uncertainty and quality control: the measures on constructed probabilities, and `medseg rank` end to end."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_case

from medseg_jax.cli import main
from medseg_jax.metrics import uncertainty

# --- the measures ---------------------------------------------------------------------------------------------------


def test_entropy_is_normalised_and_exact():
    p = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(uncertainty.entropy(p), [0.0, 1.0, 0.5], atol=1e-5)  # log 2 / log 4
    # independent (region) channels: binary entropies averaged; 0.5 is one bit
    np.testing.assert_allclose(uncertainty.entropy(np.array([[0.5, 1.0]], np.float32), independent=True), [0.5],
                               atol=1e-5)


def test_views_entropy_and_mutual_information():
    # two confident views that disagree: each is sure (expected entropy 0), their mean is a coin flip
    a = np.array([[1.0, 0.0]], np.float32)
    b = np.array([[0.0, 1.0]], np.float32)
    stats = uncertainty.ViewStatistics()
    stats.add(a, a.argmax(-1))
    stats.add(b, b.argmax(-1))
    maps = stats.maps()
    np.testing.assert_allclose(maps["entropy"], [1.0], atol=1e-5)
    np.testing.assert_allclose(maps["mutual_information"], [1.0], atol=1e-5)
    # two views that agree on being unsure: all entropy, no mutual information
    stats = uncertainty.ViewStatistics()
    for _ in range(2):
        stats.add(np.array([[0.5, 0.5]], np.float32), np.array([0]))
    np.testing.assert_allclose(stats.maps()["entropy"], [1.0], atol=1e-5)
    np.testing.assert_allclose(stats.maps()["mutual_information"], [0.0], atol=1e-5)


def test_disagreement_is_one_minus_the_mean_dice_with_the_consensus():
    consensus = np.zeros((10,), np.uint8)
    consensus[:4] = 1
    same = consensus.copy()
    half = np.zeros((10,), np.uint8)
    half[:2] = 1  # Dice with the consensus: 2*2 / (2 + 4) = 2/3
    assert uncertainty.disagreement([same, same], consensus, [1]) == 0.0
    assert uncertainty.disagreement([same, half], consensus, [1]) == pytest.approx(1 - (1 + 2 / 3) / 2)
    # a class nobody predicts does not count; one view has nothing to disagree with
    assert uncertainty.disagreement([same, half], consensus, [1, 2]) == pytest.approx(1 - (1 + 2 / 3) / 2)
    assert math.isnan(uncertainty.disagreement([same], consensus, [1]))


def test_volume_and_intensity_scores():
    reference = {1: [100.0, 110.0, 90.0, 105.0], 2: [10.0, 12.0, 9.0, 11.0]}
    typical = uncertainty.volume_z_scores({1: 101.0, 2: 10.5}, reference, floor_ml=0.01)
    odd = uncertainty.volume_z_scores({1: 300.0, 2: 0.0}, reference, floor_ml=0.01)
    assert max(abs(z) for z in typical.values()) < 1 and min(abs(z) for z in odd.values()) > 3
    rng = np.random.default_rng(0)
    profiles = [uncertainty.intensity_profile(rng.normal(0, 1, (20, 20, 20, 1))) for _ in range(5)]
    same = uncertainty.intensity_profile(rng.normal(0, 1, (20, 20, 20, 1)))
    shifted = uncertainty.intensity_profile(rng.normal(2, 3, (20, 20, 20, 1)))
    assert uncertainty.intensity_ood_score(same, profiles) < 3 < uncertainty.intensity_ood_score(shifted, profiles)
    np.testing.assert_allclose(uncertainty.percentile_ranks([3.0, 1.0, float("nan"), 2.0, 3.0]),
                               [2.5 / 3, 0.0, np.nan, 1 / 3, 2.5 / 3])


# --- medseg rank ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Three scans like the training ones, and two broken: heavy noise, and another modality (MRI-like values)."""
    folder = tmp_path_factory.mktemp("rank_inputs")
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for seed in (20, 21, 22):
        image, _ = make_tiny_case(seed)
        nib.save(nib.Nifti1Image(image, affine), folder / f"scan_{seed}.nii.gz")
    image, label = make_tiny_case(23)
    noisy = image + np.random.default_rng(1).normal(0, 120.0, image.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, affine), folder / "scan_noisy.nii.gz")
    other = (300.0 + 600.0 * (label == 1) + 400.0 * (label == 2)
             + np.random.default_rng(2).normal(0, 30.0, image.shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(other, affine), folder / "scan_other_modality.nii.gz")
    return folder


def test_rank_puts_the_broken_scans_first(two_runs, scans, tmp_path, capsys):
    out = tmp_path / "qc"
    code = main(["rank", "--run", str(two_runs[0]), "--run", str(two_runs[1]), "--input", str(scans),
                 "--out", str(out), "--mirror-axes", "0", "--checkpoint", "latest", "--top", "3"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    with open(out / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows[:2]} == {"scan_noisy", "scan_other_modality"}
    assert all(r["flag"] for r in rows[:2]) and not any(r["flag"] for r in rows[2:])
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(int(r["views"]) == 4 for r in rows)  # 2 models x (plain, mirrored along axis 0)
    for row in rows:
        for column in ("entropy", "mutual_information", "disagreement"):
            assert 0.0 <= float(row[column]) <= 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["reference"]["cases"] == 6 and report["ranked_by"][-2:] == ["volume_z", "ood"]
    assert [c["case"] for c in report["cases"]] == [r["case"] for r in rows]
    assert (out / "montage.png").stat().st_size > 0
    # an earlier ranking is not overwritten silently
    assert main(["rank", "--run", str(two_runs[0]), "--input", str(scans), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ranking.csv" in err[0] and "--overwrite" in err[0]


def test_rank_refuses_a_bad_input_in_one_line_before_writing(two_runs, scans, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scan_20.nii.gz").write_bytes((scans / "scan_20.nii.gz").read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    assert main(["rank", "--run", str(two_runs[0]), "--input", str(folder), "--out", str(tmp_path / "qc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.nii.gz" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "qc").exists()


def test_predict_qc_reports_every_prediction_and_changes_none(two_runs, scans, tmp_path, capsys):
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    assert main(["predict", "--run", str(two_runs[0]), "--input", str(scans), "--output", str(plain)]) == 0
    assert main(["predict", "--run", str(two_runs[0]), "--input", str(scans), "--output", str(checked), "--qc"]) == 0
    for path in sorted(plain.glob("*.nii.gz")):
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(checked / path.name).dataobj))
    with open(checked / "qc" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows[:2]} == {"scan_noisy", "scan_other_modality"} and len(rows) == 5
    assert all(r["views"] == "1" and r["disagreement"] == "" for r in rows)  # one model, mirroring fused
    # a re-run skips the predictions and the quality control it has, and reports every case again
    (checked / "qc" / "ranking.csv").unlink()
    capsys.readouterr()
    assert main(["predict", "--run", str(two_runs[0]), "--input", str(scans), "--output", str(checked), "--qc"]) == 0
    assert "5 already there" in capsys.readouterr().out
    with open(checked / "qc" / "ranking.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == [r["case"] for r in rows]
