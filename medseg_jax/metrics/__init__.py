"""Segmentation metrics: overlap (Dice, IoU, precision, recall, volume differences) and surface distances (HD, HD95,
ASSD, NSD in mm) per class, in the conventions of DeepMind's surface-distance ("surfel") or MONAI ("voxel").

`evaluate_case(pred, ref, spacing, labels, tolerance_mm=1.0, surface="surfel")` is the entry point; see
`medseg_jax.metrics.surface` for the conventions and the values returned for empty masks.
"""

from medseg_jax.metrics.overlap import dice_per_class, nanmean, overlap_from_counts, overlap_metrics
from medseg_jax.metrics.surface import SURFACES, evaluate_case, surface_distances, surface_metrics

__all__ = ["SURFACES", "dice_per_class", "evaluate_case", "nanmean", "overlap_from_counts", "overlap_metrics",
           "surface_distances", "surface_metrics"]
