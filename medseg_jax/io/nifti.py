"""NIfTI reading and writing that keeps each scan's geometry.

The model sees every volume in one voxel order: nibabel's closest canonical (RAS+) orientation, reached by permuting
and flipping axes only. Nothing is resampled, so an oblique scan keeps its voxels and its affine simply becomes the
permuted affine. A `Geometry` records how to undo this, and `write_label` / `write_image` put predictions back in the
input file's own shape, voxel order, affine and sform/qform header fields, so they overlay the scan in 3D Slicer or
ITK-SNAP without any fix-up.

Arrays are channels-last: images `(X, Y, Z, C)`, labels `(X, Y, Z)`, both in canonical order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg_jax.errors import MedsegError, short_error
from medseg_jax.fileio import atomic_path
from medseg_jax.io.geometry import Geometry, from_canonical, to_canonical  # noqa: F401 (re-exported)

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Header fields that place the voxels in space; copied verbatim so the written file has the input's exact sform,
# qform, codes and voxel sizes (recomputing the qform quaternion from a matrix changes the last float32 bits).
_SPATIAL_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                   "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def _spatial_header_fields(header) -> dict[str, Any] | None:
    """The fields of a NIfTI header that place voxels in space, as JSON-friendly Python values."""
    if not isinstance(header, nib.Nifti1Header):  # Nifti2Header subclasses Nifti1Header
        return None
    fields = {}
    for name in _SPATIAL_FIELDS:
        value = header[name]
        fields[name] = value.tolist() if np.ndim(value) else value.item()
    fields["pixdim"] = [float(v) for v in header["pixdim"][:4]]
    return fields


def _check_readable_path(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise MedsegError(f"{path}: a symbolic link that does not resolve (to {os.readlink(path)})")
    if not path.exists():
        raise MedsegError(f"{path}: file not found")
    if path.is_dir():
        raise MedsegError(f"{path}: is a folder, expected a .nii or .nii.gz file")


def _check_raw_pixdims(path: Path, img) -> None:
    """Refuses zero or negative voxel sizes where the affine is built from pixdim (no sform).

    nibabel's loader silently "fixes" such headers (0 -> 1 mm, negative -> absolute value) and only logs a warning,
    which would give the scan a made-up geometry; the header as stored is read again to see them.
    """
    if not isinstance(img.header, nib.Nifti1Header) or img.header["sform_code"] != 0:
        return
    try:
        holder = img.file_map.get("header") or img.file_map["image"]  # single-file .nii keeps both in "image"
        with holder.get_prepare_fileobj(mode="rb") as fileobj:
            raw = type(img.header).from_fileobj(fileobj, check=False)
    except Exception as error:
        raise MedsegError(f"{path}: cannot read the NIfTI header ({short_error(error)})") from None
    pixdims = [float(v) for v in raw["pixdim"][1:4]]
    if not all(np.isfinite(v) and v > 0 for v in pixdims):
        raise MedsegError(f"{path}: voxel spacing (pixdim) {tuple(pixdims)} must be positive; fix the header")


# gzip (deflate) cannot compress better than about 1032:1, so a .nii.gz holding N voxel bytes is at least N / 1032 long.
_MAX_DEFLATE_RATIO = 1032


def _check_plausible_size(path: Path, img) -> None:
    """Refuses, from the header alone and before any voxel is read, a volume with a zero-size axis, one larger than
    the file can hold, or one larger than the memory this machine has free."""
    shape = tuple(int(s) for s in img.shape)
    if any(s == 0 for s in shape):
        raise MedsegError(f"{path}: the header declares a zero-size axis (shape {shape}); the file holds no image")
    voxel_bytes = math.prod(shape) * np.dtype(img.get_data_dtype()).itemsize
    file_bytes = path.stat().st_size
    compressed = path.name.endswith(".gz")
    offset = 0 if compressed else int(getattr(img.header, "get_data_offset", lambda: 0)() or 0)
    if (voxel_bytes > file_bytes * _MAX_DEFLATE_RATIO) if compressed else (offset + voxel_bytes > file_bytes):
        raise MedsegError(f"{path}: the header declares {'x'.join(map(str, shape))} voxels "
                          f"({format_size(voxel_bytes)} of data) but the file is {format_size(file_bytes)}; it is "
                          "truncated or its header is wrong")
    needed = 2 * math.prod(shape) * 4  # read as float32, plus the canonical copy
    available = available_memory()
    if needed > available:
        raise MedsegError(f"{path}: {'x'.join(map(str, shape))} voxels need about {format_size(needed)} of memory to "
                          f"read, more than the {format_size(available)} available")


def available_memory() -> int:
    """Bytes of memory this machine has free now."""
    import psutil

    return int(psutil.virtual_memory().available)


def format_size(num_bytes: float) -> str:
    """A byte count for a message: 512 bytes, 3.2 MiB, 70.1 TiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def _load(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Reads the whole file (nibabel is lazy, so the data read happens here too) in the file's voxel order."""
    path = Path(path)
    _check_readable_path(path)
    try:
        img = nib.load(path, mmap=False)
        if not isinstance(img, nib.spatialimages.SpatialImage):
            raise MedsegError(f"{path}: not a volume image ({type(img).__name__})")
        _check_plausible_size(path, img)
        data = np.asanyarray(img.dataobj)
        affine = img.affine
    except MedsegError:
        raise
    except Exception as error:  # nibabel, gzip, zlib and EOF errors all mean the same thing to the user
        raise MedsegError(f"{path}: cannot read as NIfTI ({short_error(error)}); is the file complete and a valid "
                          ".nii/.nii.gz?") from None
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise MedsegError(f"{path}: unsupported voxel type {data.dtype} (expected integer or float scalars)")
    # ITK writes multi-component volumes as (X, Y, Z, 1, C): NIfTI's 5th dimension is the vector axis.
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim not in (3, 4):
        raise MedsegError(f"{path}: expected a 3D or 4D image, got {data.ndim}D with shape {data.shape}")
    if affine is None:
        raise MedsegError(f"{path}: no affine in the header")
    _check_raw_pixdims(path, img)
    geometry = Geometry.from_affine(affine, data.shape[:3], _spatial_header_fields(img.header), source=path)
    return data, geometry


def read_image(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Returns the `(X, Y, Z, C)` canonical array (C=1 for a 3D file) and its geometry.

    A folder is read as a DICOM series (`io/dicom.py`) into the same model."""
    if Path(path).is_dir():
        from medseg_jax.io import dicom  # pydicom is only imported when a series is met

        return dicom.read_series(path, dtype=dtype)
    data, geometry = _load(path)
    data = data.astype(dtype, copy=False)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise MedsegError(f"{path}: {bad} voxels are NaN or infinite; fix or replace them before training")
    if data.ndim == 3:
        data = data[..., None]
    return to_canonical(data, geometry), geometry


def read_images(paths: Sequence[str | os.PathLike], dtype=np.float32, reader=None) -> tuple[np.ndarray, Geometry]:
    """Reads one case's channel files (nnU-Net's _0000, _0001, ...) and stacks them as channels, in the given order.

    Every file must have the first file's shape and affine (within 1e-3); the geometry is the first file's. `reader`
    (path -> (canonical array, geometry)) reads other formats (`formats.read_images`).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise MedsegError("no image files given for this case")
    arrays, first_geometry = [], None
    for path in paths:
        array, geometry = reader(path) if reader is not None else read_image(path, dtype=dtype)
        if first_geometry is None:
            first_geometry = geometry
        else:
            if geometry.shape != first_geometry.shape:
                raise MedsegError(f"{path}: shape {geometry.shape} differs from the case's first channel {paths[0]} "
                                  f"{first_geometry.shape}")
            if not np.allclose(geometry.affine, first_geometry.affine, rtol=0, atol=1e-3):
                diff = float(np.max(np.abs(geometry.affine - first_geometry.affine)))
                raise MedsegError(f"{path}: affine differs from the case's first channel {paths[0]} (max difference "
                                  f"{diff:.4g}); resample the channels onto one grid")
        arrays.append(array)
    return np.concatenate(arrays, axis=-1) if len(arrays) > 1 else arrays[0], first_geometry


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Returns the `(X, Y, Z)` canonical integer label map (int16, or int32 beyond 32767) and its geometry."""
    data, geometry = _load(path)
    if data.ndim == 4:
        if data.shape[3] != 1:
            raise MedsegError(f"{path}: a label map must be 3D, got shape {data.shape}")
        data = data[..., 0]
    return to_canonical(label_values(path, data), geometry), geometry


def label_values(path, data: np.ndarray) -> np.ndarray:
    """A label map's values checked (finite, whole, non-negative numbers; the error names `path`) and as int16, or int32
    beyond 32767."""
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise MedsegError(f"{path}: label map contains NaN or infinite values")
        if not np.array_equal(data, np.round(data)):
            example = float(data[data != np.round(data)].flat[0])
            raise MedsegError(f"{path}: label map has non-integer values (e.g. {example}); labels must be whole "
                              "numbers 0, 1, 2, ...")
    if not data.size:
        return data.astype(np.int16)
    low, high = data.min(), data.max()
    if low < 0:
        raise MedsegError(f"{path}: label map has negative values (min {low}); labels must be 0, 1, 2, ...")
    if high > np.iinfo(np.int32).max:
        raise MedsegError(f"{path}: label value {high} is too large")
    return data.astype(np.int16 if high <= np.iinfo(np.int16).max else np.int32, copy=False)


def check_same_grid(image_geom: Geometry, label_geom: Geometry, image_path, label_path, atol: float = 1e-3) -> None:
    """Raises MedsegError unless the label's canonical voxels coincide with the image's.

    The comparison is in canonical order, so a label stored in another voxel order (say RAS for an LPS scan) that
    covers the same voxels is accepted.
    """
    if label_geom.canonical_shape() != image_geom.canonical_shape():
        if sorted(label_geom.shape) != sorted(image_geom.shape):
            raise MedsegError(f"{label_path}: shape {label_geom.shape} differs from its image {image_path} "
                              f"{image_geom.shape}")
        raise MedsegError(f"{label_path}: voxel axes (shape {label_geom.shape}, affine orientation) differ from its "
                          f"image {image_path} (shape {image_geom.shape}); the label is not on the image's grid")
    if not np.allclose(label_geom.canonical_affine, image_geom.canonical_affine, rtol=0, atol=atol):
        diff = float(np.max(np.abs(label_geom.canonical_affine - image_geom.canonical_affine)))
        raise MedsegError(f"{label_path}: affine differs from its image {image_path} (max difference {diff:.4g}, "
                          f"tolerance {atol}); resample the label onto the image grid")


def _nifti_suffix(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return suffix
    raise MedsegError(f"{path}: output file name must end with .nii.gz or .nii")


def _header_for(geometry: Geometry, reference_header=None) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    fields = _spatial_header_fields(reference_header) if reference_header is not None else geometry.spatial_header
    if fields is None:
        header.set_sform(geometry.affine, code=1)
        header.set_qform(geometry.affine, code=1)
        header.set_xyzt_units("mm")
        return header
    for name in _SPATIAL_FIELDS:
        header[name] = fields[name]
    header["pixdim"][:4] = fields["pixdim"]
    return header


def _write(path, file_order: np.ndarray, geometry: Geometry, dtype, reference_header=None) -> None:
    path = Path(path)
    suffix = _nifti_suffix(path)
    header = _header_for(geometry, reference_header)
    header.set_data_shape(file_order.shape)
    header.set_data_dtype(dtype)
    # The affine is passed only to check that the header carries it; nibabel would reset the sform/qform codes if the
    # affine given to the constructor disagreed with the header, so we refuse that instead.
    img = nib.Nifti1Image(file_order.astype(dtype, copy=False), None, header=header)
    written = img.header.get_best_affine()
    if not np.allclose(written, geometry.affine, rtol=0, atol=1e-3):
        raise ValueError(f"reference header's affine {written.tolist()} does not match the geometry's "
                         f"{geometry.affine.tolist()}")
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)


def write_label(path: str | os.PathLike, canonical_label: np.ndarray, geometry: Geometry,
                reference_header=None) -> None:
    """Writes a canonical `(X, Y, Z)` label map in the file's original voxel order, affine and header geometry.

    Stored as uint8, or int16 / int32 when values exceed 255 / 32767. `reference_header` (a nibabel NIfTI header, e.g.
    the scan's own) overrides the spatial fields recorded in `geometry`; its affine must match the geometry's.
    """
    label, dtype = label_to_write(canonical_label)
    _write(path, from_canonical(label, geometry), geometry, dtype, reference_header)


def label_to_write(canonical_label: np.ndarray) -> tuple[np.ndarray, type]:
    """A label map handed to a writer, checked ((X, Y, Z), integer, non-negative), and the smallest file dtype that
    holds it: uint8, int16 beyond 255, int32 beyond 32767."""
    label = np.asarray(canonical_label)
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {label.shape}")
    if label.dtype.kind not in "biu":
        raise ValueError(f"label map must have an integer dtype, got {label.dtype}")
    high = int(label.max()) if label.size else 0
    if label.size and int(label.min()) < 0:
        raise ValueError(f"label map has negative values (min {int(label.min())})")
    return label, np.uint8 if high <= 255 else np.int16 if high <= 32767 else np.int32


def write_image(path: str | os.PathLike, canonical_image: np.ndarray, geometry: Geometry,
                reference_header=None) -> None:
    """Writes a canonical `(X, Y, Z)` or `(X, Y, Z, C)` float32 volume in the file's original geometry.

    A single channel `(X, Y, Z, 1)` is written as a 3D file, C > 1 as a 4D one.
    """
    image = np.asarray(canonical_image)
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (X, Y, Z) or (X, Y, Z, C), got shape {image.shape}")
    _write(path, from_canonical(image, geometry), geometry, np.float32, reference_header)
