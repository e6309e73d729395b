'''Surface-distance metrics in mm: Hausdorff (max), HD95, ASSD and normalised surface Dice (NSD), in two conventions.

## Surface metrics: conventions and empty masks

`medseg_jax.metrics.evaluate_case(pred, ref, spacing, labels, tolerance_mm=1.0, surface="surfel")` scores every
foreground label of a 2D or 3D case in physical units (mm from the voxel spacing). The surface metrics come in two
conventions that give different numbers on the same masks, so every report names the one it used:

* `surface="surfel"` (default) is DeepMind's [surface-distance](https://github.com/google-deepmind/surface-distance):
  the surface is made of surface elements (marching-cubes triangles, or contour segments in 2D) found from the 2x2(x2)
  neighbourhood of each voxel corner, each weighted by its area in mm² (length in mm in 2D). `hd` =
  `compute_robust_hausdorff(d, 100)` (the largest distance), `hd95` = `compute_robust_hausdorff(d, 95)` (the 95th
  percentile of the area-weighted distance distribution, the larger of the two directions), `assd` = the mean of the
  two directed area-weighted averages returned by `compute_average_surface_distance(d)`, `nsd` =
  `compute_surface_dice_at_tolerance(d, tolerance_mm)`.
* `surface="voxel"` is [MONAI](https://github.com/Project-MONAI/MONAI) 1.6 with its defaults: the surface is the set of
  mask voxels removed by one binary erosion (`get_mask_edges`, `use_subvoxels=False`), each voxel counting once.
  `hd` = `compute_hausdorff_distance(...)`, `hd95` = `compute_hausdorff_distance(..., percentile=95)` (linearly
  interpolated 95th percentile per direction, the larger one), `assd` =
  `compute_average_surface_distance(..., symmetric=True)` (the mean over the boundary voxels of both masks together),
  `nsd` = `compute_surface_dice(..., class_thresholds=[tolerance_mm])`, all with `spacing=`; values are rounded to
  float32 as MONAI returns them.

In the issue's example (one pair of masks, spacing 1 x 0.8 x 2.5 mm) surface-distance, i.e. the surfel convention,
gives HD95 3.40 mm and NSD@1mm 0.696 while MONAI, i.e. the voxel convention, gives 4.39 mm and 0.415: the surfaces lie
at different places (voxel corners vs boundary voxel centres) and are weighted differently (by area vs one per
voxel), which matters most with anisotropic spacing.

Empty masks (per class; the same in both conventions):

| metric                    | reference empty, prediction not | prediction empty, reference not | both empty |
|---------------------------|---------------------------------|---------------------------------|------------|
| `dice`, `iou`             | 0                               | 0                               | NaN        |
| `precision`               | 0                               | NaN                             | NaN        |
| `recall`                  | NaN                             | 0                               | NaN        |
| `hd`, `hd95`, `assd` (mm) | inf                             | inf                             | NaN        |
| `nsd`                     | 0                               | 0                               | NaN        |

NaN means undefined: the class is in neither mask (or, for precision/recall, the denominator is empty). inf means the
class was missed or hallucinated: there is no surface to measure a distance to. Means over cases should skip both and
report how many cases were NaN and how many inf (`nsd` and `dice` = 0 already penalise misses in their means).
The references differ only where they are silent or odd: with both masks empty surface-distance returns `hd`/`hd95`
inf (and crashes on NumPy 2 through `np.Inf`), and its ASSD combination gives NaN when one mask is empty; MONAI
returns NaN for `hd95` when one mask is empty (`torch.quantile` of infinities). We return the table above.

Speed: each class is cropped to the bounding box of prediction ∪ reference (`scipy.ndimage.find_objects`, one pass per
label map), so no computation touches the whole volume after that pass. The distance from each surface point of one
mask to the other surface is found with a k-d tree over the other surface's points (scipy `cKDTree`, as MONAI does on
CPU) rather than a dense distance transform; in the surfel convention the distance to the nearest point is then
recomputed exactly as `scipy.ndimage.distance_transform_edt(..., sampling=spacing)` does, so both conventions
reproduce their reference's distances bit for bit (up to ties between equally near points).
'''

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg_jax.errors import MedsegError
from medseg_jax.metrics.overlap import overlap_from_counts

SURFACES = ("surfel", "voxel")
SURFACE_METRICS = ("hd", "hd95", "assd", "nsd")
NAN, INF = float("nan"), float("inf")

