import gzip
import itertools
import json
import os
import zlib

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from medseg_jax.errors import MedsegError
from medseg_jax.io import geometry as geometry_lib
from medseg_jax.io import nifti
from tests.conftest import rotation as rotate


def _affine(axcodes, spacing=(0.8, 1.1, 2.5), rotation=None, offset=(-12.5, 30.25, 7.0)):
    """An affine whose array axes point along `axcodes` (e.g. "PIR"), optionally rotated (oblique)."""
    ornt = orientations.axcodes2ornt(axcodes)
    linear = np.zeros((3, 3))
    for array_axis, (world_axis, flip) in enumerate(ornt):
        linear[int(world_axis), array_axis] = flip * spacing[array_axis]
    if rotation is not None:
        linear = rotate(*rotation) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset
    return affine


def _save(path, data, affine, sform_code=1, qform_code=1):
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


def _assert_one_line_naming(excinfo, path):
    message = str(excinfo.value)
    assert os.path.basename(str(path)) in message
    assert "\n" not in message


CASES = [
    ("RAS", None),
    ("LPS", None),
    ("LAS", None),
    ("PIR", None),
    ("ASL", None),
    ("SLP", None),
    ("IRA", None),
    ("RAS", ((1, 2, 3), 17)),
    ("LPS", ((0, 0, 1), 5)),
    ("PIR", ((1, -1, 0.5), 30)),
    ("ASL", ((-2, 1, 1), 12)),
    ("LIA", ((0.3, 1, -0.2), 25)),
]
HEADER_CODES = [(1, 1), (2, 1), (0, 1), (1, 0), (4, 2)]


@pytest.mark.parametrize("axcodes,rotation", CASES)
@pytest.mark.parametrize("sform_code,qform_code", HEADER_CODES)
def test_label_round_trip_keeps_geometry(tmp_path, axcodes, rotation, sform_code, qform_code):
    rng = np.random.default_rng(zlib.crc32(f"{axcodes}{rotation}{sform_code}{qform_code}".encode()))
    data = rng.integers(0, 6, size=(7, 9, 11)).astype(np.int16)
    source = _save(tmp_path / "scan.nii.gz", data, _affine(axcodes, rotation=rotation), sform_code, qform_code)

    label, geometry = nifti.read_label(source)
    original = nib.load(source)
    canonical = nib.as_closest_canonical(original)
    assert label.shape == canonical.shape
    assert label.dtype == np.int16
    assert np.array_equal(label, np.asarray(canonical.dataobj))
    assert np.allclose(geometry.canonical_affine, canonical.affine, atol=1e-6)
    assert geometry.canonical_shape() == canonical.shape
    assert geometry.shape == (7, 9, 11)
    assert np.array_equal(geometry.affine, original.affine)

    out = tmp_path / "pred.nii.gz"
    nifti.write_label(out, label, geometry)
    written = nib.load(out)
    assert written.shape == original.shape
    assert np.array_equal(written.affine, original.affine)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), data)
    for key in ("sform_code", "qform_code"):
        assert written.header[key] == original.header[key]
    assert np.array_equal(written.header.get_sform(), original.header.get_sform())
    assert np.array_equal(written.header.get_qform(), original.header.get_qform())
    assert np.array_equal(written.header["pixdim"][:4], original.header["pixdim"][:4])
    assert sorted(os.listdir(tmp_path)) == ["pred.nii.gz", "scan.nii.gz"]


