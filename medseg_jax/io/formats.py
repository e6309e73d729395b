"""Image files chosen by their ending: NIfTI (through `nifti`), ITK's MetaImage and NRRD (through SimpleITK), and 2D
pictures (PNG, BMP, TIFF, JPEG through Pillow), all read into the model `nifti` defines.

Every reader returns what `nifti.read_image` / `nifti.read_label` return: a canonical channels-last float32 `(X, Y, Z,
C)` image or integer `(X, Y, Z)` label map and a `Geometry`, so the pipeline can take any of these files in place of
a NIfTI one. Every writer puts a canonical array back in the file's own voxel order, and every write is atomic.

ITK formats store origin, spacing and direction in LPS patient coordinates; the RAS+ affine nibabel would report for
the same voxels is `diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]`, which is what ITK's own NIfTI reader and
writer assume, so a volume gives the same canonical array and affine whichever of the two formats holds it.

A 2D picture has no position in space: its array (rows, columns) = (y, x) becomes `(X, Y, 1)` with the affine
`diag(sx, sy, 1, 1)` (`spacing_2d`, 1 mm by default), so its canonical order is its own order.

Problems with the user's file are one-line `MedsegError`s naming it; a bad array handed to a writer is a ValueError.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg_jax.errors import MedsegError, short_error
from medseg_jax.fileio import atomic_path
from medseg_jax.io import nifti
from medseg_jax.io.geometry import Geometry, from_canonical, to_canonical

NIFTI = (".nii.gz", ".nii")
ITK = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGES_2D = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
ENDINGS = NIFTI + ITK + IMAGES_2D

JPEG = (".jpg", ".jpeg")
# Forcing the reader/writer by ending, so a file whose content is not what its name says is refused rather than read
# by whichever ImageIO happens to recognise it.
_ITK_IO = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO"}
_PIL_FORMAT = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_GREY_MODES = ("L", "I", "F", "1")  # plus every "I;16..." variant
_RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa")
_JPEG_LABEL = "JPEG changes pixel values; save label maps as PNG"
_RGB_LABEL = "an RGB image is not a label map; save labels as greyscale or palette PNG (values 0, 1, 2, ...)"


def ending_of(path: str | os.PathLike) -> str | None:
    """The longest known ending of the file name (as spelt in `ENDINGS`), else None.

    The 2D endings match in any case (cameras and Windows tools write ".PNG", ".JPG"); NIfTI and ITK endings only in
    lower case, as `nifti`'s writer and ITK's file-type detection expect them.
    """
    name = Path(path).name
    found = [e for e in NIFTI + ITK if name.endswith(e)] + [e for e in IMAGES_2D if name.lower().endswith(e)]
    return max(found, key=len) if found else None


def check_ending(ending: str, where: str) -> str:
    """Raises a one-line MedsegError (naming `where`, e.g. a dataset.json) unless `ending` is a supported file ending;
    returns it as spelt in `ENDINGS` (".PNG" -> ".png")."""
    ending = str(ending)
    if ending in NIFTI + ITK:
        return ending
    if ending.lower() in IMAGES_2D:
        return ending.lower()
    raise MedsegError(f"{where}: file_ending {ending!r} is not supported (one of {', '.join(ENDINGS)})")


def _check_file(path: Path) -> str:
    """The file's ending, after refusing a missing file, a dangling link, a folder or an unknown ending."""
    if path.is_symlink() and not path.exists():
        raise MedsegError(f"{path}: a symbolic link that does not resolve (to {os.readlink(path)})")
    if not path.exists():
        raise MedsegError(f"{path}: file not found")
    ending = ending_of(path)
    if path.is_dir():
        raise MedsegError(f"{path}: is a folder, expected {'a ' + ending if ending else 'an image'} file")
    if ending is None:
        raise MedsegError(f"{path}: file ending not supported (one of {', '.join(ENDINGS)})")
    return ending


def _spacing_2d(spacing_2d) -> tuple[float, float]:
    if spacing_2d is None:
        return 1.0, 1.0
    values = tuple(float(v) for v in spacing_2d)
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing_2d must be two positive numbers (x, y) in mm, got {spacing_2d!r}")
    return values


