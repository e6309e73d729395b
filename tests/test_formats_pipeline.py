"""The file formats through the pipeline: a MetaImage / NRRD dataset prepares like its NIfTI twin, predictions come back
in the input's own format and geometry, and evaluate reads them."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medseg_jax.cli import main
from medseg_jax.data.prepare import prepare
from medseg_jax.data.store import Store
from medseg_jax.io import formats, nifti
from tests.conftest import make_tiny_case, oblique_lps_affine, write_tiny_dataset
from tests.test_prepare import data_config


def nnunet_twin(nifti_dataset, root, ending: str):
    """The nnU-Net-layout copy of a tiny NIfTI dataset's training cases in another format (same voxels, geometry)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    spec = json.loads((nifti_dataset / "dataset.json").read_text())
    for entry in spec["training"]:
        case = entry["image"].split("/")[-1][: -len(".nii.gz")]
        image, geometry = nifti.read_image(nifti_dataset / entry["image"])
        label, _ = nifti.read_label(nifti_dataset / entry["label"])
        formats.write_image(root / "imagesTr" / f"{case}_0000{ending}", image, geometry)
        formats.write_label(root / "labelsTr" / f"{case}{ending}", label.astype(np.uint8), geometry)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": spec["labels"],
                                                   "numTraining": len(spec["training"]), "file_ending": ending}))
    return root


def test_mha_and_nrrd_datasets_prepare_like_their_nifti_twin(tmp_path):
    dataset = write_tiny_dataset(tmp_path / "nifti", num_train=3, num_test=0)
    config = data_config(target_spacing=(2.0, 2.0, 3.0))
    prepare(dataset, tmp_path / "store_nifti", config)
    reference = Store(tmp_path / "store_nifti")
    for ending in (".mha", ".nrrd"):
        twin = nnunet_twin(dataset, tmp_path / ending[1:], ending)
        prepare(twin, tmp_path / f"store{ending}", config)
        store = Store(tmp_path / f"store{ending}")
        assert store.case_ids == reference.case_ids
        for case_id in store.case_ids:
            for ours, theirs in zip(store.read_case(case_id), reference.read_case(case_id)):
                np.testing.assert_allclose(ours, theirs, atol=1e-5)
            np.testing.assert_allclose(store.geometry(case_id).affine, reference.geometry(case_id).affine, atol=1e-4)


def test_predictions_come_back_in_the_inputs_format_and_geometry(two_runs, tmp_path):
    image, label = make_tiny_case(40)
    scans, refs = tmp_path / "scans", tmp_path / "refs"
    scans.mkdir()
    refs.mkdir()
    nib.save(nib.Nifti1Image(image, oblique_lps_affine()), scans / "scan_nii.nii.gz")
    nib.save(nib.Nifti1Image(label, oblique_lps_affine()), refs / "scan_nii.nii.gz")
    image_c, geometry = nifti.read_image(scans / "scan_nii.nii.gz")
    label_c, _ = nifti.read_label(refs / "scan_nii.nii.gz")
    for ending in (".mha", ".nrrd"):
        formats.write_image(scans / f"scan_{ending[1:]}{ending}", image_c, geometry)
        formats.write_label(refs / f"scan_{ending[1:]}{ending}", label_c.astype(np.uint8), geometry)
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(two_runs[0]), "--input", str(scans), "--output", str(out)]) == 0
    expected, expected_geometry = nifti.read_label(out / "scan_nii.nii.gz")
    for ending in (".mha", ".nrrd"):
        predicted, predicted_geometry = formats.read_label(out / f"scan_{ending[1:]}{ending}")
        assert np.array_equal(predicted, expected), ending
        np.testing.assert_allclose(predicted_geometry.affine, expected_geometry.affine, atol=1e-4)
    assert main(["evaluate", "--pred", str(out), "--ref", str(refs), "--out", str(tmp_path / "eval")]) == 0
    rows = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()
    header = rows[0].split(",")
    dice = {}
    for row in rows[1:]:
        values = dict(zip(header, row.split(",")))
        dice.setdefault(values["case"], []).append(values["dice"])
    assert set(dice) == {"scan_nii", "scan_mha", "scan_nrrd"}
    assert dice["scan_mha"] == dice["scan_nii"] == dice["scan_nrrd"]  # the same labels, scored alike
