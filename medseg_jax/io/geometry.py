"""Where a volume's voxels sit in space: the `Geometry` every reader (NIfTI, DICOM) returns and every writer uses.

The model sees every volume in one voxel order: nibabel's closest canonical (RAS+) orientation, reached by permuting
and flipping axes only. Nothing is resampled, so an oblique scan keeps its voxels and its affine simply becomes the
permuted affine. A `Geometry` records how to undo this, so that predictions go back to the scan's own grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel import orientations

from medseg_jax.errors import MedsegError

_CANONICAL_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume's voxels sit in space, and how its file voxel order maps to the canonical one."""

    affine: np.ndarray  # 4x4 affine of the file (float64), the one nibabel reports (sform, else qform, else pixdims)
    shape: tuple[int, int, int]  # spatial shape in the file's voxel order
    to_canonical: np.ndarray  # nibabel ornt array: file voxel order -> canonical
    spacing: tuple[float, float, float]  # mm per voxel, canonical axis order
    canonical_affine: np.ndarray  # affine of the canonical-order array
    # The input's NIfTI spatial header fields (sform/qform/codes/pixdim[0:4]/units), or None when the geometry did not
    # come from a NIfTI file; writers then store the affine as both sform and qform with code 1 (scanner).
    spatial_header: dict[str, Any] | None = field(default=None)

    def canonical_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for file_axis, (canonical_axis, _) in enumerate(self.to_canonical):
            shape[int(canonical_axis)] = self.shape[file_axis]
        return tuple(shape)

    def file_spacing(self) -> tuple[float, float, float]:
        """mm per voxel in the file's voxel order."""
        return tuple(float(self.spacing[int(canonical_axis)]) for canonical_axis, _ in self.to_canonical)

    def from_canonical_ornt(self) -> np.ndarray:
        """The ornt array taking canonical voxel order back to the file's."""
        return orientations.ornt_transform(_CANONICAL_ORNT, self.to_canonical)

    def to_dict(self) -> dict:
        return {
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "to_canonical": self.to_canonical.tolist(),
            "spacing": list(self.spacing),
            "canonical_affine": self.canonical_affine.tolist(),
            "spatial_header": None if self.spatial_header is None else dict(self.spatial_header),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        header = d.get("spatial_header")
        return cls(
            affine=np.asarray(d["affine"], dtype=np.float64),
            shape=tuple(int(s) for s in d["shape"]),
            to_canonical=np.asarray(d["to_canonical"], dtype=np.float64),
            spacing=tuple(float(s) for s in d["spacing"]),
            canonical_affine=np.asarray(d["canonical_affine"], dtype=np.float64),
            spatial_header=None if header is None else dict(header),
        )

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int], spatial_header: dict | None = None,
                    source: str | os.PathLike = "<affine>") -> Geometry:
        """Builds the geometry of a volume of `shape` (file order) with `affine`; MedsegError names `source`."""
        affine = np.asarray(affine, dtype=np.float64)
        shape = tuple(int(s) for s in shape)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise MedsegError(f"{source}: affine is not a finite 4x4 matrix")
        linear = affine[:3, :3]
        voxel_sizes = np.linalg.norm(linear, axis=0)
        if not np.all(voxel_sizes > 0):
            raise MedsegError(f"{source}: zero voxel spacing {tuple(float(v) for v in voxel_sizes)} in the affine; "
                              "fix the header (pixdim / sform / qform)")
        # Relative to the voxel volume, so a small but valid voxel size does not look singular.
        if abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(voxel_sizes)):
            raise MedsegError(f"{source}: singular affine (voxel axes are parallel); fix the header sform / qform")
        ornt = orientations.io_orientation(affine)
        if np.any(np.isnan(ornt)):
            raise MedsegError(f"{source}: affine has no usable orientation; fix the header sform / qform")
        canonical_affine = affine @ orientations.inv_ornt_aff(ornt, shape)
        spacing = tuple(float(v) for v in np.linalg.norm(canonical_affine[:3, :3], axis=0))
        return cls(affine=affine, shape=shape, to_canonical=ornt, spacing=spacing, canonical_affine=canonical_affine,
                   spatial_header=None if spatial_header is None else dict(spatial_header))


def to_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """File voxel order -> canonical; any trailing axes after the three spatial ones (channels) ride along."""
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not start with the file shape {geometry.shape}")
    return np.ascontiguousarray(orientations.apply_orientation(array, geometry.to_canonical))


def from_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Canonical voxel order -> the file's; trailing axes ride along."""
    array = np.asarray(array)
    if tuple(array.shape[:3]) != geometry.canonical_shape():
        raise ValueError(f"array shape {array.shape} does not start with the canonical shape "
                         f"{geometry.canonical_shape()}")
    return np.ascontiguousarray(orientations.apply_orientation(array, geometry.from_canonical_ornt()))
