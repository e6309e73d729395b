"""medseg_jax.io.formats: every format's round trip (pixels, spacing, origin, direction), agreement with SimpleITK,
nibabel and Pillow on what a file holds, and one-line errors for what cannot be read."""

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg_jax.errors import MedsegError
from medseg_jax.io import formats, nifti
from medseg_jax.io.geometry import Geometry
from tests.conftest import rotation

SHAPE = (5, 4, 3)  # file order (x, y, z); no two axes alike, so a wrong transpose changes the shape
SPACING = (0.7, 1.3, 2.5)
ORIGIN_LPS = (-12.5, 30.25, 7.0)
# An oblique LPS direction: the axes permuted and flipped (so the canonical order differs from the file's), then
# rotated by 25 degrees about an axis that is none of x, y, z.
DIRECTION_LPS = rotation([1.0, 2.0, 3.0], 25) @ np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _ras_affine(direction=DIRECTION_LPS, spacing=SPACING, origin=ORIGIN_LPS):
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _sitk_image(file_order, direction=DIRECTION_LPS, spacing=SPACING, origin=ORIGIN_LPS):
    """A SimpleITK image of a file-order (x, y, z[, c]) array with the given LPS geometry."""
    vector = file_order.ndim == 4
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(file_order, [0, 1, 2], [2, 1, 0])),
                                   isVector=vector)
    image.SetDirection([float(v) for v in np.ravel(direction)])
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    return image


def _one_line_naming(excinfo, path):
    message = str(excinfo.value)
    assert os.path.basename(str(path)) in message, message
    assert "\n" not in message
    return message


@pytest.fixture
def geometry():
    geometry = Geometry.from_affine(_ras_affine(), SHAPE)
    assert not np.array_equal(geometry.to_canonical, [[0, 1], [1, 1], [2, 1]])  # the canonical order is another
    return geometry


# --- ITK ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", formats.ITK)
def test_itk_round_trip(tmp_path, geometry, ending):
    rng = np.random.default_rng(0)
    canonical_shape = geometry.canonical_shape()
    image = rng.normal(size=(*canonical_shape, 1)).astype(np.float32)
    label = rng.integers(0, 6, size=canonical_shape).astype(np.int16)
    label[0, 0, 0] = 300  # beyond uint8: stored as int16

    formats.write_image(tmp_path / f"image{ending}", image, geometry)
    formats.write_label(tmp_path / f"label{ending}", label, geometry)
    read, image_geometry = formats.read_image(tmp_path / f"image{ending}")
    read_label, label_geometry = formats.read_label(tmp_path / f"label{ending}")

    np.testing.assert_allclose(read, image, rtol=0, atol=1e-6)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read_label, label)
    assert read_label.dtype == np.int16
    for read_geometry in (image_geometry, label_geometry):
        np.testing.assert_allclose(read_geometry.affine, geometry.affine, rtol=0, atol=1e-6)
        np.testing.assert_allclose(read_geometry.canonical_affine, geometry.canonical_affine, rtol=0, atol=1e-6)
        assert read_geometry.shape == SHAPE
    # What SimpleITK itself makes of the file: the LPS geometry it was given.
    itk = sitk.ReadImage(str(tmp_path / f"label{ending}"))
    assert itk.GetSize() == SHAPE
    np.testing.assert_allclose(np.reshape(itk.GetDirection(), (3, 3)), DIRECTION_LPS, atol=1e-6)
    np.testing.assert_allclose(itk.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(itk.GetOrigin(), ORIGIN_LPS, atol=1e-6)


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_detached_header_names_its_final_data_file(tmp_path, geometry, ending):
    label = np.ones(geometry.canonical_shape(), dtype=np.uint8)
    formats.write_label(tmp_path / f"case{ending}", label, geometry)
    data_file = "case.zraw" if ending == ".mhd" else "case.raw.gz"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"case{ending}", data_file])  # no temporaries left
    header = (tmp_path / f"case{ending}").read_text(encoding="latin-1")
    key = "ElementDataFile = " if ending == ".mhd" else "data file: "
    assert f"{key}{data_file}\n" in header  # relative, and the final name rather than the temporary one
    np.testing.assert_array_equal(formats.read_label(tmp_path / f"case{ending}")[0], label)


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_sitk_written_reads_as_nibabel_reads_the_same_nifti(tmp_path, ending):
    """A file SimpleITK wrote with a known LPS geometry gives the canonical array and affine that nibabel gives for
    the NIfTI holding the same voxels with the RAS affine diag(-1, -1, 1) @ LPS."""
    data = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    sitk.WriteImage(_sitk_image(data), str(tmp_path / f"scan{ending}"))
    nib.save(nib.Nifti1Image(data, _ras_affine()), str(tmp_path / "scan.nii.gz"))

    image, geometry = formats.read_image(tmp_path / f"scan{ending}")
    expected, expected_geometry = nifti.read_image(tmp_path / "scan.nii.gz")
    assert image.shape == expected.shape
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_allclose(geometry.affine, expected_geometry.affine, atol=1e-5)
    np.testing.assert_allclose(geometry.canonical_affine, expected_geometry.canonical_affine, atol=1e-5)