def test_no_sform_no_qform_falls_back_to_pixdims(tmp_path):
    data = np.arange(7 * 9 * 11, dtype=np.int16).reshape(7, 9, 11) % 7
    # nibabel overwrites the codes on save when the image has an affine, so build it from a bare header
    img = nib.Nifti1Image(data, None)
    img.header.set_zooms((0.5, 0.75, 2.0))
    nib.save(img, tmp_path / "scan.nii")
    original = nib.load(tmp_path / "scan.nii")
    assert original.header["sform_code"] == 0 and original.header["qform_code"] == 0
    label, geometry = nifti.read_label(tmp_path / "scan.nii")
    assert np.array_equal(label, np.asarray(nib.as_closest_canonical(original).dataobj))
    nifti.write_label(tmp_path / "pred.nii", label, geometry)
    written = nib.load(tmp_path / "pred.nii")
    assert written.header["sform_code"] == 0 and written.header["qform_code"] == 0
    assert np.array_equal(written.affine, original.affine)
    assert np.array_equal(np.asarray(written.dataobj), data)


@pytest.mark.parametrize("axcodes", ["".join(p) for p in itertools.product("RL", "AP", "SI")] +
                         ["".join(p) for p in itertools.permutations("RAS")] + ["PIR", "ASL", "ILP", "SPL"])
def test_to_and_from_canonical_are_inverse_with_channels(axcodes):
    geometry = geometry_lib.Geometry.from_affine(_affine(axcodes), (3, 4, 5))
    array = np.arange(3 * 4 * 5 * 2).reshape(3, 4, 5, 2)
    canonical = geometry_lib.to_canonical(array, geometry)
    assert canonical.shape[:3] == geometry.canonical_shape()
    expected = orientations.apply_orientation(array, orientations.io_orientation(geometry.affine))
    assert np.array_equal(canonical, expected)
    assert np.array_equal(geometry_lib.from_canonical(canonical, geometry), array)


def test_spacing_in_canonical_order(tmp_path):
    # PIR: file axis 0 -> posterior (y), 1 -> inferior (z), 2 -> right (x)
    source = _save(tmp_path / "aniso.nii.gz", np.zeros((4, 5, 6), np.float32), _affine("PIR", spacing=(0.7, 1.3, 3.0)))
    image, geometry = nifti.read_image(source)
    assert image.shape == (6, 4, 5, 1)
    assert np.allclose(geometry.spacing, (3.0, 0.7, 1.3), atol=1e-6)


def test_geometry_dict_round_trip(tmp_path):
    source = _save(tmp_path / "scan.nii.gz", np.ones((4, 5, 6), np.int16), _affine("LIA", rotation=((1, 1, 0), 20)),
                   sform_code=2, qform_code=1)
    label, geometry = nifti.read_label(source)
    restored = geometry_lib.Geometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert restored.shape == geometry.shape and restored.spacing == geometry.spacing
    assert np.array_equal(restored.affine, geometry.affine)
    assert np.array_equal(restored.to_canonical, geometry.to_canonical)
    assert np.array_equal(restored.canonical_affine, geometry.canonical_affine)
    nifti.write_label(tmp_path / "a.nii.gz", label, geometry)
    nifti.write_label(tmp_path / "b.nii.gz", label, restored)
    a, b = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    assert a.header.binaryblock == b.header.binaryblock


def test_geometry_without_header_writes_scanner_codes(tmp_path):
    affine = _affine("LPS", rotation=((0, 1, 0), 10))
    geometry = geometry_lib.Geometry.from_affine(affine, (3, 4, 5))
    label = np.ones(geometry.canonical_shape(), np.int32)
    nifti.write_label(tmp_path / "p.nii.gz", label, geometry)
    written = nib.load(tmp_path / "p.nii.gz")
    assert written.header["sform_code"] == 1 and written.header["qform_code"] == 1
    assert np.allclose(written.affine, affine, atol=1e-6)


def test_reference_header_is_used(tmp_path):
    affine = _affine("LAS")
    source = _save(tmp_path / "scan.nii.gz", np.zeros((3, 4, 5), np.int16), affine, sform_code=3, qform_code=2)
    geometry = geometry_lib.Geometry.from_affine(affine, (3, 4, 5))  # no header fields recorded
    nifti.write_label(tmp_path / "p.nii.gz", np.zeros((3, 4, 5), np.uint8), geometry,
                      reference_header=nib.load(source).header)
    written = nib.load(tmp_path / "p.nii.gz")
    assert written.header["sform_code"] == 3 and written.header["qform_code"] == 2