# --- ITK (SimpleITK) ---------------------------------------------------------------------------------------------


def _itk_affine(image) -> np.ndarray:
    """The RAS+ affine of an ITK image's voxels, embedded in 3D for a 2D image (z spacing 1 mm, origin z = 0)."""
    dim = image.GetDimension()
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    lps[:dim, :dim] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    lps[:dim, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ lps


def _read_itk(path: Path, ending: str) -> tuple[np.ndarray, Geometry]:
    """The voxels in file order `(X, Y, Z)` or `(X, Y, Z, C)` (C > 1 components) and their geometry."""
    import SimpleITK as sitk  # only imported when such a file is met (it takes a while to load)

    kind = "MetaImage" if _ITK_IO[ending] == "MetaImageIO" else "NRRD"
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_ITK_IO[ending])
    reader.SetFileName(str(path))
    try:
        # The header alone first, so a huge or empty volume is refused before its voxels are read.
        reader.ReadImageInformation()
        dim, size, components = reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents()
        if dim not in (2, 3):
            raise MedsegError(f"{path}: expected a 2D or 3D image, got {dim}D with size {size}")
        if any(s == 0 for s in size):
            raise MedsegError(f"{path}: the header declares a zero-size axis (size {size}); the file holds no image")
        needed = 2 * int(np.prod(size)) * components * 4  # read as float32, plus the canonical copy
        available = nifti.available_memory()
        if needed > available:
            raise MedsegError(f"{path}: {'x'.join(map(str, size))} voxels need about {nifti.format_size(needed)} of "
                              f"memory to read, more than the {nifti.format_size(available)} available")
        image = reader.Execute()
        data = sitk.GetArrayFromImage(image)
        affine = _itk_affine(image)
    except MedsegError:
        raise
    except Exception as error:  # ITK reports a bad header, a missing or short data file alike, as RuntimeError
        raise MedsegError(f"{path}: cannot read as {kind} ({short_error(error)}); is the file complete and a valid "
                          f"{ending}?") from None
    if data.dtype.kind not in "biuf":
        raise MedsegError(f"{path}: unsupported voxel type {data.dtype} (expected integer or float scalars or "
                          "vectors)")
    # SimpleITK's array is (z, y, x[, c]), a component axis only when there are several: back to (x, y, z[, c]).
    vector = data.ndim == dim + 1
    data = data.transpose(*reversed(range(dim)), *([dim] if vector else []))
    if dim == 2:
        data = data[:, :, None]
    return data, Geometry.from_affine(affine, data.shape[:3], source=path)


def _itk_image(file_order: np.ndarray, geometry: Geometry):
    """The SimpleITK image of a file-order `(X, Y, Z[, C])` array; 2D when the geometry is a 2D picture's (z = 1
    slice at the origin along the z axis, as `_read_itk` and the 2D reader make it), so a 2D input stays 2D."""
    import SimpleITK as sitk

    lps = _LPS_TO_RAS @ geometry.affine
    vector = file_order.ndim == 4
    planar = (file_order.shape[2] == 1 and np.array_equal(lps[:3, 2], [0.0, 0.0, 1.0])
              and np.all(lps[2, :2] == 0) and lps[2, 3] == 0)
    dim = 2 if planar else 3
    array = file_order[:, :, 0] if planar else file_order
    array = array.transpose(*reversed(range(dim)), *([dim] if vector else []))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
    linear = lps[:dim, :dim]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (linear / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:dim, 3]])
    return image


