import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.evaluate import evaluate
from medseg_jax.predict import predict
from medseg_jax.train.loop import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(tiny_dataset, steps=4), run_dir)
    return run_dir


def test_prediction_keeps_the_oblique_non_ras_geometry(tiny_run, tiny_dataset, tmp_path):
    source = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    image = nib.load(source)
    assert nib.aff2axcodes(image.affine) != ("R", "A", "S")
    rotation = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
    assert not np.allclose(np.abs(rotation), np.round(np.abs(rotation)))  # oblique

    result = predict(tiny_run, source, tmp_path / "out")
    written = nib.load(tmp_path / "out" / source.name)
    assert result["written"] == [str(tmp_path / "out" / source.name)]
    assert written.shape == image.shape
    assert np.array_equal(written.affine, image.affine)
    assert np.array_equal(written.header.get_sform(), image.header.get_sform())
    assert int(written.header["sform_code"]) == int(image.header["sform_code"])
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


def test_prediction_overlays_its_scan(tiny_run, tmp_path):
    """A scan stored in two voxel orders gives the same labels at the same world positions."""
    from tests.conftest import make_tiny_case, oblique_lps_affine

    image, _ = make_tiny_case(50)
    affine = oblique_lps_affine()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "a" / "scan.nii.gz")
    # the same voxels stored with axes reversed and permuted (z, y, x) and the affine to match
    permuted = np.ascontiguousarray(image.transpose(2, 1, 0)[::-1])
    swap = np.zeros((4, 4))
    swap[0, 2] = swap[1, 1] = swap[3, 3] = 1
    swap[2, 0] = -1
    swap[2, 3] = image.shape[2] - 1
    nib.save(nib.Nifti1Image(permuted, affine @ swap), tmp_path / "b" / "scan.nii.gz")
    predict(tiny_run, tmp_path / "a", tmp_path / "pa")
    predict(tiny_run, tmp_path / "b", tmp_path / "pb")
    pa = np.asarray(nib.load(tmp_path / "pa" / "scan.nii.gz").dataobj)
    pb = np.asarray(nib.load(tmp_path / "pb" / "scan.nii.gz").dataobj)
    np.testing.assert_array_equal(pb, np.ascontiguousarray(pa.transpose(2, 1, 0)[::-1]))


def test_predict_refuses_to_overwrite(tiny_run, tiny_dataset, tmp_path):
    source = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / source.name).write_bytes(b"precious")
    with pytest.raises(MedsegError, match="already exists"):
        predict(tiny_run, source, out)
    assert (out / source.name).read_bytes() == b"precious"
    predict(tiny_run, source, out, overwrite=True)
    assert nib.load(out / source.name).shape == nib.load(source).shape


def test_bad_input_writes_nothing_unless_skip_bad(tiny_run, tiny_dataset, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(tiny_dataset / "imagesTs", inputs)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(MedsegError, match="broken.nii.gz"):
        predict(tiny_run, inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    result = predict(tiny_run, inputs, tmp_path / "out", skip_bad=True)
    assert len(result["written"]) == 2 and [f["case"] for f in result["failed"]] == ["broken"]
    assert not (tmp_path / "out" / "broken.nii.gz").exists()


def test_evaluate_perfect_and_reports(tiny_dataset, tmp_path):
    summary = evaluate(tiny_dataset / "labelsTs", tiny_dataset / "labelsTs", tmp_path / "eval")
    assert summary["mean_dice"] == 1.0
    assert summary["per_class"] == {"big": 1.0, "small": 1.0}
    lines = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()
    assert lines[0].startswith("prediction,case,label,name,dice,iou,precision,recall,hd,hd95,assd,nsd")
    assert len(lines) == 1 + 2 * 2
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_cases"] == 2


def test_evaluate_dice_by_hand(tmp_path):
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # 8 voxels
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:2] = 1  # 4 voxels, all inside
    for folder, data in (("ref", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "c.nii.gz")
    summary = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval")
    assert summary["per_class"]["1"] == pytest.approx(2 * 4 / (8 + 4))


def test_evaluate_errors(tiny_dataset, tmp_path):
    preds = tmp_path / "pred"
    preds.mkdir()
    with pytest.raises(MedsegError, match="no .nii"):
        evaluate(preds, tiny_dataset / "labelsTs", tmp_path / "eval")
    first = sorted((tiny_dataset / "labelsTs").glob("*.nii.gz"))[0]
    shutil.copy(first, preds / first.name)
    with pytest.raises(MedsegError, match="no prediction"):
        evaluate(preds, tiny_dataset / "labelsTs", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_dicom_series_input_predicts_like_its_nifti(tiny_run, tiny_dataset, tmp_path):
    from medseg_jax.io import dicom

    source = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    image = nib.load(source)
    volume = np.rint(np.asarray(image.dataobj)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), image.affine), tmp_path / "scan.nii.gz")
    dicom.write_series(tmp_path / "series" / "scan", volume, image.affine)
    predict(tiny_run, tmp_path / "scan.nii.gz", tmp_path / "from_nifti")
    result = predict(tiny_run, tmp_path / "series", tmp_path / "from_dicom")
    assert result["written"] == [str(tmp_path / "from_dicom" / "scan.nii.gz")]
    a, b = nib.load(tmp_path / "from_nifti" / "scan.nii.gz"), nib.load(tmp_path / "from_dicom" / "scan.nii.gz")
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
