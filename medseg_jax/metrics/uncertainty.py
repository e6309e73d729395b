"""How sure a model is of one case: predictive entropy, mutual information and disagreement between test-time views
(mirrored inputs, ensemble members), structure volumes against the training set's, and how far a scan's intensities
lie from the training scans'. `medseg rank` (medseg_jax/rank.py) turns them into a ranking of what to check or
annotate first.

Entropies are normalised by log K (K classes), so 0 is certain and 1 is uniform. With views v = 1..V of the class
probabilities p_v and their mean p̄: the predictive entropy H(p̄) (all uncertainty), the expected entropy
mean_v H(p_v) (what each view is unsure of), and their difference, the mutual information (BALD: what the views
disagree on, the part more training could remove).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPSILON = 1e-7


def entropy(probabilities: np.ndarray, independent: bool = False) -> np.ndarray:
    """Normalised entropy of class probabilities (..., K) -> (...) in [0, 1]. `independent`: the K channels are
    separate yes/no probabilities (a region model's sigmoids): the mean of their binary entropies."""
    p = np.clip(np.asarray(probabilities, np.float32), EPSILON, 1.0)
    if independent:
        q = np.clip(1.0 - p, EPSILON, 1.0)
        return (-(p * np.log(p) + q * np.log(q)) / np.float32(np.log(2.0))).mean(-1).clip(0.0, 1.0)
    classes = p.shape[-1]
    return (-(p * np.log(p)).sum(-1) / np.float32(np.log(classes))).clip(0.0, 1.0)


class ViewStatistics:
    """Running statistics of a case's test-time views, one view at a time (a view's probabilities are full-size):
    their mean probabilities, mean entropy and label maps."""

    def __init__(self, independent: bool = False):
        self.independent = independent  # region models: independent sigmoid channels
        self.count = 0
        self.sum_probabilities: np.ndarray | None = None
        self.sum_entropy: np.ndarray | None = None
        self.labels: list[np.ndarray] = []

    def add(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        probabilities = np.asarray(probabilities, np.float32)
        if self.sum_probabilities is None:
            self.sum_probabilities = probabilities.copy()
            self.sum_entropy = entropy(probabilities, self.independent)
        else:
            self.sum_probabilities += probabilities
            self.sum_entropy += entropy(probabilities, self.independent)
        self.labels.append(np.asarray(labels))
        self.count += 1

    @property
    def mean_probabilities(self) -> np.ndarray:
        return self.sum_probabilities / np.float32(self.count)

    def maps(self) -> dict[str, np.ndarray]:
        """Voxel maps: "entropy" H(p̄), "mutual_information" H(p̄) - mean_v H(p_v)."""
        predictive = entropy(self.mean_probabilities, self.independent)
        return {"entropy": predictive,
                "mutual_information": np.maximum(predictive - self.sum_entropy / np.float32(self.count), 0.0)}


def region_of_interest(view_labels: Sequence[np.ndarray], background: int = 0) -> np.ndarray:
    """Voxels some view calls foreground: where uncertainty matters (the background far from any structure is
    certain and would dilute every mean)."""
    roi = np.zeros(view_labels[0].shape, bool)
    for labels in view_labels:
        roi |= labels != background
    return roi


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def disagreement(view_labels: Sequence[np.ndarray], consensus: np.ndarray, classes: Sequence[int]) -> float:
    """1 - the mean over classes (present in the consensus or any view) of the mean Dice of each view's mask of the
    class with the consensus's: 0 when every view agrees; NaN with a single view."""
    if len(view_labels) < 2:
        return float("nan")
    scores = []
    for c in classes:
        masks = [labels == c for labels in view_labels]
        reference = consensus == c
        if not reference.any() and not any(m.any() for m in masks):
            continue
        scores.append(np.mean([dice(m, reference) for m in masks]))
    return float(1.0 - np.mean(scores)) if scores else 0.0


def volume_z_scores(volumes_ml: dict[int, float], reference_ml: dict[int, Sequence[float]],
                    floor_ml: float) -> dict[int, float]:
    """Per class, how many standard deviations the log-volume lies from the training cases' mean log-volume (a
    spread of at least log(1.25), so that a class of nearly constant size in a few cases does not make every
    small difference extreme). `floor_ml` (one voxel) keeps a missing structure finite."""
    scores = {}
    for c, volume in volumes_ml.items():
        reference = np.log(np.maximum(np.asarray(reference_ml.get(c, []), np.float64), floor_ml))
        if reference.size == 0:
            continue
        spread = max(float(reference.std(ddof=1)) if reference.size > 1 else 0.0, float(np.log(1.25)))
        scores[c] = float((np.log(max(volume, floor_ml)) - reference.mean()) / spread)
    return scores


INTENSITY_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def intensity_profile(image: np.ndarray, max_voxels: int = 200_000, seed: int = 0) -> np.ndarray:
    """Percentiles (INTENSITY_PERCENTILES) of a preprocessed scan's voxels per channel, (C, P); a fixed random subset
    of at most `max_voxels` voxels keeps it cheap and deterministic."""
    values = np.asarray(image, np.float32).reshape(-1, image.shape[-1])
    if len(values) > max_voxels:
        values = values[np.random.default_rng(seed).choice(len(values), max_voxels, replace=False)]
    return np.percentile(values, INTENSITY_PERCENTILES, axis=0).T.astype(np.float64)


def intensity_ood_score(profile: np.ndarray, reference_profiles: Sequence[np.ndarray]) -> float:
    """How unlike the training scans a scan's intensities are: the mean over channels and percentiles of the
    absolute z-score of its percentile against the training scans' (a spread of at least 0.05 of the normalised
    scale, so that a percentile every training scan shares, such as clipped air, does not turn tiny differences into
    huge scores). Typical training scans score about 1 or less."""
    reference = np.stack([np.asarray(r, np.float64) for r in reference_profiles])
    spread = np.maximum(reference.std(0, ddof=1) if len(reference) > 1 else 0.0, 0.05)
    return float(np.mean(np.abs(np.asarray(profile) - reference.mean(0)) / spread))


def percentile_ranks(values: Sequence[float]) -> np.ndarray:
    """Each value's rank among `values` scaled to [0, 1] (ties share their mean rank; NaN stays NaN)."""
    values = np.asarray(values, np.float64)
    ranks = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.sum() == 1:
        ranks[finite] = 1.0
    elif finite.any():
        from scipy.stats import rankdata

        ranks[finite] = (rankdata(values[finite]) - 1) / (finite.sum() - 1)
    return ranks