def test_label_dtype_grows_with_values(tmp_path):
    source = _save(tmp_path / "scan.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("RAS"))
    _, geometry = nifti.read_label(source)
    label = np.zeros((3, 4, 5), np.int32)
    label[0, 0, 0] = 300
    nifti.write_label(tmp_path / "p.nii.gz", label, geometry)
    written = nib.load(tmp_path / "p.nii.gz")
    assert written.get_data_dtype() == np.int16
    assert np.asarray(written.dataobj)[0, 0, 0] == 300


def test_float_label_with_integer_values_is_accepted(tmp_path):
    data = np.zeros((3, 4, 5), np.float32)
    data[1, 1, 1] = 2.0
    source = _save(tmp_path / "seg.nii.gz", data, _affine("RAS"))
    label, _ = nifti.read_label(source)
    assert label.dtype == np.int16 and label[1, 1, 1] == 2


def test_4d_image_is_channels_last(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7, 3)).astype(np.float32)
    source = _save(tmp_path / "multi.nii.gz", data, _affine("PIR"))
    image, geometry = nifti.read_image(source)
    canonical = nib.as_closest_canonical(nib.load(source))
    assert image.shape == (7, 5, 6, 3)
    assert image.dtype == np.float32
    assert np.array_equal(image, canonical.get_fdata(dtype=np.float32))
    nifti.write_image(tmp_path / "back.nii.gz", image, geometry)
    back = nib.load(tmp_path / "back.nii.gz")
    assert back.shape == data.shape and np.array_equal(back.get_fdata(dtype=np.float32), data)
    assert np.array_equal(back.affine, nib.load(source).affine)


def test_write_image_single_channel_is_3d(tmp_path):
    data = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    source = _save(tmp_path / "ct.nii.gz", data, _affine("LPS", rotation=((1, 0, 0), 8)))
    image, geometry = nifti.read_image(source)
    assert image.shape == (4, 5, 6, 1)
    nifti.write_image(tmp_path / "prob.nii.gz", image, geometry)
    back = nib.load(tmp_path / "prob.nii.gz")
    assert back.shape == (4, 5, 6)
    assert np.array_equal(back.get_fdata(dtype=np.float32), data)


def test_read_images_stacks_channels(tmp_path):
    affine = _affine("LPS")
    first = _save(tmp_path / "case_0000.nii.gz", np.full((3, 4, 5), 1, np.int16), affine)
    second = _save(tmp_path / "case_0001.nii.gz", np.full((3, 4, 5), 2, np.int16), affine)
    image, geometry = nifti.read_images([first, second])
    assert image.shape == (3, 4, 5, 2)
    assert np.all(image[..., 0] == 1) and np.all(image[..., 1] == 2)
    assert np.array_equal(geometry.affine, nib.load(first).affine)