# Normals of the marching-cubes triangles for each of the 256 codes of a 2x2x2 neighbourhood, times 8 ("+1-2+0" is
# the vector (1/8, -2/8, 0)); their lengths are the triangle areas at unit spacing. From DeepMind's surface-distance
# (lookup_tables._NEIGHBOUR_CODE_TO_NORMALS, Copyright 2018 Google Inc., Apache License 2.0).
_NORMALS_X8 = (
    '+0+0+0', '+1+1+1', '-1-1+1', '-2-2+0 +2+2-0', '+1-1+1', '-2-0-2 +2+0+2', '+1-1+1 -1-1+1',
    '+4+0-0 +2+2+2 +1+1+1', '-1+1+1', '+1+1+1 -1+1+1', '-2+0+2 -2+0+2', '+4+0+0 -2-2+2 -1-1+1', '+2-2+0 +2-2+0',
    '+4+0+0 +2-2+2 -1+1-1', '-4+0+0 -2+2+2 -1+1+1', '+4+0+0 +4+0+0', '+1-1-1', '+0-2-2 +0+2+2', '-1-1+1 +1-1-1',
    '+0-4+0 +2+2+2 +1+1+1', '+1-1+1 +1-1-1', '+0+0-4 +2+2+2 -1-1-1', '-1-1+1 +1-1+1 +1-1-1',
    '-1-1-1 -2-2-2 +2+2+2 +1+1+1', '-1+1+1 +1-1-1', '+0-2-2 +0+2+2 -1+1+1', '-2+0+2 -2+0+2 +1-1-1',
    '+1+1+1 +3+3+3 +0-2+2 -2+0+2', '+1-1-1 +2-2+0 +2-2+0', '+3+3+3 +0+2-2 -1-1-1 -2+2+0',
    '-4+0+0 -1-1-1 -2-2-2 +1+1+1', '-4+0+0 -1-1-1 -2-2-2', '+1-1+1', '+1+1+1 +1-1+1', '+0-2+2 +0+2-2',
    '+0-4+0 +1+1-1 +2+2-2', '+1-1+1 +1-1+1', '+1-1+1 -2-0-2 +2+0+2', '+0-2+2 +0+2-2 +1-1+1',
    '-3-3+3 -0+2+2 +1+1-1 -2-0-2', '-1+1+1 +1-1+1', '+1+1+1 +1-1+1 -1+1+1', '-0+0+4 -2-2+2 -1-1+1',
    '+2+2-2 +2+2-2 +1+1-1 -1-1+1', '+1-1+1 +2-2+0 +2-2+0', '+4+0+0 +2-2+2 -1+1-1 +1-1+1',
    '+0+2-2 +3-3-3 -1+1+1 +2+2+0', '-4+0+0 -2-2+2 -1-1+1', '+2-2+0 -2+2+0', '+0+4+0 -2+2+2 +1-1-1',
    '+0+4+0 +1-1+1 -2+2-2', '+0+4+0 +0-4+0', '+2-2+0 -2+2+0 +1-1+1', '-3-3-3 -2+0+2 -1-1-1 -2+2+0',
    '+1+1+1 +0-4+0 -2-2-2 -1-1-1', '+0-4+0 -2-2-2 -1-1-1', '-1+1+1 +2-2+0 -2+2+0', '+0+4+0 +2+2-2 -1-1+1 -1-1+1',
    '-3+3-3 -2-2+0 -1+1-1 -2+0+2', '+0+4+0 +2+2-2 -1-1+1', '+2-2+0 -2+2+0 +2-2+0 +2-2+0', '-2-2+0 -2-2+0 -1-1+1',
    '+1+1+1 -2-2+0 -2-2+0', '-2-2+0 -2-2+0', '-1-1+1', '+1+1+1 -1-1+1', '-1-1+1 -1-1+1', '-1-1+1 -2-2+0 +2+2-0',
    '+0-2+2 +0-2+2', '+0+0+4 +2-2+2 +1-1+1', '+0-2+2 +0-2+2 -1-1+1', '+3-3+3 +0-2-2 -1+1-1 +2+2+0',
    '-1-1+1 -1+1+1', '+1+1+1 -1-1+1 -1+1+1', '-1-1+1 -2+0+2 -2+0+2', '+4+0+0 -2-2+2 -1-1+1 -1-1+1',
    '-0+4+0 -2+2-2 +1-1+1', '-2+2-2 -2+2-2 -1+1-1 -1+1-1', '-2+0-2 +3-3-3 +0+2-2 -1+1+1', '+4+0+0 -2+2-2 +1-1+1',
    '-2+0+2 +2+0-2', '-0+0+4 -2+2+2 -1+1+1', '-1-1+1 -2+0+2 +2+0-2', '-2-0-2 -3+3+3 -2-2+0 -1+1+1',
    '+0+0-4 +2+2-2 -1-1+1', '-0+0+4 +0+0+4', '+1+1+1 +1+1+1 +2+2+2 +0+0+4', '+1+1+1 +2+2+2 +0+0+4',
    '-2+0+2 +2+0-2 -1+1+1', '-0+0+4 +2-2+2 +1-1+1 +1-1+1', '-2+0+2 -2+0+2 -2+0+2 +2+0-2', '+1-1+1 +2+0+2 +2+0+2',
    '+2+0+2 -3-3+3 -2+2+0 -1-1+1', '-0+0+4 +2-2+2 +1-1+1', '+1+1+1 +2+0+2 +2+0+2', '+2+0+2 +2+0+2',
    '-1-1+1 +1-1+1', '+1+1+1 -1-1+1 +1-1+1', '-1-1+1 +0-2+2 +0+2-2', '+0-4+0 +1+1-1 +2+2-2 -1-1+1',
    '+0-2+2 +0-2+2 +1-1+1', '+0+0+4 +2-2+2 +1-1+1 +1-1+1', '+0-2+2 +0-2+2 +0-2+2 +0+2-2', '+0+2+2 +0+2+2 +1-1-1',
    '-1+1+1 +1-1+1 -1-1+1', '-1+1+1 +1-1+1 -1-1+1 +1+1+1', '-0+0+4 -2-2+2 -1-1+1 -1-1+1', '+1+1+1 +1-1+1 +1-1-1',
    '-0+4+0 -2+2-2 +1-1+1 +1-1+1', '+1+1+1 -1-1+1 +1-1-1', '+0-2-2 +0+2+2 +1+1+1', '+1+1+1 +1-1-1',
    '+4+0-0 +2-2-2 +1-1-1', '-2+2+2 -1+1+1 -2+2+2 +1-1-1', '+3-3+3 +0+2+2 -1+1-1 -2+0+2', '+0-4+0 -2+2+2 -1+1+1',
    '-3-3+3 +2-2+0 +0+2+2 -1-1+1', '-1+1+1 -2+2+2 +0+0+4', '+1+1+1 +0+2+2 +0+2+2', '+0+2+2 +0+2+2',
    '+4+0-0 +2+2+2 +1+1+1 +1+1+1', '+1-1+1 -1-1+1 +1+1+1', '-2-0-2 +2+0+2 +1+1+1', '+1+1+1 +1-1+1',
    '-2-2+0 +2+2-0 +1+1+1', '+1+1+1 -1-1+1', '+1+1+1 +1+1+1', '+1+1+1', '+1+1+1', '+1+1+1 +1+1+1', '+1+1+1 -1-1+1',
    '-2-2+0 +2+2-0 +1+1+1', '+1+1+1 +1-1+1', '-2-0-2 +2+0+2 +1+1+1', '+1-1+1 -1-1+1 +1+1+1',
    '+4+0-0 +2+2+2 +1+1+1 +1+1+1', '+0+2+2 +0+2+2', '+1+1+1 +0+2+2 +0+2+2', '-1+1+1 -2+2+2 +0+0+4',
    '-3-3+3 +2-2+0 +0+2+2 -1-1+1', '+0-4+0 -2+2+2 -1+1+1', '+3-3+3 +0+2+2 -1+1-1 -2+0+2',
    '-2+2+2 -1+1+1 -2+2+2 +1-1-1', '+4+0-0 +2-2-2 +1-1-1', '+1+1+1 +1-1-1', '+0-2-2 +0+2+2 +1+1+1',
    '+1+1+1 -1-1+1 +1-1-1', '-0+4+0 -2+2-2 +1-1+1 +1-1+1', '+1+1+1 +1-1+1 +1-1-1', '-0+0+4 -2-2+2 -1-1+1 -1-1+1',
    '-1+1+1 +1-1+1 -1-1+1 +1+1+1', '-1+1+1 +1-1+1 -1-1+1', '+0+2+2 +0+2+2 +1-1-1', '+0-2-2 +0+2+2 +0+2+2 +0+2+2',
    '+0+0+4 +2-2+2 +1-1+1 +1-1+1', '+0-2+2 +0-2+2 +1-1+1', '+0-4+0 +1+1-1 +2+2-2 -1-1+1', '-1-1+1 +0-2+2 +0+2-2',
    '+1+1+1 -1-1+1 +1-1+1', '-1-1+1 +1-1+1', '+2+0+2 +2+0+2', '+1+1+1 +2+0+2 +2+0+2', '-0+0+4 +2-2+2 +1-1+1',
    '+2+0+2 -3-3+3 -2+2+0 -1-1+1', '+1-1+1 +2+0+2 +2+0+2', '-2-0-2 +2+0+2 +2+0+2 +2+0+2',
    '-0+0+4 +2-2+2 +1-1+1 +1-1+1', '-2+0+2 +2+0-2 -1+1+1', '+1+1+1 +2+2+2 +0+0+4', '+1+1+1 +1+1+1 +2+2+2 +0+0+4',
    '-0+0+4 +0+0+4', '+0+0-4 +2+2-2 -1-1+1', '-2-0-2 -3+3+3 -2-2+0 -1+1+1', '-1-1+1 -2+0+2 +2+0-2',
    '-0+0+4 -2+2+2 -1+1+1', '-2+0+2 +2+0-2', '+4+0+0 -2+2-2 +1-1+1', '-2+0-2 +3-3-3 +0+2-2 -1+1+1',
    '-2+2-2 -2+2-2 -1+1-1 -1+1-1', '-0+4+0 -2+2-2 +1-1+1', '+4+0+0 -2-2+2 -1-1+1 -1-1+1', '-1-1+1 -2+0+2 -2+0+2',
    '+1+1+1 -1-1+1 -1+1+1', '-1-1+1 -1+1+1', '+3-3+3 +0-2-2 -1+1-1 +2+2+0', '+0-2+2 +0-2+2 -1-1+1',
    '+0+0+4 +2-2+2 +1-1+1', '+0-2+2 +0-2+2', '-1-1+1 -2-2+0 +2+2-0', '-1-1+1 -1-1+1', '+1+1+1 -1-1+1', '-1-1+1',
    '-2-2+0 -2-2+0', '+1+1+1 -2-2+0 -2-2+0', '-2-2+0 -2-2+0 -1-1+1', '-2-2+0 -2-2+0 -2-2+0 +2+2-0',
    '+0+4+0 +2+2-2 -1-1+1', '-3+3-3 -2-2+0 -1+1-1 -2+0+2', '+0+4+0 +2+2-2 -1-1+1 -1-1+1', '-1+1+1 +2-2+0 -2+2+0',
    '+0-4+0 -2-2-2 -1-1-1', '+1+1+1 +0-4+0 -2-2-2 -1-1-1', '-3-3-3 -2+0+2 -1-1-1 -2+2+0', '+2-2+0 -2+2+0 +1-1+1',
    '+0+4+0 +0-4+0', '+0+4+0 +1-1+1 -2+2-2', '+0+4+0 -2+2+2 +1-1-1', '+2-2+0 -2+2+0', '-4+0+0 -2-2+2 -1-1+1',
    '+0+2-2 +3-3-3 -1+1+1 +2+2+0', '+4+0+0 +2-2+2 -1+1-1 +1-1+1', '+1-1+1 +2-2+0 +2-2+0',
    '+2+2-2 +2+2-2 +1+1-1 -1-1+1', '-0+0+4 -2-2+2 -1-1+1', '+1+1+1 +1-1+1 -1+1+1', '-1+1+1 +1-1+1',
    '-3-3+3 -0+2+2 +1+1-1 -2-0-2', '+0-2+2 +0+2-2 +1-1+1', '+1-1+1 -2-0-2 +2+0+2', '+1-1+1 +1-1+1',
    '+0-4+0 +1+1-1 +2+2-2', '+0-2+2 +0+2-2', '+1+1+1 +1-1+1', '+1-1+1', '-4+0+0 -1-1-1 -2-2-2',
    '-4+0+0 -1-1-1 -2-2-2 +1+1+1', '+3+3+3 +0+2-2 -1-1-1 -2+2+0', '+1-1-1 +2-2+0 +2-2+0',
    '+1+1+1 +3+3+3 +0-2+2 -2+0+2', '-2+0+2 -2+0+2 +1-1-1', '+0-2-2 +0+2+2 -1+1+1', '-1+1+1 +1-1-1',
    '-1-1-1 -2-2-2 +2+2+2 +1+1+1', '-1-1+1 +1-1+1 +1-1-1', '+0+0-4 +2+2+2 -1-1-1', '+1-1+1 +1-1-1',
    '+0-4+0 +2+2+2 +1+1+1', '-1-1+1 +1-1-1', '+0-2-2 +0+2+2', '+1-1-1', '+4+0+0 +4+0+0', '-4+0+0 -2+2+2 -1+1+1',
    '+4+0+0 +2-2+2 -1+1-1', '+2-2+0 +2-2+0', '+4+0+0 -2-2+2 -1-1+1', '-2+0+2 -2+0+2', '+1+1+1 -1+1+1', '-1+1+1',
    '+4+0-0 +2+2+2 +1+1+1', '+1-1+1 -1-1+1', '-2-0-2 +2+0+2', '+1-1+1', '-2-2+0 +2+2-0', '-1-1+1', '+1+1+1',
    '+0+0+0',
)

