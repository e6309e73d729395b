"""DICOM Segmentation objects (highdicom) for a label map on a DICOM series' grid, and back.

`write_dicom_seg` stores a canonical `(X, Y, Z)` label map, on exactly the grid `dicom.read_series(series_folder)`
returns, as one multi-frame BINARY Segmentation instance that references the source series:

- one segment per label value > 0 declared in `label_names`, in ascending label order (segment number 1 is the smallest
  label), *including labels absent from this map*: a structure the model looked for and did not find stays visible as
  an empty segment, segment numbers mean the same label in every case of a dataset, and an all-background prediction
  is still a valid SEG (DICOM requires at least one segment). An empty segment simply has no frames (the standard and
  highdicom allow that; frames with no foreground of a segment are omitted). When the whole map is background,
  highdicom keeps every frame (it cannot omit them all), one bit per pixel and segment.
- each segment's SegmentLabel is its name, its SegmentDescription `"label value N"` keeps the label value (segment
  numbers are 1..n and cannot hold non-contiguous labels such as {1, 2, 5}); its property category and type are the
  generic SNOMED CT "Tissue" (85756007), and it names the algorithm (type AUTOMATIC, family "Artificial Intelligence").
- frame f of a segment comes from source slice k of the series' file voxel order (k sorted by position along the slice
  normal, see `dicom`), and its Derivation Image / Source Image Sequence references that slice's SOPInstanceUID.

`read_dicom_seg` reads such an object back onto the series' canonical grid, and a SEG from another tool when its
segments do not overlap (label value = segment number unless every SegmentDescription holds "label value N").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medseg_jax import __version__
from medseg_jax.errors import MedsegError, short_error
from medseg_jax.fileio import atomic_path
from medseg_jax.io import geometry as geometry_lib
from medseg_jax.io.dicom import dicom_files, read_series

_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_LABEL_VALUE = re.compile(r"label value (\d+)")
_LABEL_VALUE_FORMAT = "label value {}"
_LO_MAX = 64  # characters of a DICOM LO value (SegmentLabel, SeriesDescription, algorithm name)
_SEG_SERIES_NUMBER = 1000  # apart from the source's usual small numbers, so viewers list the SEG after the images
# Type 2 attributes highdicom copies from the source images: a minimal or anonymised series may lack them, and an
# empty value ("unknown") is what DICOM prescribes then.
_TYPE2_FROM_SOURCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                      "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def _series_headers(series_folder: Path, geometry: geometry_lib.Geometry) -> list[pydicom.Dataset]:
    """The series' headers in file voxel order k (increasing position along the slice normal).

    The same files `read_series` read (`dicom.dicom_files` decides which files belong to a series folder), ordered by
    their position along `geometry`'s k axis, which is the normal `read_series` sorted them along.
    """
    inverse = np.linalg.inv(geometry.affine)
    headers, heights = [], []
    for path in dicom_files(series_folder):
        # read_series has read each file already; force=True for those without the DICM marker, as it does.
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword in _REQUIRED_UIDS:
            if not str(dataset.get(keyword, "") or ""):
                raise MedsegError(f"{path}: missing {keyword}; a DICOM Segmentation must reference complete source "
                                  "images")
        ras = np.array([float(v) for v in dataset.ImagePositionPatient]) * [-1.0, -1.0, 1.0]
        headers.append(dataset)
        heights.append(float((inverse @ np.append(ras, 1.0))[2]))  # k in voxels; i, j may drift (read_series allows)
    if len(headers) != geometry.shape[2]:
        raise RuntimeError(f"{series_folder}: {len(headers)} files, but read_series found {geometry.shape[2]} slices")
    slices = [headers[n] for n in np.argsort(heights, kind="stable")]
    uids = {s.SOPInstanceUID for s in slices}
    if len(uids) != len(slices):
        raise MedsegError(f"{series_folder}: two slices share one SOPInstanceUID; each slice must have its own UID "
                          "for a DICOM Segmentation to reference it")
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if len({str(s.get(keyword)) for s in slices}) > 1:
            raise MedsegError(f"{series_folder}: slices have different {keyword}s; a series must have one")
    return slices


def _check_text(path: Path, what: str, text: str) -> None:
    if not text or len(text) > _LO_MAX or "\\" in text or any(ord(c) < 32 for c in text):
        raise MedsegError(f"{path}: {what} {text!r} must be 1 to {_LO_MAX} characters without backslashes or control "
                          "characters (a DICOM LO value)")


def _segment_descriptions(path: Path, label_names: Mapping[int, str], colors: Mapping[int, object] | None,
                          algorithm: hd.AlgorithmIdentificationSequence) -> list[hd.seg.SegmentDescription]:
    values = sorted(int(v) for v in label_names if int(v) > 0)
    if not values:
        raise MedsegError(f"{path}: label_names declares no label above 0 (background); a DICOM Segmentation needs at "
                          "least one segment")
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = str(label_names[value])
        _check_text(path, f"label {value}'s name", name)
        color = None
        if colors is not None and value in colors:
            rgb = np.asarray(colors[value], dtype=np.float64)
            if rgb.shape != (3,) or not np.all((rgb >= 0) & (rgb <= 255)):
                raise MedsegError(f"{path}: colour of label {value} must be (red, green, blue) in 0..255, got "
                                  f"{colors[value]!r}")
            color = hd.color.CIELabColor.from_rgb(*rgb)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=color)
        description.SegmentDescription = _LABEL_VALUE_FORMAT.format(value)
        descriptions.append(description)
    return descriptions


def write_dicom_seg(path: str | os.PathLike, canonical_label: np.ndarray, series_folder: str | os.PathLike,
                    label_names: Mapping[int, str], *, algorithm_name: str = "medseg-jax",
                    algorithm_version: str = __version__, series_description: str = "medseg-jax segmentation",
                    colors: Mapping[int, tuple[float, float, float]] | None = None) -> None:
    """Writes `canonical_label` (X, Y, Z), on the canonical grid of `series_folder`, as a DICOM Segmentation at `path`.

    `label_names` maps label values to names (dataset.json's labels; 0, background, is not a segment); every label
    value > 0 in it becomes a segment, present in the map or not (see the module docstring), and every value in the
    map must be declared there. `colors` optionally gives a label value's display colour as RGB in 0..255. The file is
    uncompressed (Explicit VR Little Endian, one bit per pixel), written under a temporary name and renamed; a map
    whose shape or values do not fit raises a one-line `MedsegError` before anything is written.
    """
    path, series_folder = Path(path), Path(series_folder)
    _, geometry = read_series(series_folder)  # validates the series; a MedsegError names its folder or file
    label = np.asarray(canonical_label)
    expected = geometry.canonical_shape()
    if label.shape != expected:
        raise MedsegError(f"{path}: label map has shape {label.shape}, but the series {series_folder} has the "
                          f"canonical shape {expected}; the label map must be on the series' own grid")
    if label.dtype.kind not in "biu":
        raise MedsegError(f"{path}: label map has type {label.dtype}; expected integer labels")
    try:
        names = {int(value): str(name) for value, name in label_names.items()}
    except (TypeError, ValueError):
        raise MedsegError(f"{path}: label_names keys must be label values (integers), got "
                          f"{list(label_names)}") from None
    declared = {value for value in names if value > 0}
    present = {int(v) for v in np.unique(label)} - {0}
    if undeclared := sorted(present - declared):
        raise MedsegError(f"{path}: label map holds values {undeclared} that label_names does not declare (it has "
                          f"{sorted(declared)}); name every label")
    _check_text(path, "algorithm name", algorithm_name)
    _check_text(path, "algorithm version", algorithm_version)
    _check_text(path, "series description", series_description)
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=algorithm_version)
    descriptions = _segment_descriptions(path, names, colors, algorithm)
    if len(descriptions) > np.iinfo(np.uint16).max:
        raise MedsegError(f"{path}: {len(descriptions)} labels; a DICOM Segmentation holds at most 65535 segments")
    sources = _series_headers(series_folder, geometry)
    for dataset in sources:  # in-memory headers only; the series' files are not touched
        for keyword in _TYPE2_FROM_SOURCE:
            if keyword not in dataset:
                setattr(dataset, keyword, "")

    # Label values -> segment numbers 1..n (0 stays background), so highdicom takes the map as one label image.
    values = sorted(declared)
    # searchsorted rather than a lookup table: label values may be large; every non-zero one is declared (checked).
    foreground = label != 0
    segments = np.zeros(label.shape, dtype=np.uint16)
    segments[foreground] = np.searchsorted(values, label[foreground]) + 1
    # Canonical -> file voxel order (i = column, j = row, k = slice) -> highdicom's (frames, rows, columns).
    file_order = geometry_lib.from_canonical(segments, geometry)
    frames = np.ascontiguousarray(file_order.transpose(2, 1, 0))
    if len(values) < 256:
        frames = frames.astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medseg-jax",
        manufacturer_model_name=algorithm_name, software_versions=algorithm_version, device_serial_number="none",
        series_description=series_description)
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)


def _label_values(seg: hd.seg.Segmentation, numbers: list[int]) -> list[int]:
    """Each segment's label value: from "label value N" in every SegmentDescription, else the segment number."""
    values = []
    for number in numbers:
        match = _LABEL_VALUE.fullmatch(str(seg.get_segment_description(number).get("SegmentDescription", "")))
        values.append(int(match.group(1)) if match else None)
    if None in values or 0 in values or len(set(values)) != len(values):
        return list(numbers)
    return values


def read_dicom_seg(path: str | os.PathLike, series_folder: str | os.PathLike) -> tuple[np.ndarray, dict[int, str]]:
    """Reads a DICOM Segmentation of `series_folder` back; returns the canonical `(X, Y, Z)` label map on the series'
    grid (uint8, or uint16 for label values above 255) and {label value: segment label} for every segment, empty
    ones included. Segments become label values as the module docstring says; overlapping segments are refused."""
    path, series_folder = Path(path), Path(series_folder)
    if not path.is_file():
        raise MedsegError(f"{path}: file not found")
    _, geometry = read_series(series_folder)
    try:
        seg = hd.seg.segread(path)
    except Exception as error:
        raise MedsegError(f"{path}: cannot read as a DICOM Segmentation ({short_error(error)})") from None
    if seg.SOPClassUID != _SEGMENTATION_STORAGE:
        raise MedsegError(f"{path}: not a DICOM Segmentation (SOP class {seg.SOPClassUID})")
    if seg.SegmentationType not in ("BINARY", "LABELMAP"):
        raise MedsegError(f"{path}: {seg.SegmentationType} segmentation; only BINARY and LABELMAP map to labels")
    sources = _series_headers(series_folder, geometry)
    series_uid = str(sources[0].SeriesInstanceUID)
    slice_uids = [str(s.SOPInstanceUID) for s in sources]
    referenced = {str(instance) for _, _, instance in seg.get_source_image_uids()}
    if not referenced <= set(slice_uids):
        raise MedsegError(f"{path}: references {len(referenced - set(slice_uids))} image(s) that are not in the series "
                          f"{series_folder} (SeriesInstanceUID {series_uid}); pass the series it was made from")

    numbers = [int(n) for n in seg.get_segment_numbers()]
    values = _label_values(seg, numbers)
    dtype = np.uint8 if max(values) <= 255 else np.uint16 if max(values) <= 65535 else np.uint32
    try:
        stacked = seg.get_pixels_by_source_instance(
            slice_uids, segment_numbers=numbers, combine_segments=True, relabel=False,
            assert_missing_frames_are_empty=True)  # slices without foreground have no frames
    except RuntimeError as error:  # highdicom's report of overlapping segments
        raise MedsegError(f"{path}: cannot combine the segments into one label map ({short_error(error)})") from None
    lookup = np.zeros(max(numbers) + 1, dtype=dtype)
    lookup[numbers] = values
    file_order = lookup[np.asarray(stacked)].transpose(2, 1, 0)  # (frames, rows, columns) -> (i, j, k)
    names = {value: str(seg.get_segment_description(number).segment_label) for number, value in zip(numbers, values)}
    return geometry_lib.to_canonical(file_order, geometry), names
