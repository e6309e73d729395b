"""`medseg evaluate`: every metric per case and class, summaries, Markdown, box plots, paired Wilcoxon tests."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from medseg_jax.errors import MedsegError
from medseg_jax.evaluate import METRICS, evaluate
from medseg_jax.metrics import evaluate_case
from tests.test_cli import assert_clean_error, medseg

SPACING = (1.0, 0.8, 2.5)


def ball(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (((grid - np.asarray(center)) * np.asarray(SPACING)) ** 2).sum(-1) <= radius ** 2


def write_folders(root, num_cases=6):
    """A reference folder and two prediction folders: `good` shifts the structures by one voxel, `poor` by three."""
    affine = np.diag([*SPACING, 1.0])
    shape = (24, 28, 12)
    for folder in ("ref", "good", "poor"):
        (root / folder).mkdir(parents=True)
    for case in range(num_cases):
        rng = np.random.default_rng(case)
        center = np.array([12, 14, 6]) + rng.integers(-2, 3, 3)
        for folder, shift in (("ref", 0), ("good", 1), ("poor", 3)):
            label = np.zeros(shape, np.uint8)
            label[ball(shape, center + [shift, 0, 0], 6.0)] = 1
            if case % 3:  # class 2 absent from every file of one case in three
                label[ball(shape, center + [0, 7 + shift, 0], 2.5)] = 2
            nib.save(nib.Nifti1Image(label, affine), root / folder / f"case{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    return root


def test_two_folders_give_every_metric_summaries_plots_and_paired_tests(tmp_path):
    root = write_folders(tmp_path / "data")
    summary = evaluate([root / "good", root / "poor"], root / "ref", tmp_path / "eval",
                       dataset_json=root / "dataset.json")
    rows = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").open()))
    assert len(rows) == 2 * 6 * 2 and set(METRICS) <= set(rows[0])
    # the CSV holds evaluate_case's values for the case, read back from the files
    ref = np.asarray(nib.load(root / "ref" / "case1.nii.gz").dataobj)
    good = np.asarray(nib.load(root / "good" / "case1.nii.gz").dataobj)
    expected = evaluate_case(good, ref, SPACING, [1, 2])
    row = next(r for r in rows if r["prediction"] == "good" and r["case"] == "case1" and r["label"] == "1")
    for metric in METRICS:
        assert float(row[metric]) == pytest.approx(expected[1][metric], rel=1e-5)

    organ = summary["metrics"]["good"]["per_class"]["organ"]
    dice = [float(r["dice"]) for r in rows if r["prediction"] == "good" and r["name"] == "organ"]
    assert organ["dice"]["mean"] == pytest.approx(np.mean(dice)) and organ["dice"]["n"] == 6
    lesion = summary["metrics"]["good"]["per_class"]["lesion"]
    assert lesion["dice"]["undefined"] == 2 and lesion["hd95"]["undefined"] == 2  # absent from both masks
    assert summary["mean_dice"] == pytest.approx(np.mean([organ["dice"]["mean"], lesion["dice"]["mean"]]))
    assert summary["metrics"]["good"]["per_class"]["organ"]["hd95"]["mean"] < \
        summary["metrics"]["poor"]["per_class"]["organ"]["hd95"]["mean"]

    comparison = next(c for c in summary["comparisons"] if c["name"] == "organ" and c["metric"] == "dice")
    poor = [float(r["dice"]) for r in rows if r["prediction"] == "poor" and r["name"] == "organ"]
    assert comparison["p_value"] == pytest.approx(stats.wilcoxon(dice, poor).pvalue)
    assert comparison["n"] == 6 and comparison["median_difference"] > 0

    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## good" in report and "Wilcoxon" in report and "surfel" in report
    for metric in METRICS:
        png = tmp_path / "eval" / f"boxplot_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_voxel_convention_and_workers_give_the_same_rows_as_in_process(tmp_path):
    root = write_folders(tmp_path / "data", num_cases=3)
    one = evaluate(root / "good", root / "ref", tmp_path / "a", surface="voxel")
    two = evaluate(root / "good", root / "ref", tmp_path / "b", surface="voxel", workers=2)
    assert (tmp_path / "a" / "per_case.csv").read_text() == (tmp_path / "b" / "per_case.csv").read_text()
    assert one["surface"] == "voxel" and one["metrics"] == two["metrics"]


def test_bad_inputs_write_nothing(tmp_path):
    root = write_folders(tmp_path / "data", num_cases=2)
    (root / "good" / "case1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(MedsegError, match="case1.nii.gz"):
        evaluate([root / "poor", root / "good"], root / "ref", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    with pytest.raises(MedsegError, match="surfel"):
        evaluate(root / "poor", root / "ref", tmp_path / "eval", surface="mesh")
    result = medseg("evaluate", "--pred", root / "poor", root / "good", "--ref", root / "ref", "--out",
                    tmp_path / "eval")
    assert_clean_error(result, "case1.nii.gz")
    assert not (tmp_path / "eval").exists()


def test_cli_compares_two_folders(tmp_path):
    root = write_folders(tmp_path / "data", num_cases=6)
    result = medseg("evaluate", "--pred", root / "good", root / "poor", "--ref", root / "ref", "--out",
                    tmp_path / "eval", "--dataset-json", root / "dataset.json", "--tolerance", "2")
    assert result.returncode == 0, result.stderr
    assert "good vs poor, organ Dice" in result.stdout and "Wilcoxon p" in result.stdout
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["tolerance_mm"] == 2.0