# Weights of the 2x2(x2) neighbourhood in the neighbour code (surface-distance's ENCODE_NEIGHBOURHOOD_*_KERNEL): the
# code of the voxel corner i is sum_k kernel[k] * mask[i - 1 + k].
_KERNELS = {2: np.array([[8, 4], [2, 1]], np.uint8), 3: np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], np.uint8)}


@functools.lru_cache(maxsize=32)
def surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Area in mm² (3D) or length in mm (2D) of the surface elements of each neighbour code, as surface-distance's
    `create_table_neighbour_code_to_surface_area` / `..._contour_length` compute it (same operations, same floats)."""
    if len(spacing) == 3:
        table = np.zeros([256])
        for code, text in enumerate(_NORMALS_X8):
            sum_area = 0
            for normal in np.array([[int(token[i:i + 2]) / 8 for i in (0, 2, 4)] for token in text.split()]):
                n = np.zeros([3])
                n[0] = normal[0] * spacing[1] * spacing[2]
                n[1] = normal[1] * spacing[0] * spacing[2]
                n[2] = normal[2] * spacing[0] * spacing[1]
                sum_area += np.linalg.norm(n)
            table[code] = sum_area
    else:
        vertical, horizontal = spacing
        diag = 0.5 * math.sqrt(spacing[0] ** 2 + spacing[1] ** 2)
        table = np.zeros([16])
        table[[0b0001, 0b0010, 0b0100, 0b0111, 0b1000, 0b1011, 0b1101, 0b1110]] = diag
        table[[0b0011, 0b1100]] = horizontal
        table[[0b0101, 0b1010]] = vertical
        table[[0b0110, 0b1001]] = 2 * diag
    table.setflags(write=False)
    return table


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code of every voxel corner of `mask` (shape + 1 per axis, corner i between voxels i-1 and i), equal to
    surface-distance's `correlate(crop, kernel, mode="constant")` on its one-voxel zero-padded crop."""
    shape = tuple(n + 1 for n in mask.shape)
    padded = np.pad(mask.astype(bool, copy=False), 1).view(np.uint8)
    codes, term = np.zeros(shape, np.uint8), np.empty(shape, np.uint8)
    kernel = _KERNELS[mask.ndim]
    for offset in itertools.product((0, 1), repeat=mask.ndim):
        np.multiply(padded[tuple(slice(o, o + n) for o, n in zip(offset, shape))], kernel[offset], out=term)
        codes += term
    return codes


