"""Loading labelled cases of a dataset into canonical arrays, checking them on the way. A label is a NIfTI label map
or a 3D Slicer segmentation (`.seg.nrrd`, e.g. a pre-annotation corrected in Slicer), whose segments are matched to the
dataset's labels by name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg_jax.errors import MedsegError
from medseg_jax.io import formats, nifti
from medseg_jax.io import geometry as geometry_lib
from medseg_jax.io.annotations import read_seg_nrrd
from medseg_jax.io.datasets import Case, check_declared_labels


@dataclass
class LoadedCase:
    case_id: str
    image: np.ndarray  # (X, Y, Z, C) canonical
    label: np.ndarray | None  # (X, Y, Z) canonical
    geometry: geometry_lib.Geometry


SEG_NRRD = ".seg.nrrd"


def read_segmentation(path, label_names: dict[int, str] | None = None) -> tuple[np.ndarray, geometry_lib.Geometry]:
    """A Slicer `.seg.nrrd` as a canonical label map and its geometry. With the dataset's `label_names` each segment
    takes the value of the label of its name (whatever value Slicer gave it); without, its own label value."""
    try:
        voxels, affine, names, _ = read_seg_nrrd(path)
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise MedsegError(f"{path}: not a readable Slicer segmentation ({error})") from None
    if voxels.ndim != 3:
        raise MedsegError(f"{path}: segments overlap ({voxels.shape[0]} layers); a label map needs every voxel in one "
                          "segment: remove the overlaps in Slicer (Segment Editor, masking 'overwrite other segments')")
    values = np.unique(voxels)
    unnamed = [int(v) for v in values if v != 0 and int(v) not in names]
    if unnamed:
        raise MedsegError(f"{path}: voxels of value {unnamed[0]} belong to no segment")
    lookup = np.arange(int(values.max(initial=0)) + 1, dtype=np.int16)
    if label_names is not None:
        by_name = {name.strip().lower(): value for value, name in label_names.items()}
        for value, name in names.items():
            key = name.strip().lower()
            if key not in by_name:
                raise MedsegError(f"{path}: segment '{name}' is not a label of this dataset (labels: "
                                  f"{', '.join(label_names[v] for v in sorted(label_names) if v)})")
            if value < lookup.size:  # (a segment without voxels has nothing to map)
                lookup[value] = by_name[key]
    geometry = geometry_lib.Geometry.from_affine(affine, voxels.shape, source=path)
    return geometry_lib.to_canonical(lookup[voxels], geometry), geometry


def read_label_file(path, label_names: dict[int, str] | None = None,
                    spacing_2d=None) -> tuple[np.ndarray, geometry_lib.Geometry]:
    """A canonical label map from a Slicer `.seg.nrrd` or any format of `formats` (NIfTI, MetaImage, NRRD, 2D
    pictures with `spacing_2d` mm per pixel)."""
    if str(path).endswith(SEG_NRRD):
        return read_segmentation(path, label_names)
    return formats.read_label(path, spacing_2d)


def load_case(case: Case, declared_labels: Sequence[int] | None = None,
              label_names: dict[int, str] | None = None) -> LoadedCase:
    image, geometry = formats.read_images(case.image_paths, case.spacing_2d)
    label = None
    if case.label_path is not None:
        label, label_geometry = read_label_file(case.label_path, label_names, case.spacing_2d)
        nifti.check_same_grid(geometry, label_geometry, case.image_paths[0], case.label_path)
        if declared_labels is not None:
            check_declared_labels(label, declared_labels, case.label_path)
    return LoadedCase(case.case_id, image, label, geometry)