def test_read_images_rejects_mismatched_shape(tmp_path):
    first = _save(tmp_path / "case_0000.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("RAS"))
    second = _save(tmp_path / "case_0001.nii.gz", np.zeros((3, 4, 6), np.int16), _affine("RAS"))
    with pytest.raises(MedsegError) as excinfo:
        nifti.read_images([first, second])
    _assert_one_line_naming(excinfo, second)


def test_read_images_rejects_mismatched_affine(tmp_path):
    first = _save(tmp_path / "case_0000.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("RAS"))
    second = _save(tmp_path / "case_0001.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("RAS", offset=(0, 0, 9)))
    with pytest.raises(MedsegError) as excinfo:
        nifti.read_images([first, second])
    _assert_one_line_naming(excinfo, second)


# --- bad inputs -------------------------------------------------------------------------------------------------------

def _truncated_gz(tmp_path):
    path = _save(tmp_path / "truncated.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32),
                 _affine("RAS"))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def _truncated_nii(tmp_path):
    path = _save(tmp_path / "truncated.nii", np.zeros((20, 20, 20), np.float32), _affine("RAS"))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def _random_bytes(name):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        return path
    return make


def _gzipped_garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 40))
    return path


def _text_file(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("patient notes, definitely not an image\n")
    return path


def _image_2d(tmp_path):
    return _save(tmp_path / "slice.nii.gz", np.zeros((8, 9), np.float32), np.eye(4))


def _image_nan(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    return _save(tmp_path / "nan.nii.gz", data, _affine("RAS"))


def _image_inf(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, 0] = np.inf
    return _save(tmp_path / "inf.nii.gz", data, _affine("LPS"))


def _zero_spacing(tmp_path):
    # nibabel cannot put a zero column into the qform, so only the sform carries it
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(img, tmp_path / "flat.nii.gz")
    return tmp_path / "flat.nii.gz"


def _zero_pixdim(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    img.header.set_qform(np.eye(4), code=1)
    img.header["pixdim"][3] = 0.0
    nib.save(img, tmp_path / "zero_pixdim.nii.gz")
    return tmp_path / "zero_pixdim.nii.gz"


def _negative_pixdim(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    img.header.set_qform(np.eye(4), code=1)
    img.header["pixdim"][2] = -1.0
    nib.save(img, tmp_path / "negative_pixdim.nii.gz")
    return tmp_path / "negative_pixdim.nii.gz"


def _singular_affine(tmp_path):
    affine = np.eye(4)
    affine[:3, 1] = affine[:3, 0]  # two voxel axes along x
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    img.header.set_qform(None, code=0)
    nib.save(img, tmp_path / "singular.nii.gz")
    return tmp_path / "singular.nii.gz"


def _folder(tmp_path):
    path = tmp_path / "folder.nii.gz"
    path.mkdir()
    return path


BAD_IMAGES = {
    "missing": lambda tmp_path: tmp_path / "missing.nii.gz",
    "folder": _folder,
    "truncated_gz": _truncated_gz,
    "truncated_nii": _truncated_nii,
    "random_bytes_gz": _random_bytes("random.nii.gz"),
    "random_bytes_nii": _random_bytes("random.nii"),
    "gzipped_garbage": _gzipped_garbage,
    "text_file": _text_file,
    "2d": _image_2d,
    "nan": _image_nan,
    "inf": _image_inf,
    "zero_spacing": _zero_spacing,
    "zero_pixdim": _zero_pixdim,
    "negative_pixdim": _negative_pixdim,
    "singular_affine": _singular_affine,
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_raises_one_line_error(tmp_path, kind):
    path = BAD_IMAGES[kind](tmp_path)
    with pytest.raises(MedsegError) as excinfo:
        nifti.read_image(path)
    _assert_one_line_naming(excinfo, path)


@pytest.mark.parametrize("kind", ["missing", "truncated_gz", "random_bytes_gz", "text_file", "2d", "zero_spacing"])
def test_bad_label_file_raises_one_line_error(tmp_path, kind):
    path = BAD_IMAGES[kind](tmp_path)
    with pytest.raises(MedsegError) as excinfo:
        nifti.read_label(path)
    _assert_one_line_naming(excinfo, path)


def test_label_with_fractional_values(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[2, 2, 2] = 0.5
    path = _save(tmp_path / "soft.nii.gz", data, _affine("RAS"))
    with pytest.raises(MedsegError, match="non-integer") as excinfo:
        nifti.read_label(path)
    _assert_one_line_naming(excinfo, path)


def test_label_with_negative_values(tmp_path):
    data = np.zeros((4, 5, 6), np.int16)
    data[0, 0, 0] = -1
    path = _save(tmp_path / "neg.nii.gz", data, _affine("RAS"))
    with pytest.raises(MedsegError, match="negative") as excinfo:
        nifti.read_label(path)
    _assert_one_line_naming(excinfo, path)


def test_label_with_several_channels(tmp_path):
    path = _save(tmp_path / "multi_seg.nii.gz", np.zeros((4, 5, 6, 2), np.int16), _affine("RAS"))
    with pytest.raises(MedsegError) as excinfo:
        nifti.read_label(path)
    _assert_one_line_naming(excinfo, path)


def test_check_same_grid(tmp_path):
    image = _save(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32), _affine("LPS"))
    same = _save(tmp_path / "same.nii.gz", np.zeros((4, 5, 6), np.int16), _affine("LPS"))
    _, image_geom = nifti.read_image(image)
    _, same_geom = nifti.read_label(same)
    nifti.check_same_grid(image_geom, same_geom, image, same)

    # the same voxels stored in RAS order are on the same grid once canonical
    ras = nib.as_closest_canonical(nib.load(same))
    nib.save(ras, tmp_path / "ras.nii.gz")
    _, ras_geom = nifti.read_label(tmp_path / "ras.nii.gz")
    nifti.check_same_grid(image_geom, ras_geom, image, tmp_path / "ras.nii.gz")

    wrong_shape = _save(tmp_path / "wrong_shape.nii.gz", np.zeros((4, 5, 7), np.int16), _affine("LPS"))
    _, geom = nifti.read_label(wrong_shape)
    with pytest.raises(MedsegError, match="shape") as excinfo:
        nifti.check_same_grid(image_geom, geom, image, wrong_shape)
    _assert_one_line_naming(excinfo, wrong_shape)
    assert "img.nii.gz" in str(excinfo.value)

    shifted = _save(tmp_path / "shifted.nii.gz", np.zeros((4, 5, 6), np.int16), _affine("LPS", offset=(0, 0, 1)))
    _, geom = nifti.read_label(shifted)
    with pytest.raises(MedsegError, match="affine") as excinfo:
        nifti.check_same_grid(image_geom, geom, image, shifted)
    _assert_one_line_naming(excinfo, shifted)

    tiny = _save(tmp_path / "tiny_shift.nii.gz", np.zeros((4, 5, 6), np.int16), _affine("LPS", offset=(-12.5, 30.25,
                                                                                                         7.0004)))
    _, geom = nifti.read_label(tiny)
    nifti.check_same_grid(image_geom, geom, image, tiny)  # within atol=1e-3


# --- atomic writes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("write", ["label", "image"])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, write):
    source = _save(tmp_path / "scan.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("PIR"))
    label, geometry = nifti.read_label(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.nii.gz").write_bytes(b"previous prediction")

    def broken_save(img, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    for name in ("new.nii.gz", "keep.nii.gz"):
        with pytest.raises(OSError, match="disk full"):
            if write == "label":
                nifti.write_label(out_dir / name, label, geometry)
            else:
                nifti.write_image(out_dir / name, label.astype(np.float32), geometry)
    assert sorted(os.listdir(out_dir)) == ["keep.nii.gz"]
    assert (out_dir / "keep.nii.gz").read_bytes() == b"previous prediction"


def test_write_rejects_non_nifti_name(tmp_path):
    source = _save(tmp_path / "scan.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("RAS"))
    label, geometry = nifti.read_label(source)
    with pytest.raises(MedsegError, match="pred.mha"):
        nifti.write_label(tmp_path / "pred.mha", label, geometry)
    assert sorted(os.listdir(tmp_path)) == ["scan.nii.gz"]


def test_write_label_rejects_wrong_shape(tmp_path):
    source = _save(tmp_path / "scan.nii.gz", np.zeros((3, 4, 5), np.int16), _affine("PIR"))
    _, geometry = nifti.read_label(source)
    with pytest.raises(ValueError):
        nifti.write_label(tmp_path / "p.nii.gz", np.zeros((3, 4, 5), np.uint8), geometry)  # file order, not canonical
