"""Synthetic phantoms: determinism, anatomy that needs more than a threshold, storage geometry, the written dataset."""

from __future__ import annotations

import functools
import json

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data import phantoms
from medseg_jax.errors import MedsegError

CASES_CHECKED = 4


@functools.cache
def case(modality: str, index: int):
    """Case `index` of the dataset drawn with seed 0 (cached: generating is the slow part of this file)."""
    return phantoms.generate_case(modality, phantoms.case_seed(0, index))


def world_centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    voxels = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ voxels + affine[:3, 3]


def is_oblique(affine: np.ndarray) -> bool:
    """True unless the direction matrix is a signed permutation (times the spacing)."""
    directions = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    return bool(np.abs(directions - np.round(directions)).max() > 1e-3)


def best_balanced_threshold_error(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest mean of the two per-class error rates that any single intensity threshold achieves."""
    values = np.concatenate([a, b])
    is_a = np.concatenate([np.ones(a.size, bool), np.zeros(b.size, bool)])
    order = np.argsort(values, kind="stable")
    a_below = np.concatenate([[0], np.cumsum(is_a[order])]) / a.size  # threshold after each sorted position
    b_below = np.concatenate([[0], np.cumsum(~is_a[order])]) / b.size
    error = 0.5 * (a_below + (1.0 - b_below))  # "a above the threshold, b below" and the reverse rule
    return float(np.minimum(error, 1.0 - error).min())


@pytest.mark.parametrize("modality", phantoms.MODALITIES)
def test_same_seed_gives_the_same_case_and_other_seeds_differ(modality):
    image, label, affine = case(modality, 0)
    again = phantoms.generate_case(modality, phantoms.case_seed(0, 0))
    np.testing.assert_array_equal(again[0], image)
    np.testing.assert_array_equal(again[1], label)
    np.testing.assert_array_equal(again[2], affine)
    other = case(modality, 1)
    assert other[0].shape != image.shape or not np.array_equal(other[0], image)
    assert not np.allclose(other[2], affine)


@pytest.mark.parametrize("modality", phantoms.MODALITIES)
def test_arrays_types_and_value_ranges(modality):
    for index in range(CASES_CHECKED):
        image, label, affine = case(modality, index)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.dtype == np.float64
        assert image.ndim == 3 and image.shape == label.shape and affine.shape == (4, 4)
        assert np.isfinite(image).all()
        assert set(np.unique(label).tolist()) <= set(phantoms.LABELS[modality])
        low, high = {"ct": (-1024, 3071), "mri": (0, np.inf), "us": (0, 1)}[modality]
        assert low <= image.min() and image.max() <= high
    shapes = {case(modality, index)[0].shape for index in range(CASES_CHECKED)}
    assert len(shapes) > 1, "cases should differ in shape"


def test_ct_spacing_and_field_of_view_are_in_the_promised_range():
    for index in range(CASES_CHECKED):
        image, _, affine = case("ct", index)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        in_plane_a, in_plane_b, through_plane = sorted(spacing)
        assert 3.0 <= in_plane_a <= in_plane_b <= 4.0 + 1e-6 and 4.0 - 1e-6 <= through_plane <= 6.0
        extent = sorted(np.asarray(image.shape) * spacing)
        assert 170 <= extent[0] <= 230 and 230 <= extent[1] <= 290 and 290 <= extent[2] <= 360


@pytest.mark.parametrize("modality", phantoms.MODALITIES)
def test_every_structure_is_present_and_sizes_differ(modality):
    foreground = sorted(value for value in phantoms.LABELS[modality] if value)
    counts = np.array([np.bincount(case(modality, index)[1].ravel(), minlength=max(foreground) + 1)[foreground]
                       for index in range(CASES_CHECKED)])
    assert (counts > 0).all(), f"missing structures: {counts}"
    mean_counts = counts.mean(axis=0)
    assert mean_counts.min() < 0.2 * mean_counts.max()


def test_ct_organs_are_not_separable_by_intensity_alone():
    for index in range(CASES_CHECKED):
        image, label, _ = case("ct", index)
        # Liver vs spleen: same intensity range, told apart by side and shape.
        assert best_balanced_threshold_error(image[label == 1], image[label == 2]) > 0.2
        # Kidney vs aorta: both enhance; told apart by shape.
        assert best_balanced_threshold_error(image[label == 3], image[label == 4]) > 0.1


def test_anatomy_sits_on_the_correct_side_in_world_coordinates():
    """RAS+ world: +x is the patient's right. Holds whatever voxel order or obliquity a case is stored in."""
    for index in range(CASES_CHECKED):
        _, label, affine = case("ct", index)
        liver, spleen = world_centroid(label, affine, 1), world_centroid(label, affine, 2)
        aorta = world_centroid(label, affine, 4)
        assert liver[0] > spleen[0] + 50.0  # liver on the patient's right
        assert aorta[0] < liver[0]
        _, label, affine = case("us", index)
        # The probe is anterior: the gallbladder is shallower (more anterior) than the portal vein behind it.
        assert world_centroid(label, affine, 2)[1] > world_centroid(label, affine, 3)[1]


def test_first_ct_cases_include_plain_ras_and_oblique_non_ras():
    kinds = []
    for index in range(5):
        _, _, affine = case("ct", index)
        kinds.append(("".join(nib.aff2axcodes(affine)), is_oblique(affine)))
    assert ("RAS", False) in kinds, kinds
    assert any(codes != "RAS" and oblique for codes, oblique in kinds), kinds


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA", "IAL"])
def test_storing_in_another_voxel_order_keeps_every_voxel_in_place(axcodes):
    ras_shape = (4, 5, 6)
    ras_values = np.arange(np.prod(ras_shape)).reshape(ras_shape)
    ras_affine = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 5], [0, 0, 4.0, 7], [0, 0, 0, 1]])
    stored, stored_label, affine = phantoms._store_in_voxel_order(ras_values.astype(np.float32),
                                                                  ras_values.astype(np.uint8), ras_affine, axcodes)
    assert "".join(nib.aff2axcodes(affine)) == axcodes
    np.testing.assert_array_equal(stored_label, stored.astype(np.uint8))
    stored_index = np.indices(stored.shape).reshape(3, -1)
    ras_index = np.array(np.unravel_index(stored.reshape(-1).astype(int), ras_shape))
    np.testing.assert_allclose(affine[:3, :3] @ stored_index + affine[:3, 3:],
                               ras_affine[:3, :3] @ ras_index + ras_affine[:3, 3:])