def test_itk_nifti_reader_agrees(tmp_path):
    """ITK's own NIfTI reader, rather than the formula in formats: a NIfTI nibabel wrote, converted to .mha by
    SimpleITK, reads as the NIfTI does."""
    data = np.random.default_rng(2).integers(0, 9, size=SHAPE).astype(np.int16)
    affine = _ras_affine()
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(tmp_path / "label.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "label.nii.gz")), str(tmp_path / "label.mha"))

    label, geometry = formats.read_label(tmp_path / "label.mha")
    expected, expected_geometry = formats.read_label(tmp_path / "label.nii.gz")  # delegated to nifti.read_label
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_allclose(geometry.canonical_affine, expected_geometry.canonical_affine, atol=1e-4)


def test_vector_mha_gives_channels(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(*SHAPE, 3)).astype(np.float32)  # file order (x, y, z, c)
    identity = np.eye(3)
    sitk.WriteImage(_sitk_image(data, direction=np.diag([-1.0, -1.0, 1.0])), str(tmp_path / "vector.mha"))
    image, geometry = formats.read_image(tmp_path / "vector.mha")
    assert image.shape == (*SHAPE, 3)  # LPS direction flipped to RAS: canonical order is the file's
    np.testing.assert_array_equal(image[1, 2, 0], data[1, 2, 0])
    np.testing.assert_allclose(geometry.affine[:3, :3], identity @ np.diag(SPACING))

    formats.write_image(tmp_path / "copy.mha", image, geometry)
    assert sitk.ReadImage(str(tmp_path / "copy.mha")).GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(formats.read_image(tmp_path / "copy.mha")[0], image)


def test_2d_mha_becomes_one_slice_and_stays_2d(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)  # (y, x)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing((0.5, 2.0))
    image.SetOrigin((3.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / "slice.mha"))

    label, geometry = formats.read_label(tmp_path / "slice.mha")
    assert label.shape == (4, 3, 1)  # (x, y, z): flipped x and y back to RAS order by the canonical reordering
    np.testing.assert_array_equal(geometry.affine, [[-0.5, 0, 0, -3], [0, -2, 0, -4], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(label[::-1, ::-1, 0], pixels.T)

    formats.write_label(tmp_path / "copy.mha", label, geometry)
    copy = sitk.ReadImage(str(tmp_path / "copy.mha"))
    assert copy.GetDimension() == 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(copy), pixels)
    assert copy.GetSpacing() == (0.5, 2.0) and copy.GetOrigin() == (3.0, 4.0)


def test_read_images_stacks_channels_and_checks_the_grid(tmp_path, geometry):
    rng = np.random.default_rng(4)
    channels = [rng.normal(size=(*geometry.canonical_shape(), 1)).astype(np.float32) for _ in range(2)]
    formats.write_image(tmp_path / "c0.mha", channels[0], geometry)
    formats.write_image(tmp_path / "c1.nrrd", channels[1], geometry)
    stacked, _ = formats.read_images([tmp_path / "c0.mha", tmp_path / "c1.nrrd"])
    np.testing.assert_allclose(stacked, np.concatenate(channels, axis=-1), atol=1e-6)

    moved = Geometry.from_affine(_ras_affine(origin=(0.0, 0.0, 0.0)), SHAPE)
    formats.write_image(tmp_path / "c2.mha", channels[1], moved)
    with pytest.raises(MedsegError, match="affine differs") as excinfo:
        formats.read_images([tmp_path / "c0.mha", tmp_path / "c2.mha"])
    _one_line_naming(excinfo, "c2.mha")


# --- 2D pictures -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, mode", [(np.uint8, "L"), (np.uint16, "I;16")])
def test_greyscale_png(tmp_path, dtype, mode):
    pixels = (np.arange(7 * 4).reshape(7, 4) * (1 if dtype == np.uint8 else 2000)).astype(dtype)  # (rows=y, cols=x)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    with Image.open(tmp_path / "grey.png") as picture:
        assert picture.mode == mode
        at_2_5 = picture.getpixel((2, 5))

    image, geometry = formats.read_image(tmp_path / "grey.png")
    assert image.shape == (4, 7, 1, 1) and image.dtype == np.float32
    assert image[2, 5, 0, 0] == at_2_5
    np.testing.assert_array_equal(image[:, :, 0, 0], pixels.T)
    assert geometry.spacing == (1.0, 1.0, 1.0)

    label, _ = formats.read_label(tmp_path / "grey.png")
    np.testing.assert_array_equal(label[:, :, 0], pixels.T)
    formats.write_label(tmp_path / "copy.png", label, geometry)
    with Image.open(tmp_path / "copy.png") as copy:
        assert copy.mode == mode
        np.testing.assert_array_equal(np.asarray(copy), pixels)
    formats.write_image(tmp_path / "image.png", image, geometry)
    np.testing.assert_array_equal(formats.read_image(tmp_path / "image.png")[0], image)


def test_palette_png_label_keeps_indices(tmp_path):
    indices = np.array([[0, 1, 2, 2], [1, 0, 0, 3], [3, 3, 1, 0]], dtype=np.uint8)  # (y, x)
    picture = Image.frombytes("P", (4, 3), indices.tobytes())
    colours = [(0, 0, 0), (200, 10, 10), (10, 200, 10), (10, 10, 200)]
    picture.putpalette([v for colour in colours for v in colour])
    picture.save(tmp_path / "label.png")

    label, _ = formats.read_label(tmp_path / "label.png")
    np.testing.assert_array_equal(label[:, :, 0], indices.T)  # indices, not colours
    image, _ = formats.read_image(tmp_path / "label.png")  # as an image, the colours
    assert image.shape == (4, 3, 1, 3)
    assert tuple(image[3, 1, 0]) == colours[3]


def test_rgb_png_channels_in_order(tmp_path):
    pixels = np.random.default_rng(5).integers(0, 256, size=(7, 4, 3), dtype=np.uint8)  # (rows, cols, rgb)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    with Image.open(tmp_path / "rgb.png") as picture:
        at_2_5 = picture.getpixel((2, 5))
    assert at_2_5 != at_2_5[::-1]  # an asymmetric pixel, so a channel reversal shows

    image, geometry = formats.read_image(tmp_path / "rgb.png")
    assert image.shape == (4, 7, 1, 3)
    assert tuple(image[2, 5, 0]) == at_2_5

    formats.write_image(tmp_path / "copy.png", image, geometry)
    with Image.open(tmp_path / "copy.png") as copy:
        assert copy.mode == "RGB" and copy.getpixel((2, 5)) == at_2_5


def test_opaque_rgba_drops_alpha(tmp_path):
    pixels = np.random.default_rng(6).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "rgba.png")
    image, _ = formats.read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(image[:, :, 0], np.swapaxes(pixels[..., :3], 0, 1))


def test_float_tiff(tmp_path):
    pixels = np.random.default_rng(7).normal(size=(3, 5)).astype(np.float32)
    Image.fromarray(pixels).save(tmp_path / "float.tif")
    image, geometry = formats.read_image(tmp_path / "float.tif", spacing_2d=(0.25, 0.5))
    np.testing.assert_array_equal(image[:, :, 0, 0], pixels.T)
    assert geometry.spacing == (0.25, 0.5, 1.0)

    formats.write_image(tmp_path / "copy.tiff", image * 3.5, geometry)
    with Image.open(tmp_path / "copy.tiff") as copy:
        assert copy.mode == "F"
    np.testing.assert_array_equal(formats.read_image(tmp_path / "copy.tiff")[0], image * 3.5)
    with pytest.raises(ValueError, match="whole numbers"):  # a PNG cannot hold these
        formats.write_image(tmp_path / "copy.png", image, geometry)


def test_bmp_label(tmp_path):
    label = np.zeros((4, 6, 1), dtype=np.int16)
    label[1:3, 2:5] = 2
    label[0, 5] = 7
    geometry = Geometry.from_affine(np.diag([0.8, 0.8, 1.0, 1.0]), label.shape)
    formats.write_label(tmp_path / "label.bmp", label, geometry)
    with Image.open(tmp_path / "label.bmp") as picture:
        assert picture.mode == "L"
    read, read_geometry = formats.read_label(tmp_path / "label.bmp", spacing_2d=(0.8, 0.8))
    np.testing.assert_array_equal(read, label)
    np.testing.assert_allclose(read_geometry.affine, geometry.affine)
    with pytest.raises(ValueError, match="at most 255"):
        formats.write_label(tmp_path / "big.bmp", label * 100, geometry)


def test_2d_writers_refuse(tmp_path, geometry):
    with pytest.raises(ValueError, match="one slice"):
        formats.write_label(tmp_path / "volume.png", np.zeros(geometry.canonical_shape(), np.uint8), geometry)
    flat = Geometry.from_affine(np.eye(4), (4, 3, 1))
    with pytest.raises(ValueError, match="JPEG changes pixel values"):
        formats.write_label(tmp_path / "label.jpg", np.zeros((4, 3, 1), np.uint8), flat)
    assert list(tmp_path.iterdir()) == []


# --- what cannot be read -----------------------------------------------------------------------------------------


def test_unknown_ending():
    with pytest.raises(MedsegError) as excinfo:
        formats.check_ending(".xyz", "data/dataset.json")
    message = _one_line_naming(excinfo, "dataset.json")
    assert "'.xyz'" in message and ".nrrd" in message
    assert formats.check_ending(".PNG", "data/dataset.json") == ".png"


def test_rgb_label(tmp_path):
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MedsegError, match="an RGB image is not a label map") as excinfo:
        formats.read_label(tmp_path / "rgb.png")
    _one_line_naming(excinfo, "rgb.png")