def _data_file_of(header: Path, ending: str) -> str:
    text = header.read_text(encoding="latin-1")
    pattern = r"^ElementDataFile\s*=\s*(.+?)\s*$" if ending == ".mhd" else r"^data ?file:\s*(.+?)\s*$"
    match = re.search(pattern, text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{header}: SimpleITK wrote no data file name into the header")
    return match.group(1)


def _write_itk(path: Path, ending: str, image) -> None:
    import SimpleITK as sitk

    if ending not in (".mhd", ".nhdr"):
        with atomic_path(path, suffix=ending) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True, imageIO=_ITK_IO[ending])
        return
    # A detached header names its data file (foo.mhd -> foo.zraw, foo.nhdr -> foo.raw.gz). Both are written under
    # their final names into a temporary folder beside the target, so the header's reference is the final, relative
    # name; the data file is moved into place first, so a header is never seen before the data it points to.
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        header = folder / path.name
        sitk.WriteImage(image, str(header), useCompression=True, imageIO=_ITK_IO[ending])
        data_name = _data_file_of(header, ending)
        written = {p.name for p in folder.iterdir()}
        if Path(data_name).name != data_name or written != {path.name, data_name}:
            raise RuntimeError(f"{path}: SimpleITK wrote {sorted(written)} with data file {data_name!r}; expected the "
                               "header and one data file beside it")
        os.replace(folder / data_name, path.parent / data_name)
        os.replace(header, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- 2D pictures (Pillow) ----------------------------------------------------------------------------------------


def _drop_opaque_alpha(path: Path, picture):
    """An "RGBA" / "LA" picture without its alpha channel, refused when any pixel is not fully opaque (what the
    transparent pixels stand for is unknown)."""
    alpha = np.asarray(picture.getchannel("A"))
    transparent = int(np.count_nonzero(alpha != 255))
    if transparent:
        raise MedsegError(f"{path}: {transparent} of {alpha.size} pixels are transparent (alpha < 255); save the "
                          "picture without transparency (RGB or greyscale)")
    return picture.convert("RGB" if picture.mode == "RGBA" else "L")


def _read_2d(path: Path, ending: str, spacing_2d, label: bool) -> tuple[np.ndarray, Geometry]:
    """The pixels as file-order `(X, Y, 1)` or `(X, Y, 1, C)` and their geometry; for a label, palette indices."""
    from PIL import Image

    spacing = _spacing_2d(spacing_2d)
    if label and ending in JPEG:
        raise MedsegError(f"{path}: {_JPEG_LABEL}")
    try:
        with Image.open(path) as picture:
            if getattr(picture, "n_frames", 1) > 1:
                raise MedsegError(f"{path}: has {picture.n_frames} frames (pages); only single-frame 2D pictures are "
                                  "read; save a volume as .nii.gz, .mha or .nrrd")
            picture.load()  # Pillow decodes lazily: a truncated file fails here, inside the try
            picture_format, mode = picture.format, picture.mode
            if label and picture_format == "JPEG":  # a JPEG under another name is as lossy
                raise MedsegError(f"{path}: {_JPEG_LABEL}")
            if label and mode in _RGB_MODES:  # said before any transparency, which is beside the point here
                raise MedsegError(f"{path}: {_RGB_LABEL}")
            if mode in ("RGBA", "LA"):
                picture = _drop_opaque_alpha(path, picture)
            elif mode == "P" and not label:
                rgba = "transparency" in picture.info
                picture = picture.convert("RGBA" if rgba else "RGB")
                if rgba:
                    picture = _drop_opaque_alpha(path, picture)
            mode = picture.mode
            # A label's palette colours are only how a viewer draws it: the indices are the label values.
            grey = mode in _GREY_MODES or mode.startswith("I;16") or (label and mode == "P")
            if not grey and mode != "RGB":
                raise MedsegError(f"{path}: unsupported picture mode {mode!r} (expected greyscale, palette or RGB)")
            data = np.asarray(picture)
    except MedsegError:
        raise
    except Exception as error:  # Pillow's UnidentifiedImageError, OSError (truncated), DecompressionBombError ...
        raise MedsegError(f"{path}: cannot read as {_PIL_FORMAT[ending]} ({short_error(error)}); is the file "
                          f"complete and a valid {ending}?") from None
    if data.dtype == bool:
        data = data.astype(np.uint8)
    # Pillow's array is (rows, columns[, channels]) = (y, x[, c]).
    data = np.swapaxes(data, 0, 1)[:, :, None]
    affine = np.diag([spacing[0], spacing[1], 1.0, 1.0])
    return data, Geometry.from_affine(affine, data.shape[:3], source=path)


def _integers_in(array: np.ndarray, high: int) -> np.ndarray | None:
    """The array rounded to integers when every value is (within 1e-3) a whole number in [0, high], else None."""
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.int64)
    rounded = np.round(array.astype(np.float64))
    if not np.allclose(array, rounded, rtol=0, atol=1e-3) or rounded.min() < 0 or rounded.max() > high:
        return None
    return rounded.astype(np.int64)


