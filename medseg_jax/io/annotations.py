"""Pre-annotations for the tools annotators use: a predicted label map as a 3D Slicer segmentation (`.seg.nrrd`, through
slicerio: one segment per label with its name and colour, on the scan's grid), and ITK-SNAP's label description
file (names and colours for the NIfTI label maps). Colours follow a fixed palette by label value (or the dataset's
own, given as {label: [r, g, b]} in 0..1), so every case of a task looks the same in either tool.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg_jax import fileio
from medseg_jax.io.geometry import Geometry, from_canonical

# Distinct colours (matplotlib's tab10, then tab20's lighter ones) in 0..1, for label values 1, 2, ...
PALETTE = [(0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
           (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
           (0.737, 0.741, 0.133), (0.090, 0.745, 0.812), (0.682, 0.780, 0.910), (1.0, 0.733, 0.471),
           (0.596, 0.875, 0.541), (1.0, 0.596, 0.588), (0.773, 0.690, 0.835), (0.769, 0.612, 0.580)]

# 3D Slicer's LPS world from nibabel's RAS one
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def label_colors(names: dict[int, str], colors: dict | None = None) -> dict[int, tuple[float, float, float]]:
    """A colour (r, g, b in 0..1) per foreground label: `colors`' where given, else the palette's."""
    colors = {int(k): tuple(float(c) for c in v) for k, v in (colors or {}).items()}
    return {value: colors.get(value, PALETTE[(value - 1) % len(PALETTE)]) for value in sorted(names) if value != 0}


def write_seg_nrrd(path: str | os.PathLike, canonical_labels: np.ndarray, geometry: Geometry,
                   names: dict[int, str], colors: dict | None = None) -> None:
    """A canonical (X, Y, Z) label map as a Slicer segmentation on the scan's own grid and voxel order: every label of
    the task is a segment (also one the case lacks, ready to paint), named and coloured."""
    import slicerio

    voxels = from_canonical(np.asarray(canonical_labels), geometry)
    if int(voxels.max(initial=0)) > 255 or int(voxels.min(initial=0)) < 0:
        raise ValueError("a Slicer label map holds values 0..255")
    segments = [{"id": f"Segment_{value}", "name": names[value], "labelValue": value, "layer": 0,
                 "color": list(color)} for value, color in label_colors(names, colors).items()]
    segmentation = {"voxels": np.ascontiguousarray(voxels, np.uint8), "ijkToLPS": _RAS_TO_LPS @ geometry.affine,
                    "segments": segments}
    with fileio.atomic_path(path, suffix=".seg.nrrd") as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)


def read_seg_nrrd(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[int, str], dict[int, tuple]]:
    """A single-layer Slicer segmentation: (voxels in file order, RAS affine, {label: name}, {label: colour})."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    names = {int(s["labelValue"]): s["name"] for s in segments}
    colors = {int(s["labelValue"]): tuple(float(c) for c in s["color"]) for s in segments}
    return (np.asarray(segmentation["voxels"]), _RAS_TO_LPS @ np.asarray(segmentation["ijkToLPS"], float), names,
            colors)


def write_itksnap_labels(path: str | os.PathLike, names: dict[int, str], colors: dict | None = None) -> None:
    """ITK-SNAP's label description file (Segmentation > Import Label Descriptions) for `names`."""
    lines = ["################################################",
             "# ITK-SnAP Label Description File (written by medseg-jax)",
             "# Columns: IDX -R- -G- -B- -A-- VIS MSH LABEL",
             "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    for value, color in label_colors(names, colors).items():
        r, g, b = (int(round(255 * c)) for c in color)
        name = names[value].replace('"', "'")
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{name}"')
    fileio.write_text(Path(path), "\n".join(lines) + "\n")