@pytest.mark.parametrize("name", ["label.jpg", "label.JPEG", "jpeg_inside.png"])
def test_jpeg_label(tmp_path, name):
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / name, format="JPEG")
    assert formats.read_image(tmp_path / name)[0].shape == (4, 3, 1, 1)  # an image may be lossy
    with pytest.raises(MedsegError, match="JPEG changes pixel values") as excinfo:
        formats.read_label(tmp_path / name)
    _one_line_naming(excinfo, name)


@pytest.mark.parametrize("value, problem", [(0.5, "non-integer values"), (-2.0, "negative values")])
def test_bad_label_values_in_nrrd(tmp_path, value, problem):
    data = np.zeros(SHAPE, np.float32)
    data[1, 2, 0] = value
    sitk.WriteImage(_sitk_image(data), str(tmp_path / "label.nrrd"))
    with pytest.raises(MedsegError, match=problem) as excinfo:
        formats.read_label(tmp_path / "label.nrrd")
    _one_line_naming(excinfo, "label.nrrd")


def test_transparent_rgba(tmp_path):
    pixels = np.full((3, 4, 4), 255, np.uint8)
    pixels[1, 2, 3] = 0
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "rgba.png")
    with pytest.raises(MedsegError, match="1 of 12 pixels are transparent") as excinfo:
        formats.read_image(tmp_path / "rgba.png")
    _one_line_naming(excinfo, "rgba.png")