def _write_picture(path: Path, ending: str, pixels: np.ndarray) -> None:
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(pixels))
    options = {"quality": 95, "subsampling": 0} if ending in JPEG else {}
    with atomic_path(path, suffix=ending) as tmp:
        picture.save(tmp, format=_PIL_FORMAT[ending], **options)


def _planar(file_order: np.ndarray, path: Path) -> np.ndarray:
    """`(X, Y, 1[, C])` -> Pillow's `(rows, columns[, C])`."""
    if file_order.shape[2] != 1:
        raise ValueError(f"{path}: a 2D picture holds one slice, got a volume of shape {file_order.shape[:3]}")
    return np.swapaxes(file_order[:, :, 0], 0, 1)


# --- public API --------------------------------------------------------------------------------------------------


def _finite_image(path, data: np.ndarray) -> np.ndarray:
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise MedsegError(f"{path}: {bad} voxels are NaN or infinite; fix or replace them before training")
    return data if data.ndim == 4 else data[..., None]


def read_image(path: str | os.PathLike, spacing_2d: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Returns the `(X, Y, Z, C)` canonical float32 array and its geometry, read by the file's ending.

    C is 1 for a scalar volume, the number of components of a vector ITK image, 3 for an RGB picture. `spacing_2d`
    (x, y) in mm places a 2D picture (1 mm when None). A folder without an image ending is read as a DICOM series,
    as `nifti.read_image` does.
    """
    path = Path(path)
    if ending_of(path) in NIFTI or (path.is_dir() and ending_of(path) is None):
        return nifti.read_image(path)
    data, geometry = _read_other(path, spacing_2d, label=False)
    return to_canonical(_finite_image(path, data), geometry), geometry


def _read_other(path: Path, spacing_2d, label: bool) -> tuple[np.ndarray, Geometry]:
    """An ITK file or a 2D picture in file order, and its geometry."""
    ending = _check_file(path)
    if ending in ITK:
        return _read_itk(path, ending)
    return _read_2d(path, ending, spacing_2d, label=label)


def read_images(paths: Sequence[str | os.PathLike],
                spacing_2d: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Reads one case's channel files (nnU-Net's _0000, _0001, ...) and stacks them as channels, in the given order.

    Every file must have the first file's shape and affine (within 1e-3; `nifti.read_images` checks, with this
    module's reader); the geometry is the first file's. Files of different formats may be mixed.
    """
    return nifti.read_images(paths, reader=lambda path: read_image(path, spacing_2d))


def _label_values(path: Path, data: np.ndarray) -> np.ndarray:
    """`nifti.read_label`'s checks, in its words: a 3D map of whole, non-negative numbers -> int16 (int32 beyond
    32767)."""
    if data.ndim == 4:
        if data.shape[3] != 1:
            raise MedsegError(f"{path}: a label map must have one value per voxel, got {data.shape[3]} components "
                              f"(shape {data.shape})")
        data = data[..., 0]
    return nifti.label_values(path, data)


def read_label(path: str | os.PathLike, spacing_2d: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Returns the `(X, Y, Z)` canonical integer label map (int16, or int32 beyond 32767) and its geometry.

    A 2D label must be greyscale or palette (its indices are the labels); RGB and JPEG pictures are refused."""
    path = Path(path)
    if ending_of(path) in NIFTI:
        return nifti.read_label(path)
    data, geometry = _read_other(path, spacing_2d, label=True)
    return to_canonical(_label_values(path, data), geometry), geometry


def _output_ending(path: Path) -> str:
    ending = ending_of(path)
    if ending is None or len(path.name) <= len(ending):
        raise MedsegError(f"{path}: output file name must end with one of {', '.join(ENDINGS)}")
    return ending


def write_label(path: str | os.PathLike, canonical_label: np.ndarray, geometry: Geometry, reference=None) -> None:
    """Writes a canonical `(X, Y, Z)` label map in the file's own voxel order and geometry, in the format of `path`'s
    ending, atomically.

    NIfTI: as `nifti.write_label` (`reference` is its reference header). ITK: uint8, or int16 / int32 beyond 255 /
    32767, compressed. 2D (z must be 1): 8-bit greyscale, or 16-bit beyond 255 (PNG, TIFF; BMP holds 8 bits); JPEG
    is refused (lossy). `reference` is used by NIfTI only: the other formats store the geometry's affine (2D pictures
    store no geometry at all).
    """
    path = Path(path)
    ending = _output_ending(path)
    if ending in NIFTI:
        nifti.write_label(path, canonical_label, geometry, reference_header=reference)
        return
    label, dtype = nifti.label_to_write(canonical_label)
    high = int(label.max()) if label.size else 0
    file_order = from_canonical(label, geometry)
    if ending in ITK:
        _write_itk(path, ending, _itk_image(file_order.astype(dtype), geometry))
        return
    if ending in JPEG:
        raise ValueError(f"{path}: {_JPEG_LABEL}")
    limit = 255 if ending == ".bmp" else 65535
    if high > limit:
        raise ValueError(f"{path}: label value {high} does not fit a {_PIL_FORMAT[ending]} label map (at most "
                         f"{limit}); use .nii.gz, .mha or .nrrd")
    pixels = _planar(file_order, path)
    _write_picture(path, ending, pixels.astype(np.uint8 if high <= 255 else np.uint16))


def write_image(path: str | os.PathLike, canonical_image: np.ndarray, geometry: Geometry, reference=None) -> None:
    """Writes a canonical `(X, Y, Z)` or `(X, Y, Z, C)` volume in the file's own voxel order and geometry, in the
    format of `path`'s ending, atomically.

    NIfTI: as `nifti.write_image`. ITK: float32, C > 1 as a vector image. 2D (z must be 1): one channel as a float
    ("F") TIFF, or for PNG / BMP / JPEG as 8-bit (16-bit for PNG) greyscale when every value is a whole number in
    range; three channels as 8-bit RGB (values whole numbers 0..255). Anything else is a ValueError.
    """
    path = Path(path)
    ending = _output_ending(path)
    if ending in NIFTI:
        nifti.write_image(path, canonical_image, geometry, reference_header=reference)
        return
    image = np.asarray(canonical_image)
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (X, Y, Z) or (X, Y, Z, C), got shape {image.shape}")
    if image.dtype.kind not in "biuf":
        raise ValueError(f"image must have a numeric dtype, got {image.dtype}")
    file_order = from_canonical(image, geometry)
    if ending in ITK:
        _write_itk(path, ending, _itk_image(file_order.astype(np.float32), geometry))
        return
    pixels = _planar(file_order, path)
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        raise ValueError(f"{path}: a picture holds 1 or 3 (RGB) channels, got {pixels.shape[2]}")
    if pixels.ndim == 2 and ending in (".tif", ".tiff"):
        _write_picture(path, ending, pixels.astype(np.float32))
        return
    limit = 65535 if pixels.ndim == 2 and ending == ".png" else 255
    whole = _integers_in(pixels, limit)
    if whole is None:
        raise ValueError(f"{path}: {_PIL_FORMAT[ending]} holds whole numbers 0..{limit} here; these values are not "
                         "(save a float image as .tif, .nii.gz or .mha)")
    _write_picture(path, ending, whole.astype(np.uint8 if int(whole.max(initial=0)) <= 255 else np.uint16))


def prediction_path(input_path: str | os.PathLike, output_dir: str | os.PathLike, case_id: str) -> Path:
    """Where the prediction for `input_path` goes: `output_dir/case_id` with the input's ending (spelt as in
    `ENDINGS`), except a JPEG input -> ".png" (a label map must be lossless) and a DICOM series folder -> ".nii.gz"."""
    input_path = Path(input_path)
    ending = ending_of(input_path)
    if ending is None:
        if not input_path.is_dir():
            raise MedsegError(f"{input_path}: file ending not supported (one of {', '.join(ENDINGS)})")
        ending = ".nii.gz"
    return Path(output_dir) / f"{case_id}{'.png' if ending in JPEG else ending}"
