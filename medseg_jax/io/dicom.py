"""DICOM series reading (and a small writer) in the same model as `medseg_jax.io.nifti`.

A series folder holds one CT or MR series, one slice per file. `read_series` defines the series' *file voxel order* as
i = column index, j = row index, k = slice index in order of increasing position along the slice normal
(cross(row cosines, column cosines) of ImageOrientationPatient), never by file name or InstanceNumber. Its RAS+ affine
(nibabel convention, world = affine @ [i, j, k, 1]) is built from the LPS patient coordinates with diag(-1, -1, 1):

    column 0 = IOP[0:3] * PixelSpacing[1]     (along a row: increasing column index)
    column 1 = IOP[3:6] * PixelSpacing[0]     (down a column: increasing row index)
    column 2 = normal * slice spacing
    origin   = ImagePositionPatient of the first slice after sorting

and the volume is then brought to the canonical voxel order exactly as `nifti.read_image` does, so a series and the
NIfTI converted from it give the same array and `Geometry.canonical_affine`. `write_series` writes the inverse: an
uncompressed Explicit VR Little Endian series from a volume in that file voxel order and its affine (tests and demo
data use it).

Every problem with the user's series is raised as a one-line `MedsegError` that names the folder or the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medseg_jax.errors import MedsegError, short_error
from medseg_jax.fileio import atomic_path
from medseg_jax.io.geometry import Geometry, to_canonical

DICOM_SUFFIX = ".dcm"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_ORIENTATION_ATOL = 1e-4  # direction cosines of two slices must agree within this
_SPACING_ATOL = 1e-4  # mm; pixel spacing of two slices must agree within this
_SAME_POSITION_MM = 1e-3  # two slices closer than this along the normal are at the same position
_GAP_RTOL, _GAP_ATOL = 0.01, 1e-3  # a gap may differ from the expected spacing by max(1% of it, 1e-3 mm)
_DRIFT_RTOL, _DRIFT_ATOL = 0.05, 0.05  # sideways drift of slice origins: max(5% of the pixel size, 0.05 mm)


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The folder's DICOM files, sorted by name: `*.dcm` (any case), and other files that carry the DICM marker.

    Hidden files, subfolders and a DICOMDIR index are skipped. Files named by their UID ("1.2.840....") have a
    "suffix" to `pathlib`, so any non-.dcm name is accepted when the file starts with the DICOM preamble.
    """
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR" or not entry.is_file():
            continue
        if entry.suffix.lower() == DICOM_SUFFIX or _has_dicm_marker(entry):
            files.append(entry)
    return files


def is_dicom_series(path: str | os.PathLike) -> bool:
    """True if `path` is a folder holding at least one DICOM file (see `dicom_files`); never raises."""
    path = Path(path)
    try:
        return path.is_dir() and bool(dicom_files(path))
    except OSError:
        return False


@dataclass
class _Slice:
    path: Path
    dataset: pydicom.Dataset
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    row_cosines: np.ndarray  # IOP[0:3]: direction of increasing column index
    col_cosines: np.ndarray  # IOP[3:6]: direction of increasing row index
    pixel_spacing: np.ndarray  # (between rows, between columns) in mm
    rows: int
    columns: int


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no DICM marker: some writers omit it; read with force=True and require image attributes
    except Exception as error:
        raise MedsegError(f"{path}: cannot read as DICOM ({short_error(error)}); is the file complete?") from None
    try:
        dataset = pydicom.dcmread(path, force=True)
    except Exception as error:
        raise MedsegError(f"{path}: cannot read as DICOM ({short_error(error)}); remove the file from the series "
                          "folder or replace it with a valid DICOM slice") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "Rows" not in dataset:
        raise MedsegError(f"{path}: cannot read as DICOM (no DICM marker, and no image attributes when read without "
                          "it); remove the file from the series folder or replace it with a valid DICOM slice")
    return dataset


