"""Pre-annotations: Slicer .seg.nrrd and ITK-SNAP label descriptions keep labels, names and geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from conftest import make_tiny_case, oblique_lps_affine

from medseg_jax.cli import main
from medseg_jax.io import annotations, nifti

NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "aorta"}


def test_seg_nrrd_round_trip_keeps_labels_names_colours_and_geometry(tmp_path):
    label = np.zeros((12, 10, 8), np.uint8)
    label[2:6, 3:7, 1:4] = 1
    label[8:10, 1:3, 5:7] = 2  # label 3 absent: still a segment, ready to paint
    affine = oblique_lps_affine()
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "case.nii.gz")
    canonical, geometry = nifti.read_label(tmp_path / "case.nii.gz")
    annotations.write_seg_nrrd(tmp_path / "case.seg.nrrd", canonical, geometry, NAMES, colors={"2": [0.1, 0.2, 0.3]})
    voxels, ras_affine, names, colors = annotations.read_seg_nrrd(tmp_path / "case.seg.nrrd")
    assert np.array_equal(voxels, label)  # the file's own voxel order
    np.testing.assert_allclose(ras_affine, affine, atol=1e-6)
    assert names == {1: "liver", 2: "spleen", 3: "aorta"}
    assert colors[2] == (0.1, 0.2, 0.3) and colors[1] == annotations.PALETTE[0]
    assert not list(tmp_path.glob("*.tmp*"))


def test_itksnap_label_descriptions(tmp_path):
    annotations.write_itksnap_labels(tmp_path / "labels.txt", NAMES)
    rows = [line.split() for line in (tmp_path / "labels.txt").read_text().splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert rows[1][-1] == '"liver"' and rows[1][1:4] == [str(round(255 * c)) for c in annotations.PALETTE[0]]


def test_predict_writes_pre_annotations_beside_the_label_maps(two_runs, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in (30, 31):
        image, _ = make_tiny_case(seed)
        nib.save(nib.Nifti1Image(image, oblique_lps_affine()), scans / f"scan_{seed}.nii.gz")
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(two_runs[0]), "--input", str(scans), "--output", str(out),
                 "--pre-annotations"]) == 0
    for seed in (30, 31):
        predicted = nib.load(out / f"scan_{seed}.nii.gz")
        voxels, ras_affine, names, _ = annotations.read_seg_nrrd(out / "annotations" / f"scan_{seed}.seg.nrrd")
        assert np.array_equal(voxels, np.asarray(predicted.dataobj))
        np.testing.assert_allclose(ras_affine, predicted.affine, atol=1e-5)
        assert names == {1: "big", 2: "small"}
        entropy = nib.load(out / "annotations" / f"scan_{seed}_uncertainty.nii.gz")
        assert entropy.shape == predicted.shape and np.allclose(entropy.affine, predicted.affine, atol=1e-5)
        values = np.asarray(entropy.dataobj)
        assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
    assert '"big"' in (out / "annotations" / "labels.txt").read_text()
    # the label maps are the same as without pre-annotations
    plain = tmp_path / "plain"
    assert main(["predict", "--run", str(two_runs[0]), "--input", str(scans), "--output", str(plain)]) == 0
    for seed in (30, 31):
        assert np.array_equal(np.asarray(nib.load(plain / f"scan_{seed}.nii.gz").dataobj),
                              np.asarray(nib.load(out / f"scan_{seed}.nii.gz").dataobj))
