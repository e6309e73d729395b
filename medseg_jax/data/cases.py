"""Loading labelled cases of a dataset into canonical arrays, checking them on the way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg_jax.io import geometry as geometry_lib
from medseg_jax.io import nifti
from medseg_jax.io.datasets import Case, check_declared_labels


@dataclass
class LoadedCase:
    case_id: str
    image: np.ndarray  # (X, Y, Z, C) canonical
    label: np.ndarray | None  # (X, Y, Z) canonical
    geometry: geometry_lib.Geometry


def load_case(case: Case, declared_labels: Sequence[int] | None = None) -> LoadedCase:
    image, geometry = nifti.read_images(case.image_paths)
    label = None
    if case.label_path is not None:
        label, label_geometry = nifti.read_label(case.label_path)
        nifti.check_same_grid(geometry, label_geometry, case.image_paths[0], case.label_path)
        if declared_labels is not None:
            check_declared_labels(label, declared_labels, case.label_path)
    return LoadedCase(case.case_id, image, label, geometry)