def _numbers(dataset: pydicom.Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    try:
        value = dataset.get(keyword)
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [] if value in (None, "") else [value]
        array = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise MedsegError(f"{path}: {keyword} is not a list of numbers") from None
    if not values:
        raise MedsegError(f"{path}: missing {keyword}; cannot place the slice in space (is this an image slice of a "
                          "CT/MR series?)")
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise MedsegError(f"{path}: {keyword} must be {count} finite numbers, got {[str(v) for v in values]}")
    return array


def _slice_header(path: Path, dataset: pydicom.Dataset) -> _Slice:
    frames = dataset.get("NumberOfFrames")
    try:
        frames = 1 if frames in (None, "") else int(frames)
    except (TypeError, ValueError):
        raise MedsegError(f"{path}: NumberOfFrames {frames!r} is not a number") from None
    if frames > 1:
        raise MedsegError(f"{path}: multi-frame DICOM ({frames} frames in one file) is not supported; convert the "
                          "series to one file per slice, or to NIfTI (e.g. with dcm2niix)")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise MedsegError(f"{path}: no pixel data (not an image slice); remove it from the series folder")
    samples = dataset.get("SamplesPerPixel", 1)
    if samples not in (None, "") and int(samples) != 1:
        raise MedsegError(f"{path}: {int(samples)} samples per pixel (colour image); only greyscale CT/MR is "
                          "supported")
    position = _numbers(dataset, "ImagePositionPatient", 3, path)
    orientation = _numbers(dataset, "ImageOrientationPatient", 6, path)
    pixel_spacing = _numbers(dataset, "PixelSpacing", 2, path)
    if not np.all(pixel_spacing > 0):
        raise MedsegError(f"{path}: PixelSpacing {pixel_spacing.tolist()} must be positive")
    row_cosines, col_cosines = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row_cosines), np.linalg.norm(col_cosines)
    if min(norms) < 0.5 or abs(float(row_cosines @ col_cosines)) > 1e-3 * norms[0] * norms[1]:
        raise MedsegError(f"{path}: ImageOrientationPatient {orientation.tolist()} is not two perpendicular "
                          "directions")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        raise MedsegError(f"{path}: missing Rows / Columns") from None
    if rows < 1 or columns < 1:
        raise MedsegError(f"{path}: image size {rows} x {columns} (rows x columns) is empty")
    return _Slice(path=path, dataset=dataset, position=position, row_cosines=row_cosines / norms[0],
                  col_cosines=col_cosines / norms[1], pixel_spacing=pixel_spacing, rows=rows, columns=columns)


def _check_one_series(folder: Path, datasets: list[tuple[Path, pydicom.Dataset]]) -> None:
    series: dict[str, list[Path]] = {}
    for path, dataset in datasets:
        series.setdefault(str(dataset.get("SeriesInstanceUID", "") or "<none>"), []).append(path)
    if len(series) > 1:
        examples = "; ".join(f"{uid}: {len(paths)} file{'s' * (len(paths) != 1)}, e.g. {paths[0].name}"
                             for uid, paths in series.items())
        raise MedsegError(f"{folder}: contains {len(series)} series (SeriesInstanceUID {examples}); put each series "
                          "in its own folder, one folder per series")