def read_nifti(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def test_write_demo_dataset_layout(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()  # an empty folder is accepted
    assert phantoms.write_demo_dataset(out, modality="ct", num_train=2, num_test=1, seed=0) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folder left behind
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "DemoCT" and meta["tensorImageSize"] == "3D" and meta["file_ending"] == ".nii.gz"
    assert meta["modality"] == {"0": "CT"} and meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "kidney", "4": "aorta"}
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert meta["training"] == [{"image": f"./imagesTr/ct_{i:03d}.nii.gz", "label": f"./labelsTr/ct_{i:03d}.nii.gz"}
                                for i in range(2)]
    assert meta["test"] == ["./imagesTs/ct_002.nii.gz"]
    listed = {entry[key] for entry in meta["training"] for key in ("image", "label")} | set(meta["test"])
    listed |= {"./labelsTs/ct_002.nii.gz"}
    on_disk = {f"./{p.relative_to(out)}" for p in out.rglob("*.nii.gz")}
    assert on_disk == listed

    declared = {int(value) for value in meta["labels"]}
    for image_path, label_path in [(out / e["image"], out / e["label"]) for e in meta["training"]] + [
            (out / "imagesTs/ct_002.nii.gz", out / "labelsTs/ct_002.nii.gz")]:
        image, image_nifti = read_nifti(image_path)
        label, label_nifti = read_nifti(label_path)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape
        np.testing.assert_allclose(image_nifti.affine, label_nifti.affine)
        assert set(np.unique(label).tolist()) <= declared
        for header in (image_nifti.header, label_nifti.header):
            assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
            np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-3)


def test_a_case_does_not_depend_on_how_many_cases_are_written(tmp_path):
    first = phantoms.write_demo_dataset(tmp_path / "a", modality="ct", num_train=2, num_test=1, seed=3)
    second = phantoms.write_demo_dataset(tmp_path / "b", modality="ct", num_train=3, num_test=0, seed=3)
    for first_name, second_name in [("imagesTr/ct_001", "imagesTr/ct_001"), ("imagesTs/ct_002", "imagesTr/ct_002"),
                                    ("labelsTs/ct_002", "labelsTr/ct_002")]:
        a, a_nifti = read_nifti(first / f"{first_name}.nii.gz")
        b, b_nifti = read_nifti(second / f"{second_name}.nii.gz")
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a_nifti.affine, b_nifti.affine)
    image, label, affine = phantoms.generate_case("ct", phantoms.case_seed(3, 1))
    np.testing.assert_array_equal(read_nifti(first / "imagesTr/ct_001.nii.gz")[0], image)


