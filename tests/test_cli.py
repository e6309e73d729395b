"""Each bad input ends in one line naming the file or key, exit code 2, no traceback, no partial output."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO, write_tiny_dataset


def medseg(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "medseg_jax.cli", *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=cwd, timeout=300)
    return result


def assert_clean_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


@pytest.fixture()
def dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "ds", num_train=3, num_test=1)


def train_args(dataset, workdir, *extra):
    return ["train", "--config", REPO / "experiments" / "demo_ct.py", "--workdir", workdir,
            f"--config.data.dataset={dataset}", "--config.data.val_cases=1", "--config.model.features=(4,8)",
            "--config.train.patch_size=(16,16,8)", "--config.train.steps=1", *extra]


def test_unknown_config_key(dataset, tmp_path):
    result = medseg(*train_args(dataset, tmp_path / "run", "--config.train.stepz=3"))
    assert_clean_error(result, "train.stepz")
    assert not (tmp_path / "run").exists()


def test_label_shape_differs_from_image(dataset, tmp_path):
    label_path = dataset / "labelsTr" / "tiny_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.diag([2.0, 2.0, 3.0, 1.0])), label_path)
    result = medseg(*train_args(dataset, tmp_path / "run"))
    assert_clean_error(result, "tiny_001.nii.gz")
    assert not (tmp_path / "run").exists()


def test_label_affine_differs_from_image(dataset, tmp_path):
    label_path = dataset / "labelsTr" / "tiny_001.nii.gz"
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), np.diag([2.0, 2.0, 3.5, 1.0])), label_path)
    result = medseg(*train_args(dataset, tmp_path / "run"))
    assert_clean_error(result, "tiny_001.nii.gz", "affine")
    assert not (tmp_path / "run").exists()


def test_undeclared_label_value(dataset, tmp_path):
    label_path = dataset / "labelsTr" / "tiny_002.nii.gz"
    label = nib.load(label_path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, label.affine), label_path)
    result = medseg(*train_args(dataset, tmp_path / "run"))
    assert_clean_error(result, "tiny_002.nii.gz", "7")
    assert not (tmp_path / "run").exists()


def test_corrupt_and_missing_files(dataset, tmp_path):
    (dataset / "imagesTr" / "tiny_000.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    result = medseg(*train_args(dataset, tmp_path / "run"))
    assert_clean_error(result, "tiny_000.nii.gz")
    (dataset / "imagesTr" / "tiny_000.nii.gz").unlink()
    result = medseg(*train_args(dataset, tmp_path / "run"))
    assert_clean_error(result, "tiny_000.nii.gz")
    assert not (tmp_path / "run").exists()


def test_predict_with_missing_run_and_input(tmp_path):
    assert_clean_error(medseg("predict", "--run", tmp_path / "norun", "--input", tmp_path / "x.nii.gz",
                              "--output", tmp_path / "out"), "x.nii.gz")
    assert not (tmp_path / "out").exists()


def test_evaluate_with_corrupt_prediction(dataset, tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "tiny_003.nii.gz").write_text("not an image")
    result = medseg("evaluate", "--pred", tmp_path / "pred", "--ref", dataset / "labelsTs", "--out", tmp_path / "ev")
    assert_clean_error(result, "tiny_003.nii.gz")
    assert not (tmp_path / "ev").exists()


def test_demo_data_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("keep")
    assert_clean_error(medseg("demo-data", "--out", tmp_path / "data", "--cases", "1"), "data")
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep"