@pytest.mark.parametrize("name", ["absent.mha", "absent.png", "absent.nii.gz"])
def test_missing_file(tmp_path, name):
    with pytest.raises(MedsegError, match="not found") as excinfo:
        formats.read_image(tmp_path / name)
    _one_line_naming(excinfo, name)


@pytest.mark.parametrize("name", ["broken.mha", "broken.nrrd", "broken.png", "broken.tif"])
def test_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an image\n" * 3)
    with pytest.raises(MedsegError, match="cannot read") as excinfo:
        formats.read_image(tmp_path / name)
    _one_line_naming(excinfo, name)


def test_folder_and_unknown_file(tmp_path):
    (tmp_path / "folder.mha").mkdir()
    with pytest.raises(MedsegError, match="is a folder") as excinfo:
        formats.read_label(tmp_path / "folder.mha")
    _one_line_naming(excinfo, "folder.mha")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MedsegError, match="not supported") as excinfo:
        formats.read_image(tmp_path / "notes.txt")
    _one_line_naming(excinfo, "notes.txt")


# --- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, ending", [(".nii.gz", ".nii.gz"), ("case_0000.nii.gz", ".nii.gz"), ("x.nii", ".nii"),
                                          ("x.PNG", ".png"), ("a.b.mha", ".mha"), ("x.seg.nrrd", ".nrrd"),
                                          ("x.txt", None), ("x.gz", None)])
def test_ending_of(name, ending):
    assert formats.ending_of(name) == ending


def test_prediction_path(tmp_path):
    assert formats.prediction_path("in/a_0000.nrrd", "out", "a") == formats.Path("out/a.nrrd")
    assert formats.prediction_path("in/a_0000.JPG", "out", "a") == formats.Path("out/a.png")
    assert formats.prediction_path("in/a_0000.nii.gz", "out", "a") == formats.Path("out/a.nii.gz")
    assert formats.prediction_path(tmp_path, "out", "a") == formats.Path("out/a.nii.gz")  # a DICOM series folder
