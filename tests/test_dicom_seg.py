"""DICOM Segmentation output: round trips on axial, oblique, sagittal and reversed-slice series, the references checked
with plain pydicom, and the one-line errors (nothing written)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medseg_jax.errors import MedsegError
from medseg_jax.io import dicom, dicom_seg
from medseg_jax.io import geometry as geometry_lib
from tests.conftest import rotation

SHAPE = (7, 6, 5)  # columns, rows, slices: all different, so a swapped or flipped axis cannot pass
NAMES = {0: "background", 1: "liver", 2: "tumour", 5: "vessel"}  # 5: label values need not be contiguous


def _affine(linear, origin=(100.0, 120.5, -50.25)):
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "axial": _affine(np.diag([-0.8, -0.9, 2.5])),
    "oblique": _affine(rotation([0, 0, 1], 20) @ rotation([1, 0, 0], 20) @ np.diag([-0.8, -0.8, 2.5])),
    # Acquired sagittally: columns run posterior, rows inferior, slices along x.
    "sagittal": _affine(np.array([[0.0, 0.0, 2.5], [-0.8, 0.0, 0.0], [0.0, -0.9, 0.0]])),
    # Slices stacked against the normal: read_series reverses k, so frame order differs from the file names'.
    "reversed": _affine(np.diag([-0.8, -0.9, -2.5])),
}


def _series(tmp_path, affine):
    folder = tmp_path / "series"
    volume = np.random.default_rng(0).integers(-1000, 2000, SHAPE).astype(np.int16)
    dicom.write_series(folder, volume, affine)
    return folder


def _label(shape, seed=1):
    """Background, labels 1 and 5 in blobs, and label 2 in one voxel only; slice z = 0 stays empty."""
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 1:3, 1:] = 1
    label[4:, 3:, 2:4] = 5
    label[0, 0, 3] = 2
    label[np.random.default_rng(seed).random(shape) < 0.05] = 5
    label[:, :, 0] = 0
    return label


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_round_trip(tmp_path, kind):
    folder = _series(tmp_path, AFFINES[kind])
    _, geometry = dicom.read_series(folder)
    label = _label(geometry.canonical_shape())
    out = tmp_path / "out" / "seg.dcm"
    dicom_seg.write_dicom_seg(out, label, folder, NAMES, colors={1: (200, 80, 40)})
    back, names = dicom_seg.read_dicom_seg(out, folder)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)
    assert names == {1: "liver", 2: "tumour", 5: "vessel"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]  # no temporary left


@pytest.mark.parametrize("kind", ["oblique", "sagittal", "reversed"])
def test_frames_reference_their_slices(tmp_path, kind):
    folder = _series(tmp_path, AFFINES[kind])
    _, geometry = dicom.read_series(folder)
    out = tmp_path / "seg.dcm"
    dicom_seg.write_dicom_seg(out, _label(geometry.canonical_shape()), folder, NAMES, algorithm_version="9.9")

    slices = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sorted(folder.iterdir()))}
    seg = pydicom.dcmread(out)
    source = next(iter(slices.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    assert {s.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        slices)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour", "vessel"]
    assert [s.SegmentDescription for s in seg.SegmentSequence] == ["label value 1", "label value 2", "label value 5"]
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "9.9"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"  # SCT Tissue

    # Every frame references the slice at its own position, and its pixels are that slice of the label map.
    file_label = geometry_lib.from_canonical(_label(geometry.canonical_shape()), geometry)
    orientation = np.array(source.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    by_height = sorted(slices, key=lambda uid: float(np.array(slices[uid].ImagePositionPatient, dtype=float) @ normal))
    frames = seg.pixel_array
    assert frames.shape[0] == seg.NumberOfFrames > 0
    values = {1: 1, 2: 2, 3: 5}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, np.array(slices[uid].ImagePositionPatient, dtype=float), atol=1e-4)
        k = by_height.index(uid)  # the file voxel order of read_series: slices by position along the normal
        value = values[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        np.testing.assert_array_equal(frame.astype(bool), file_label[:, :, k].T == value)
    # Slice z = 0 is empty in every segment, and so is missing (highdicom omits empty frames).
    assert seg.NumberOfFrames < 3 * SHAPE[2]


def test_absent_labels_stay_as_empty_segments(tmp_path):
    folder = _series(tmp_path, AFFINES["axial"])
    _, geometry = dicom.read_series(folder)
    out = tmp_path / "seg.dcm"
    label = np.zeros(geometry.canonical_shape(), dtype=np.int64)
    label[2, 2, 2] = 300  # above 255: read back as uint16
    names = {1: "liver", 300: "lesion"}
    dicom_seg.write_dicom_seg(out, label, folder, names)
    back, back_names = dicom_seg.read_dicom_seg(out, folder)
    assert back.dtype == np.uint16 and back_names == names
    np.testing.assert_array_equal(back, label)

    # All background: still a SEG with both segments, and it reads back as zeros.
    dicom_seg.write_dicom_seg(out, np.zeros_like(label), folder, names)
    back, back_names = dicom_seg.read_dicom_seg(out, folder)
    assert back_names == names and not back.any() and back.shape == label.shape


def test_segments_without_label_values_read_as_segment_numbers(tmp_path):
    """A SEG from another tool (no "label value N" descriptions): label value = segment number."""
    folder = _series(tmp_path, AFFINES["axial"])
    _, geometry = dicom.read_series(folder)
    label = _label(geometry.canonical_shape())
    out = tmp_path / "seg.dcm"
    dicom_seg.write_dicom_seg(out, label, folder, NAMES)
    seg = pydicom.dcmread(out)
    for segment in seg.SegmentSequence:
        del segment.SegmentDescription
    seg.save_as(out)
    back, names = dicom_seg.read_dicom_seg(out, folder)
    assert names == {1: "liver", 2: "tumour", 3: "vessel"}
    np.testing.assert_array_equal(back, np.where(label == 5, 3, label))


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(MedsegError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    folder = _series(tmp_path, AFFINES["oblique"])
    _, geometry = dicom.read_series(folder)
    label = _label(geometry.canonical_shape())
    out = tmp_path / "out" / "seg.dcm"

    message = _error(dicom_seg.write_dicom_seg, out, label[:, :, :-1], folder, NAMES)
    assert str(out) in message and str(folder) in message and "shape" in message
    assert "[2]" in _error(dicom_seg.write_dicom_seg, out, label, folder, {1: "liver", 5: "vessel"})
    assert "integer" in _error(dicom_seg.write_dicom_seg, out, label.astype(np.float32), folder, NAMES)
    assert "no label above 0" in _error(dicom_seg.write_dicom_seg, out, label * 0, folder, {0: "background"})
    assert "characters" in _error(dicom_seg.write_dicom_seg, out, label, folder, {**NAMES, 1: "x" * 65})
    assert "colour" in _error(dicom_seg.write_dicom_seg, out, label, folder, NAMES, colors={1: (0, 0, 300)})
    assert "not found" in _error(dicom_seg.write_dicom_seg, out, label, tmp_path / "nowhere", NAMES)
    broken = tmp_path / "broken"
    dicom.write_series(broken, np.ones(SHAPE, dtype=np.int16), AFFINES["oblique"])
    ds = pydicom.dcmread(broken / "slice_0002.dcm")
    del ds.FrameOfReferenceUID
    ds.save_as(broken / "slice_0002.dcm")
    message = _error(dicom_seg.write_dicom_seg, out, label, broken, NAMES)
    assert "slice_0002.dcm" in message and "FrameOfReferenceUID" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    # Reading: a missing file, a file that is not a SEG, and a SEG of another series.
    assert "not found" in _error(dicom_seg.read_dicom_seg, out, folder)
    assert "Segmentation" in _error(dicom_seg.read_dicom_seg, folder / "slice_0000.dcm", folder)
    dicom_seg.write_dicom_seg(out, label, folder, NAMES)
    other = tmp_path / "other"
    dicom.write_series(other, np.ones(SHAPE, dtype=np.int16), AFFINES["oblique"])
    assert "not in the series" in _error(dicom_seg.read_dicom_seg, out, other)
