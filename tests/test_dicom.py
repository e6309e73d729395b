"""DICOM series I/O: round trips against the NIfTI model, file-order independence, and one test per user error."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from medseg_jax.errors import MedsegError
from medseg_jax.io import dicom, nifti
from medseg_jax.io import geometry as geometry_lib
from tests.conftest import rotation

SHAPE = (7, 6, 5)  # columns, rows, slices: all different, so a swapped or flipped axis cannot pass


def _axial_affine():
    """What a plain axial LPS series looks like in RAS+: i -> left (-x), j -> posterior (-y), k -> superior."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-0.8, -0.9, 2.5])
    affine[:3, 3] = [100.0, 120.5, -50.25]
    return affine


def _oblique_affine():
    """Rotated 20 degrees about x and then 20 degrees about z, anisotropic spacing (0.8, 0.8, 2.5)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation([0, 0, 1], 20) @ rotation([1, 0, 0], 20) @ np.diag([-0.8, -0.8, 2.5])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    return affine


AFFINES = {"axial": _axial_affine, "oblique": _oblique_affine}


def _volume(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(-1000, 2000, shape).astype(np.int16)


def _expected(volume, affine):
    geometry = geometry_lib.Geometry.from_affine(affine, volume.shape)
    return geometry_lib.to_canonical(volume[..., None].astype(np.float32), geometry), geometry


def _good_series(tmp_path, name="series", volume=None, affine=None, **kwargs):
    folder = tmp_path / name
    dicom.write_series(folder, _volume() if volume is None else volume,
                       _axial_affine() if affine is None else affine, **kwargs)
    return folder


def _edit(path, **tags):
    """Rewrites one file with `tags` set (None deletes the tag)."""
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _error(folder) -> str:
    with pytest.raises(MedsegError) as info:
        dicom.read_series(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_round_trip_matches_the_nifti_model(tmp_path, kind):
    affine, volume = AFFINES[kind](), _volume()
    folder = _good_series(tmp_path, volume=volume, affine=affine)
    array, geometry = dicom.read_series(folder)
    expected_array, expected_geometry = _expected(volume, affine)
    assert array.dtype == np.float32 and array.shape == expected_array.shape
    assert geometry.shape == volume.shape and geometry.spatial_header is None
    np.testing.assert_allclose(geometry.affine, affine, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(array, expected_array)
    np.testing.assert_array_equal(geometry.to_canonical, expected_geometry.to_canonical)
    np.testing.assert_allclose(geometry.spacing, expected_geometry.spacing, rtol=0, atol=1e-5)

    # The same volume and affine as a NIfTI file read through nifti.read_image: same canonical array and affine.
    nii = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), nii)
    nifti_array, nifti_geometry = nifti.read_image(nii)
    np.testing.assert_array_equal(array, nifti_array)
    np.testing.assert_allclose(geometry.canonical_affine, nifti_geometry.canonical_affine, rtol=0, atol=1e-4)


def test_slices_are_stacked_along_the_normal_of_the_orientation(tmp_path):
    affine = _oblique_affine()
    files = dicom.write_series(tmp_path / "s", _volume(), affine)
    first, second = (pydicom.dcmread(f) for f in files[:2])
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    step = np.array(second.ImagePositionPatient, dtype=float) - np.array(first.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(step, 2.5 * normal, atol=1e-6)
    assert first.SOPClassUID == dicom.CT_IMAGE_STORAGE and first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.8, 0.8]) and float(first.SliceThickness) == 2.5
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files)


def test_slope_and_intercept_reproduce_the_values(tmp_path):
    volume = -1024.0 + 0.5 * np.random.default_rng(1).integers(0, 6000, SHAPE)
    folder = _good_series(tmp_path, volume=volume, slope=0.5, intercept=-1024.0, modality="MR")
    ds = pydicom.dcmread(folder / "slice_0000.dcm")
    assert float(ds.RescaleSlope) == 0.5 and float(ds.RescaleIntercept) == -1024.0
    assert ds.SOPClassUID == dicom.MR_IMAGE_STORAGE and ds.Modality == "MR"
    np.testing.assert_array_equal(ds.pixel_array.T, (volume[:, :, 0] + 1024.0) * 2)
    array, _ = dicom.read_series(folder)
    np.testing.assert_array_equal(array, _expected(volume, _axial_affine())[0])


def test_write_is_reproducible_and_uses_the_given_series_uid(tmp_path):
    a, b = _good_series(tmp_path, "a"), _good_series(tmp_path, "b")
    assert [f.name for f in sorted(a.iterdir())] == [f"slice_{k:04d}.dcm" for k in range(SHAPE[2])]
    for name in ("slice_0000.dcm", "slice_0004.dcm"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    uid = generate_uid()
    c = _good_series(tmp_path, "c", series_uid=uid)
    assert pydicom.dcmread(c / "slice_0000.dcm").SeriesInstanceUID == uid


def test_file_names_do_not_decide_the_slice_order(tmp_path):
    volume, affine = _volume(), _oblique_affine()
    folder = _good_series(tmp_path, volume=volume, affine=affine)
    files = sorted(folder.iterdir())
    # Reverse the name order, and drop the extension of some files (DICM marker files are found too).
    for k, path in enumerate(files):
        path.rename(folder / f"tmp_{k}")
    for k in range(len(files)):
        new_name = f"IM{len(files) - k:02d}" + (".dcm" if k % 2 else "")
        (folder / f"tmp_{k}").rename(folder / new_name)
    array, geometry = dicom.read_series(folder)
    np.testing.assert_array_equal(array, _expected(volume, affine)[0])
    np.testing.assert_allclose(geometry.affine, affine, rtol=0, atol=1e-4)


def test_slices_against_the_normal_read_back_reversed_with_the_same_voxels(tmp_path):
    affine = _axial_affine() @ np.diag([1.0, 1.0, -1.0, 1.0])  # k runs inferior: negative determinant
    volume = _volume()
    array, geometry = dicom.read_series(_good_series(tmp_path, volume=volume, affine=affine))
    np.testing.assert_array_equal(array, _expected(volume, affine)[0])
    np.testing.assert_allclose(geometry.affine[:3, 2], -affine[:3, 2], atol=1e-6)
    np.testing.assert_allclose(geometry.canonical_affine, _expected(volume, affine)[1].canonical_affine, atol=1e-4)


def test_single_slice_uses_slice_thickness(tmp_path):
    volume, affine = _volume((7, 6, 1)), _oblique_affine()
    folder = _good_series(tmp_path, volume=volume, affine=affine)
    array, geometry = dicom.read_series(folder)
    np.testing.assert_allclose(geometry.affine, affine, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(array, _expected(volume, affine)[0])
    _edit(folder / "slice_0000.dcm", SliceThickness=None)
    message = _error(folder)
    assert "slice_0000.dcm" in message and "single-slice" in message and "SliceThickness" in message
    _edit(folder / "slice_0000.dcm", SpacingBetweenSlices="2.5")
    np.testing.assert_allclose(dicom.read_series(folder)[1].affine, affine, rtol=0, atol=1e-4)


# --- is_dicom_series --------------------------------------------------------------------------------------------


def test_is_dicom_series(tmp_path):
    folder = _good_series(tmp_path)
    assert dicom.is_dicom_series(folder)
    assert not dicom.is_dicom_series(folder / "slice_0000.dcm")  # a file, not a folder
    assert not dicom.is_dicom_series(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not dicom.is_dicom_series(empty)
    # Hidden files, subfolders and extensionless files without the DICM marker do not count.
    (empty / "notes").write_text("not dicom " * 20)
    (empty / "scan.nii.gz").write_bytes(b"\0" * 400)
    shutil.copy(folder / "slice_0000.dcm", empty / ".hidden.dcm")
    shutil.copytree(folder, empty / "sub")
    assert not dicom.is_dicom_series(empty)
    shutil.copy(folder / "slice_0000.dcm", empty / "IM0001")  # no extension, DICM marker
    assert dicom.is_dicom_series(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_text("junk")  # named .dcm: counts (read_series then reports it)
    assert dicom.is_dicom_series(junk)


# --- write_series refusals --------------------------------------------------------------------------------------


def test_write_series_refuses_bad_input(tmp_path):
    skewed = _axial_affine()
    skewed[:3, 1] += [0.1, 0.0, 0.0]  # first two columns not orthogonal
    with pytest.raises(ValueError, match="orthogonal"):
        dicom.write_series(tmp_path / "a", _volume(), skewed)
    sheared = _axial_affine()
    sheared[:3, 2] += [0.3, 0.0, 0.0]  # slices not stacked along the normal
    with pytest.raises(ValueError, match="perpendicular"):
        dicom.write_series(tmp_path / "b", _volume(), sheared)
    with pytest.raises(ValueError, match="whole numbers"):
        dicom.write_series(tmp_path / "c", _volume() + 0.25, _axial_affine())
    with pytest.raises(ValueError, match="int16"):
        dicom.write_series(tmp_path / "d", _volume().astype(np.int32) + 40000, _axial_affine())
    with pytest.raises(ValueError, match="3D"):
        dicom.write_series(tmp_path / "e", _volume()[..., 0], _axial_affine())
    with pytest.raises(ValueError, match="modality"):
        dicom.write_series(tmp_path / "f", _volume(), _axial_affine(), modality="US")
    folder = _good_series(tmp_path)
    with pytest.raises(FileExistsError):
        dicom.write_series(folder, _volume(), _axial_affine())
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))


# --- read_series errors -----------------------------------------------------------------------------------------


def test_missing_or_empty_folder(tmp_path):
    assert "folder not found" in _error(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    message = _error(empty)
    assert str(empty) in message and "no DICOM files" in message
    folder = _good_series(tmp_path)
    assert "expected a folder" in _error(folder / "slice_0000.dcm")


def test_unreadable_file(tmp_path):
    folder = _good_series(tmp_path)
    (folder / "junk.dcm").write_text("this is not a DICOM file\n" * 20)
    message = _error(folder)
    assert str(folder / "junk.dcm") in message and "cannot read as DICOM" in message


def test_two_series_in_one_folder(tmp_path):
    folder = _good_series(tmp_path)
    ds = pydicom.dcmread(folder / "slice_0002.dcm")
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "other.dcm")
    message = _error(folder)
    assert str(folder) in message and "2 series" in message and "one folder per series" in message
    assert "other.dcm" in message


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_tag(tmp_path, keyword):
    folder = _good_series(tmp_path)
    _edit(folder / "slice_0003.dcm", **{keyword: None})
    message = _error(folder)
    assert str(folder / "slice_0003.dcm") in message and f"missing {keyword}" in message


@pytest.mark.parametrize("keyword, value, words", [
    ("ImageOrientationPatient", ["1", "0", "0", "0", "0.9848", "0.1736"], "orientation"),
    ("PixelSpacing", ["0.9", "0.7"], "pixel spacing"),
    ("Rows", 5, "image size"),
    ("Columns", 8, "image size"),
])
def test_slices_that_disagree(tmp_path, keyword, value, words):
    folder = _good_series(tmp_path)
    _edit(folder / "slice_0001.dcm", **{keyword: value})
    message = _error(folder)
    assert str(folder / "slice_0001.dcm") in message and words in message and "differs from" in message


def test_two_slices_at_the_same_position(tmp_path):
    folder = _good_series(tmp_path)
    ds = pydicom.dcmread(folder / "slice_0002.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "copy.dcm")
    message = _error(folder)
    assert str(folder) in message and "same position" in message
    assert "copy.dcm" in message and "slice_0002.dcm" in message


def test_missing_slice(tmp_path):
    folder = _good_series(tmp_path, volume=_volume((7, 6, 6)))
    (folder / "slice_0002.dcm").unlink()
    message = _error(folder)
    assert str(folder) in message and "not evenly spaced" in message
    assert "gap of 5 mm" in message and "expected 2.5 mm" in message and "1 slice(s) missing" in message
    assert "slice_0001.dcm" in message and "slice_0003.dcm" in message


def test_small_spacing_jitter_is_accepted(tmp_path):
    folder = _good_series(tmp_path)
    ds = pydicom.dcmread(folder / "slice_0002.dcm")
    ds.ImagePositionPatient = [-100.0, -120.5, -50.25 + 2 * 2.5 + 0.01]  # 0.4% of the 2.5 mm spacing
    ds.save_as(folder / "slice_0002.dcm")
    dicom.read_series(folder)


def test_slices_drifting_sideways(tmp_path):
    folder = _good_series(tmp_path)
    for k in range(SHAPE[2]):
        ds = pydicom.dcmread(folder / f"slice_{k:04d}.dcm")
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1] + 0.5 * k, position[2]]  # gantry tilt
        ds.save_as(folder / f"slice_{k:04d}.dcm")
    message = _error(folder)
    assert str(folder) in message and "gantry tilt" in message


def test_multi_frame_is_refused(tmp_path):
    folder = _good_series(tmp_path)
    _edit(folder / "slice_0000.dcm", NumberOfFrames=2)
    message = _error(folder)
    assert str(folder / "slice_0000.dcm") in message and "multi-frame" in message and "not supported" in message


def test_undecodable_pixel_data(tmp_path):
    folder = _good_series(tmp_path)
    path = folder / "slice_0004.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a real codestream"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path)
    message = _error(folder)
    assert str(path) in message and "cannot decode the pixel data" in message and "JPEG 2000" in message


def test_non_finite_values(tmp_path):
    folder = _good_series(tmp_path)
    _edit(folder / "slice_0003.dcm", RescaleSlope="1e38")  # overflows float32
    message = _error(folder)
    assert str(folder / "slice_0003.dcm") in message and "NaN or infinite" in message