def _tree(coords: np.ndarray) -> cKDTree:
    return cKDTree(coords, leafsize=32, balanced_tree=False, compact_nodes=False)


def _surfel_directed(src: np.ndarray, dst: np.ndarray, dst_border: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance (mm) from each corner `src` (N x d indices) to the nearest corner of `dst`, with the operations of
    `distance_transform_edt(~dst_border, sampling=spacing)[src]`: sqrt of the sum over axes of ((q - p) * s)²."""
    out = np.zeros(len(src))
    todo = np.flatnonzero(~dst_border[tuple(src.T)])  # corners on both surfaces are at distance 0
    if todo.size:
        _, nearest = _tree(dst * scale).query(src[todo] * scale, k=1)
        diff = (dst[nearest] - src[todo]).astype(np.float64) * scale
        diff *= diff
        total = diff[:, 0] + diff[:, 1]
        for axis in range(2, diff.shape[1]):
            total += diff[:, axis]
        out[todo] = np.sqrt(total)
    return out


def _sort_by_distance(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """surface-distance's `sorted(zip(distances, areas))`: by distance, then area."""
    order = np.lexsort((areas, distances))
    return distances[order], areas[order]


def _surfel_distances(pm: np.ndarray, rm: np.ndarray, spacing: tuple[float, ...]) -> dict:
    table = surfel_area_table(spacing)
    full = len(table) - 1
    scale = np.asarray(spacing, np.float64)
    codes_p, codes_r = _neighbour_codes(pm), _neighbour_codes(rm)
    border_p = (codes_p != 0) & (codes_p != full)
    border_r = (codes_r != 0) & (codes_r != full)
    corners_p, corners_r = np.argwhere(border_p), np.argwhere(border_r)
    d_rp, a_r = _sort_by_distance(_surfel_directed(corners_r, corners_p, border_p, scale), table[codes_r[border_r]])
    d_pr, a_p = _sort_by_distance(_surfel_directed(corners_p, corners_r, border_r, scale), table[codes_p[border_p]])
    return {"distances_ref_to_pred": d_rp, "distances_pred_to_ref": d_pr, "areas_ref": a_r, "areas_pred": a_p}


def _voxel_distances(pm: np.ndarray, rm: np.ndarray, spacing: tuple[float, ...]) -> dict:
    """MONAI's `get_edge_surface_distance(..., symmetric=True)` on CPU: boundary voxels by one binary erosion, k-d tree
    distances between their coordinates in MONAI's crop (union bounding box with a one-voxel margin), as float32."""
    scale = np.asarray(spacing, np.float64)
    edges_p = pm & ~ndimage.binary_erosion(pm)
    edges_r = rm & ~ndimage.binary_erosion(rm)
    voxels_p, voxels_r = np.argwhere(edges_p), np.argwhere(edges_r)

    def directed(src, dst, dst_edges):
        out = np.zeros(len(src))
        todo = np.flatnonzero(~dst_edges[tuple(src.T)])  # voxels on both boundaries are at distance 0
        if todo.size:
            out[todo] = _tree((dst + 1).astype(np.float64) * scale).query((src[todo] + 1).astype(np.float64) * scale,
                                                                          k=1)[0]
        return out.astype(np.float32)

    return {"distances_ref_to_pred": directed(voxels_r, voxels_p, edges_p),
            "distances_pred_to_ref": directed(voxels_p, voxels_r, edges_r)}


def _robust_hausdorff(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """One direction of surface-distance's `compute_robust_hausdorff` (distances sorted as it sorts them)."""
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = np.searchsorted(cumulative, percent / 100.0)
    return distances[min(index, len(distances) - 1)]


def _torch_quantile(values: np.ndarray, q: float) -> np.float32:
    """`torch.quantile(values, q)` (linear interpolation) of a float32 array, with torch's float32 rank and lerp."""
    rank = np.float32(np.float32(q) * np.float32(len(values) - 1))
    below, above = int(rank), int(math.ceil(rank))
    weight = np.float32(rank - np.float32(below))
    part = np.partition(values, [below, above])
    low, high = part[below], part[above]
    diff = float(np.float32(high - low))
    if weight < 0.5:
        return np.float32(float(weight) * diff + float(low))
    return np.float32((float(weight) - 1.0) * diff + float(high))


def _surfel_scores(d: dict, tolerance: float) -> dict:
    d_rp, d_pr, a_r, a_p = d["distances_ref_to_pred"], d["distances_pred_to_ref"], d["areas_ref"], d["areas_pred"]
    assd = (np.sum(d_rp * a_r) / np.sum(a_r) + np.sum(d_pr * a_p) / np.sum(a_p)) / 2
    nsd = (np.sum(a_r[d_rp <= tolerance]) + np.sum(a_p[d_pr <= tolerance])) / (np.sum(a_r) + np.sum(a_p))
    return {"hd": float(max(d_rp[-1], d_pr[-1])),
            "hd95": float(max(_robust_hausdorff(d_rp, a_r, 95), _robust_hausdorff(d_pr, a_p, 95))),
            "assd": float(assd), "nsd": float(nsd)}


def _voxel_scores(d: dict, tolerance: float) -> dict:
    d_rp, d_pr = d["distances_ref_to_pred"], d["distances_pred_to_ref"]
    threshold = np.float32(tolerance)  # torch compares a float32 tensor with a Python float in float32
    correct = np.count_nonzero(d_pr <= threshold) + np.count_nonzero(d_rp <= threshold)
    total = len(d_pr) + len(d_rp)
    mean = (np.sum(d_pr, dtype=np.float64) + np.sum(d_rp, dtype=np.float64)) / total
    return {"hd": float(max(d_pr.max(), d_rp.max())),
            "hd95": float(max(_torch_quantile(d_pr, 0.95), _torch_quantile(d_rp, 0.95))),
            "assd": float(np.float32(mean)), "nsd": float(np.float32(correct / total))}


def _empty_scores(pred_empty: bool, ref_empty: bool) -> dict | None:
    if pred_empty and ref_empty:
        return {"hd": NAN, "hd95": NAN, "assd": NAN, "nsd": NAN}
    if pred_empty or ref_empty:
        return {"hd": INF, "hd95": INF, "assd": INF, "nsd": 0.0}
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def _check_surface(surface) -> str:
    if surface not in SURFACES:
        raise MedsegError(f"surface must be 'surfel' (surface-distance) or 'voxel' (MONAI), not {surface!r}")
    return surface


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise MedsegError(f"spacing must be {ndim} numbers in mm (one per axis), got {spacing!r}") from None
    if len(values) != ndim or np.ndim(spacing) != 1:
        raise MedsegError(f"spacing {spacing!r} does not fit {ndim}D masks: give {ndim} values in mm, one per axis")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise MedsegError(f"spacing must be finite and > 0 mm, got {values}")
    return values


def _check_tolerance(tolerance_mm) -> float:
    try:
        tolerance = float(tolerance_mm)
    except (TypeError, ValueError):
        tolerance = NAN
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise MedsegError(f"tolerance_mm must be a finite number >= 0 (mm), got {tolerance_mm!r}")
    return tolerance


def _check_labels(labels) -> list[int]:
    if isinstance(labels, (int, np.integer)):
        labels = [labels]
    out = []
    for label in labels:
        try:
            value = operator.index(label)
        except TypeError:
            raise MedsegError(f"labels must be integers, got {label!r}") from None
        if value < 1:
            raise MedsegError(f"labels must be foreground labels >= 1, got {value} (0 is the background)")
        out.append(int(value))
    return list(dict.fromkeys(out))


def _check_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise MedsegError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise MedsegError(f"masks must be 2D or 3D, got shape {pred.shape}")
    for name, array in (("prediction", pred), ("reference", ref)):
        if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)) or np.iscomplexobj(array):
            raise MedsegError(f"{name} must be a label map of integers, got dtype {array.dtype}")
    return pred, ref