def test_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MedsegError, match="existing.*overwrite"):
        phantoms.write_demo_dataset(out, modality="ct", num_train=1, num_test=0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_an_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    generate = phantoms.generate_case
    calls = []

    def fail_on_second_case(modality, seed, scanner="reference"):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(modality, seed, scanner)

    monkeypatch.setattr(phantoms, "generate_case", fail_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        phantoms.write_demo_dataset(tmp_path / "demo", modality="us", num_train=2, num_test=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments", [
    {"modality": "pet"}, {"num_train": 0}, {"num_test": -1}, {"num_train": 2.5}, {"seed": -1}])
def test_bad_arguments_are_user_errors(tmp_path, arguments):
    with pytest.raises(MedsegError):
        phantoms.write_demo_dataset(tmp_path / "demo", **arguments)
    assert not (tmp_path / "demo").exists()


def test_generate_case_rejects_unknown_modality_and_bad_seed():
    with pytest.raises(MedsegError, match="pet"):
        phantoms.generate_case("pet", 0)
    with pytest.raises(MedsegError):
        phantoms.generate_case("ct", -5)


# ----------------------------------------------------------------------------------------------------------------
# Scanner profiles (simulated sites)


def high_pass_std(image: np.ndarray, mask: np.ndarray) -> float:
    """Noise level inside `mask`: the spread of the image minus its local mean."""
    from scipy import ndimage

    return float((image - ndimage.uniform_filter(image, 3))[mask].std())


@pytest.mark.parametrize("modality", phantoms.MODALITIES)
def test_scanner_profiles_keep_anatomy_and_geometry_and_change_only_the_image(modality):
    reference = case(modality, 0)
    assert all(np.array_equal(a, b) for a, b in zip(
        phantoms.generate_case(modality, phantoms.case_seed(0, 0), "reference"), reference))
    for scanner in list(phantoms.SCANNERS[modality])[1:]:
        image, label, affine = phantoms.generate_case(modality, phantoms.case_seed(0, 0), scanner)
        assert np.array_equal(label, reference[1]) and np.array_equal(affine, reference[2])
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert not np.allclose(image, reference[0]), scanner
        again = phantoms.generate_case(modality, phantoms.case_seed(0, 0), scanner)[0]
        assert np.array_equal(image, again), f"{scanner} is not deterministic"


def test_ct_scanner_profiles_do_what_they_say():
    image, label, _ = case("ct", 1)
    liver = label == 1
    soft = phantoms.generate_case("ct", phantoms.case_seed(0, 1), "soft-kernel")[0]
    low_dose = phantoms.generate_case("ct", phantoms.case_seed(0, 1), "low-dose")[0]
    # calibration: 0.96 * HU + 40 (liver ~60 HU -> ~98 HU); the soft kernel smooths the noise away
    assert 30.0 < soft[liver].mean() - image[liver].mean() < 45.0
    assert high_pass_std(soft, liver) < 0.6 * high_pass_std(image, liver)
    # low dose: the mean stays, the noise more than doubles
    assert abs(low_dose[liver].mean() - image[liver].mean()) < 10.0
    assert high_pass_std(low_dose, liver) > 2.0 * high_pass_std(image, liver)
    assert low_dose.min() >= -1024 and np.array_equal(low_dose, np.round(low_dose))


def test_unknown_scanner_profile_is_a_user_error_naming_the_choices(tmp_path):
    with pytest.raises(MedsegError, match="soft-kernel"):
        phantoms.generate_case("ct", 0, "low-field")
    with pytest.raises(MedsegError, match="low-field"):
        phantoms.write_demo_dataset(tmp_path / "demo", modality="mri", num_train=1, scanner="nope")
    assert not (tmp_path / "demo").exists()


def test_a_dataset_written_with_a_profile_says_so_and_matches_generate_case(tmp_path):
    out = phantoms.write_demo_dataset(tmp_path / "site", modality="ct", num_train=1, num_test=0, seed=3,
                                      scanner="low-dose")
    assert "low-dose" in json.loads((out / "dataset.json").read_text())["description"]
    written = nib.load(out / "imagesTr" / "ct_000.nii.gz")
    expected = phantoms.generate_case("ct", phantoms.case_seed(3, 0), "low-dose")[0]
    assert np.array_equal(np.asarray(written.dataobj), expected)


def test_us2d_frames_are_8_bit_b_mode_pictures_with_every_structure():
    picture, label, spacing = phantoms.generate_frame(7)
    again = phantoms.generate_frame(7)
    assert np.array_equal(picture, again[0]) and np.array_equal(label, again[1])
    assert not np.array_equal(picture, phantoms.generate_frame(8)[0])
    assert picture.dtype == np.uint8 and picture.shape == label.shape and picture.ndim == 2
    assert spacing == (phantoms.FRAME_SPACING_MM,) * 2
    assert set(np.unique(label)) == {0, 1, 2, 3}  # the frame through the slice that shows all three structures
    # the probe at the top: the first rows (near field, above the liver) hold no organ
    assert not label[:3].any()