def _check_consistent(slices: list[_Slice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise MedsegError(f"{s.path}: image size {s.rows} x {s.columns} (rows x columns) differs from "
                              f"{first.path.name} ({first.rows} x {first.columns}); a series must have one image size")
        if not (np.allclose(s.row_cosines, first.row_cosines, rtol=0, atol=_ORIENTATION_ATOL)
                and np.allclose(s.col_cosines, first.col_cosines, rtol=0, atol=_ORIENTATION_ATOL)):
            raise MedsegError(f"{s.path}: ImageOrientationPatient "
                              f"{np.concatenate([s.row_cosines, s.col_cosines]).round(6).tolist()} differs from "
                              f"{first.path.name} "
                              f"({np.concatenate([first.row_cosines, first.col_cosines]).round(6).tolist()}); "
                              "slices of one series must share one orientation (is this a localizer or a mixed "
                              "series?)")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=0, atol=_SPACING_ATOL):
            raise MedsegError(f"{s.path}: PixelSpacing {s.pixel_spacing.tolist()} differs from {first.path.name} "
                              f"({first.pixel_spacing.tolist()}); slices of one series must share one pixel spacing")


def _slice_spacing(folder: Path, slices: list[_Slice], heights: np.ndarray) -> float:
    """The distance between neighbouring slices (sorted by `heights` along the normal), checked to be uniform."""
    if len(slices) == 1:
        dataset, path = slices[0].dataset, slices[0].path
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):
            value = dataset.get(keyword)
            try:
                spacing = float(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                spacing = None
            if spacing is not None and np.isfinite(spacing) and spacing > 0:
                return spacing
        raise MedsegError(f"{path}: single-slice series without a positive SliceThickness or SpacingBetweenSlices; "
                          "cannot tell the slice spacing")
    gaps = np.diff(heights)
    for index in np.flatnonzero(gaps <= _SAME_POSITION_MM):
        a, b = slices[index], slices[index + 1]
        raise MedsegError(f"{folder}: two slices at the same position ({heights[index]:.4g} mm along the slice "
                          f"normal): {a.path.name} and {b.path.name}; remove the duplicate or split the series")
    expected = float(gaps.min())
    tolerance = max(_GAP_RTOL * expected, _GAP_ATOL)
    for index in np.flatnonzero(np.abs(gaps - expected) > tolerance):
        a, b = slices[index], slices[index + 1]
        missing = gaps[index] / expected - 1
        hint = (f"about {round(missing)} slice(s) missing" if abs(missing - round(missing)) < 0.1
                else "the series mixes slice spacings")
        raise MedsegError(f"{folder}: slices are not evenly spaced: gap of {gaps[index]:.4g} mm between "
                          f"{a.path.name} and {b.path.name}, expected {expected:.4g} mm ({hint}); a series must be "
                          "complete with one slice spacing")
    return float((heights[-1] - heights[0]) / (len(heights) - 1))


def _check_stacked_along_normal(folder: Path, slices: list[_Slice], normal: np.ndarray) -> None:
    """Refuses slice origins that drift sideways (gantry tilt): the affine cannot describe that sheared grid."""
    offsets = np.stack([s.position for s in slices]) - slices[0].position
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(sideways, axis=1)
    tolerance = max(_DRIFT_RTOL * float(slices[0].pixel_spacing.min()), _DRIFT_ATOL)
    worst = int(np.argmax(drift))
    if drift[worst] > tolerance:
        raise MedsegError(f"{folder}: slice {slices[worst].path.name} is offset {drift[worst]:.3g} mm sideways from "
                          "the slice normal through the first slice (gantry tilt or sheared acquisition); resample "
                          "the series onto a regular grid first (e.g. dcm2niix writes a tilt-corrected NIfTI)")


def _slice_values(s: _Slice) -> np.ndarray:
    """The slice's values after RescaleSlope / RescaleIntercept, as float64 (rows, columns)."""
    dataset = s.dataset
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
        raise MedsegError(f"{s.path}: cannot decode the pixel data ({name}: {short_error(error)}); install a decoder "
                          "for this compression (e.g. pylibjpeg with its plugins, or python-gdcm) or convert the "
                          "series to uncompressed DICOM (e.g. gdcmconv --raw)") from None
    pixels = np.asarray(pixels)
    if pixels.shape != (s.rows, s.columns):
        raise MedsegError(f"{s.path}: pixel data has shape {pixels.shape}, expected {s.rows} x {s.columns} (rows x "
                          "columns)")
    rescale = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = dataset.get(keyword)
        try:
            rescale.append(default if value in (None, "") else float(value))
        except (TypeError, ValueError):
            raise MedsegError(f"{s.path}: {keyword} {value!r} is not a number") from None
    slope, intercept = rescale
    return pixels.astype(np.float64) * slope + intercept


def read_series(folder: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Reads one CT/MR series folder; returns the `(X, Y, Z, 1)` canonical array and its geometry.

    The geometry's `affine` is the RAS+ affine of the file voxel order (i = column, j = row, k = slice by position
    along the normal; see the module docstring) and `spatial_header` is None. RescaleSlope / RescaleIntercept are
    applied per slice.
    """
    folder = Path(folder)
    if not folder.exists():
        raise MedsegError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise MedsegError(f"{folder}: is a file; expected a folder holding one DICOM series")
    try:
        files = dicom_files(folder)
    except OSError as error:
        raise MedsegError(f"{folder}: cannot list the folder ({short_error(error)})") from None
    if not files:
        raise MedsegError(f"{folder}: no DICOM files (*.dcm, or files starting with the DICM marker) in this folder")
    datasets = [(path, _read_dataset(path)) for path in files]
    _check_one_series(folder, datasets)  # before the per-file checks, so a mixed folder says so first
    slices = [_slice_header(path, dataset) for path, dataset in datasets]
    _check_consistent(slices)

    first = slices[0]
    normal = np.cross(first.row_cosines, first.col_cosines)
    heights = np.array([float(s.position @ normal) for s in slices])
    order = sorted(range(len(slices)), key=lambda n: (heights[n], slices[n].path.name))
    slices, heights = [slices[n] for n in order], heights[order]
    spacing = _slice_spacing(folder, slices, heights)
    _check_stacked_along_normal(folder, slices, normal)

    lps = np.eye(4)
    lps[:3, 0] = first.row_cosines * first.pixel_spacing[1]
    lps[:3, 1] = first.col_cosines * first.pixel_spacing[0]
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = slices[0].position
    affine = np.eye(4)
    affine[:3, :] = _LPS_TO_RAS @ lps[:3, :]

    volume = np.empty((first.columns, first.rows, len(slices)), dtype=dtype)
    for k, s in enumerate(slices):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as inf and is reported below
            values = _slice_values(s).T.astype(dtype, copy=False)  # (rows, columns) -> (columns, rows) = (i, j)
        if volume.dtype.kind == "f" and not np.all(np.isfinite(values)):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            raise MedsegError(f"{s.path}: {bad} pixels are NaN or infinite after RescaleSlope / RescaleIntercept; "
                              "fix or replace the slice")
        volume[:, :, k] = values
    geometry = Geometry.from_affine(affine, volume.shape, None, source=folder)
    return to_canonical(volume[..., None], geometry), geometry


def _stored_values(volume: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if not (np.isfinite(slope) and slope != 0 and np.isfinite(intercept)):
        raise ValueError(f"slope must be finite and non-zero and intercept finite, got {slope}, {intercept}")
    stored = (volume.astype(np.float64) - intercept) / slope
    if not np.all(np.isfinite(stored)):
        raise ValueError("volume contains NaN or infinite values")
    rounded = np.rint(stored)
    if stored.size and float(np.max(np.abs(stored - rounded))) > 1e-3:
        raise ValueError(f"volume values are not whole numbers after (value - {intercept}) / {slope}; they cannot be "
                         "stored as integers")
    info = np.iinfo(np.int16)
    if stored.size and (rounded.min() < info.min or rounded.max() > info.max):
        raise ValueError(f"stored values (value - {intercept}) / {slope} span [{rounded.min()}, {rounded.max()}], "
                         "outside int16; choose another slope / intercept")
    return rounded.astype(np.int16)


def _ds(values) -> list[str]:
    """Decimal strings of at most 16 characters (the DS limit)."""
    return [format_number_as_ds(float(v)) for v in values]


def write_series(folder: str | os.PathLike, volume: np.ndarray, affine: np.ndarray, *, series_uid: str | None = None,
                 modality: str = "CT", slope: float = 1.0, intercept: float = 0.0) -> list[Path]:
    """Writes a 3D volume in file voxel order (i = column, j = row, k = slice) as a DICOM series; returns the files.

    One uncompressed Explicit VR Little Endian file per slice, `slice_0000.dcm`, ... in order of k, each storing
    `(volume - intercept) / slope` as int16 (which must be whole numbers in int16 range) with RescaleSlope /
    RescaleIntercept. `affine` is the RAS+ affine of `volume`; its first two columns must be orthogonal and its third
    perpendicular to both (DICOM slices are stacked along their normal). When the third column points against
    cross(column 0, column 1) in LPS (a negative determinant), `read_series` returns the slices in reversed k order
    with the matching affine: the same voxels and the same canonical array.

    UIDs are derived from `series_uid`, or, when it is None, from a hash of the volume, affine and parameters, so the
    same inputs give byte-identical files. The folder is created if needed and must not already hold DICOM files.
    """
    folder = Path(folder)
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"volume must be a non-empty 3D array, got shape {volume.shape}")
    if volume.dtype.kind not in "biuf":
        raise ValueError(f"volume must be numeric, got {volume.dtype}")
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASSES)}, got {modality!r}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"affine must be a finite 4x4 matrix with last row [0, 0, 0, 1], got {affine.tolist()}")
    lps = _LPS_TO_RAS @ affine[:3, :]
    columns = lps[:, :3]
    sizes = np.linalg.norm(columns, axis=0)
    if not np.all(sizes > 0):
        raise ValueError(f"affine has a zero-length voxel axis: {affine.tolist()}")
    unit = columns / sizes
    if abs(float(unit[:, 0] @ unit[:, 1])) > 1e-6:
        raise ValueError(f"the affine's first two columns (row and column directions) must be orthogonal, got "
                         f"{affine.tolist()}")
    normal = np.cross(unit[:, 0], unit[:, 1])
    if np.linalg.norm(np.cross(unit[:, 2], normal)) > 1e-6:
        raise ValueError(f"the affine's third column must be perpendicular to the first two (DICOM slices are "
                         f"stacked along their normal), got {affine.tolist()}")
    stored = _stored_values(volume, float(slope), float(intercept))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.is_dir() and dicom_files(folder):
        raise FileExistsError(f"{folder} already holds DICOM files; write each series to a new folder")

    if series_uid is None:
        digest = hashlib.sha256()
        for part in (str(volume.shape), str(volume.dtype), modality, repr(float(slope)), repr(float(intercept))):
            digest.update(part.encode())
        digest.update(np.ascontiguousarray(volume).tobytes())
        digest.update(affine.tobytes())
        series_uid = generate_uid(entropy_srcs=["medseg_jax.write_series", digest.hexdigest()])
    series_uid = UID(series_uid)
    if not series_uid.is_valid:
        raise ValueError(f"series_uid {str(series_uid)!r} is not a valid DICOM UID")
    study_uid = generate_uid(entropy_srcs=[str(series_uid), "study"])
    frame_uid = generate_uid(entropy_srcs=[str(series_uid), "frame of reference"])

    folder.mkdir(parents=True, exist_ok=True)
    n_columns, n_rows, n_slices = stored.shape
    orientation = _ds(np.concatenate([unit[:, 0], unit[:, 1]]))
    pixel_spacing = _ds([sizes[1], sizes[0]])
    written = []
    for k in range(n_slices):
        instance_uid = generate_uid(entropy_srcs=[str(series_uid), "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        path = folder / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = _SOP_CLASSES[modality]
        ds.SOPInstanceUID = instance_uid
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.Modality = modality
        ds.PatientName = ""
        ds.PatientID = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position = lps[:, 3] + k * lps[:, 2]
        ds.ImagePositionPatient = _ds(position)
        ds.ImageOrientationPatient = orientation
        ds.SliceLocation = _ds([position @ normal])[0]
        ds.PixelSpacing = pixel_spacing
        ds.SliceThickness = _ds([sizes[2]])[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_rows
        ds.Columns = n_columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds([intercept])[0]
        ds.RescaleSlope = _ds([slope])[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()  # rows x columns
        with atomic_path(path, suffix=DICOM_SUFFIX) as tmp:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        written.append(path)
    return written