def _boxes(labelmap: np.ndarray, max_label: int) -> list:
    """Bounding box (tuple of slices, or None) of each label 1..max_label, from one pass over the label map."""
    if labelmap.dtype == bool:
        labelmap = labelmap.view(np.uint8)
    elif not np.issubdtype(labelmap.dtype, np.integer):
        rounded = np.rint(labelmap)
        if not np.array_equal(rounded, labelmap):
            raise MedsegError("label maps must hold integer labels; got non-integer values")
        labelmap = rounded.astype(np.int64)
    return ndimage.find_objects(labelmap, max_label=max_label)


def _union(a, b):
    if a is None or b is None:
        return b if a is None else a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def evaluate_case(pred, ref, spacing: Sequence[float], labels: Iterable[int], tolerance_mm: float = 1.0,
                  surface: str = "surfel") -> dict[int, dict]:
    """Scores every label of `labels` between a predicted and a reference label map of one 2D or 3D case.

    Args:
        pred, ref: label maps of one shape (integers; bool masks are label 1).
        spacing: voxel size in mm, one value per axis, in the arrays' axis order.
        labels: foreground labels (integers >= 1) to score; a label in neither map gets the "both empty" values.
        tolerance_mm: tolerance of the normalised surface Dice, in mm.
        surface: "surfel" (DeepMind surface-distance) or "voxel" (MONAI defaults); see the module docstring.

    Returns:
        {label: {"dice", "iou", "precision", "recall", "volume_difference_mm3" (signed, pred - ref, mm³),
        "relative_volume_difference" ((pred - ref) / ref), "pred_volume_mm3", "ref_volume_mm3", "hd", "hd95", "assd"
        (mm), "nsd", "ref_voxels", "pred_voxels"}}: metrics as Python floats (NaN undefined, inf for surface distances
        with exactly one mask empty, as tabled in the module docstrings), voxel counts as Python ints.

    Raises:
        MedsegError: shapes differ, the maps are not 2D/3D, spacing does not have one positive value per axis, unknown
            surface, bad tolerance or labels.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    surface = _check_surface(surface)
    tolerance = _check_tolerance(tolerance_mm)
    labels = _check_labels(labels)
    if not labels:
        return {}
    pred_boxes, ref_boxes = _boxes(pred, max(labels)), _boxes(ref, max(labels))
    voxel_volume = math.prod(spacing)
    results = {}
    for label in labels:
        box = _union(pred_boxes[label - 1], ref_boxes[label - 1])
        if box is None:
            pm = rm = np.zeros((0,) * pred.ndim, bool)
        else:
            pm, rm = pred[box] == label, ref[box] == label
        n_pred, n_ref = int(np.count_nonzero(pm)), int(np.count_nonzero(rm))
        scores = overlap_from_counts(int(np.count_nonzero(pm & rm)), n_pred, n_ref, voxel_volume)
        scores.update(_surface_scores(pm, rm, spacing, tolerance, surface, n_pred == 0, n_ref == 0))
        scores.update(ref_voxels=n_ref, pred_voxels=n_pred)
        results[label] = scores
    return results


def _surface_scores(pm, rm, spacing, tolerance, surface, pred_empty, ref_empty) -> dict:
    empty = _empty_scores(pred_empty, ref_empty)
    if empty is not None:
        return empty
    if surface == "surfel":
        return _surfel_scores(_surfel_distances(pm, rm, spacing), tolerance)
    return _voxel_scores(_voxel_distances(pm, rm, spacing), tolerance)


def _cropped_masks(pred_mask, ref_mask) -> tuple[np.ndarray, np.ndarray]:
    pred_mask, ref_mask = _check_pair(np.asarray(pred_mask, bool), np.asarray(ref_mask, bool))
    box = _union(_boxes(pred_mask, 1)[0], _boxes(ref_mask, 1)[0])
    if box is None:
        return np.zeros((0,) * pred_mask.ndim, bool), np.zeros((0,) * pred_mask.ndim, bool)
    return pred_mask[box], ref_mask[box]


def surface_metrics(pred_mask, ref_mask, spacing: Sequence[float], tolerance_mm: float = 1.0,
                    surface: str = "surfel") -> dict[str, float]:
    """{"hd", "hd95", "assd", "nsd"} of two binary masks (see the module docstring for conventions and empty masks)."""
    pm, rm = _cropped_masks(pred_mask, ref_mask)
    spacing, surface = _check_spacing(spacing, pm.ndim), _check_surface(surface)
    return _surface_scores(pm, rm, spacing, _check_tolerance(tolerance_mm), surface, not pm.any(), not rm.any())


def surface_distances(pred_mask, ref_mask, spacing: Sequence[float], surface: str = "surfel") -> dict[str, np.ndarray]:
    """The directed distances (mm) behind the surface metrics of two binary masks.

    Returns {"distances_ref_to_pred", "distances_pred_to_ref"} and, for `surface="surfel"`, {"areas_ref",
    "areas_pred"}: as surface-distance's `compute_surface_distances` (distances float64, sorted by distance then area,
    empty when a mask is empty, and here also empty instead of inf when the other mask is empty). For "voxel" the
    distances are float32 in the C order of the boundary voxels, as MONAI's `get_edge_surface_distance`.
    """
    pm, rm = _cropped_masks(pred_mask, ref_mask)
    spacing, surface = _check_spacing(spacing, pm.ndim), _check_surface(surface)
    if not (pm.any() and rm.any()):
        empty = {"distances_ref_to_pred": np.zeros(0), "distances_pred_to_ref": np.zeros(0)}
        return empty if surface == "voxel" else {**empty, "areas_ref": np.zeros(0), "areas_pred": np.zeros(0)}
    return _surfel_distances(pm, rm, spacing) if surface == "surfel" else _voxel_distances(pm, rm, spacing)
