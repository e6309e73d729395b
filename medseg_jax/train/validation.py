"""Validation during training: held-out cases segmented by the sliding window that `medseg predict` uses, scored by
Dice on the preprocessed grid; at the end, written back in their source files' geometry and scored there."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ml_collections
import numpy as np

from medseg_jax import fileio, runs
from medseg_jax.data.store import Store
from medseg_jax.infer.postprocess import logits_to_original, to_labels
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.io import formats, nifti
from medseg_jax.io.geometry import from_canonical
from medseg_jax.metrics.overlap import dice_per_class, nanmean
from medseg_jax.models.registry import output_channels


@dataclass
class ValCase:
    case_id: str
    image: np.ndarray  # (X, Y, Z, C) preprocessed
    label: np.ndarray  # (X, Y, Z) preprocessed


def load_val_cases(store: Store, case_ids: Sequence[str]) -> list[ValCase]:
    return [ValCase(case_id, *store.read_case(case_id)) for case_id in case_ids]


def evaluate_cases(forward_fn: Callable, params, cases: Sequence[ValCase], config: ml_collections.ConfigDict,
                   num_classes: int, on_logits: Callable | None = None, regions=None) -> dict:
    """Mean Dice per foreground class over `cases` (sliding window on the preprocessed grid); `on_logits(case,
    logits)` is called for each case when given."""
    patch = tuple(config.train.patch_size)

    def predict(windows):
        return forward_fn(params, windows)

    per_class: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    for case in cases:
        logits = sliding_window_inference(predict, case.image, patch, output_channels(num_classes, regions),
                                          overlap=config.infer.overlap, batch_size=config.infer.batch_size)
        if on_logits is not None:
            on_logits(case, logits)
        scores = dice_per_class(to_labels(logits, regions), case.label, range(1, num_classes))
        for c, value in scores.items():
            per_class[c].append(value)
    means = {c: nanmean(v) for c, v in per_class.items()}
    return {"val_dice": nanmean(means.values()), "val_dice_per_class": {str(c): v for c, v in means.items()}}


def export_validation(store: Store, run: runs.RunDir, case: ValCase, logits: np.ndarray, regions=None,
                      save_probabilities: bool = False) -> dict:
    """Writes a validation case's prediction in its source file's geometry (through the store's manifest) and scores
    it there against the source label when that file is still readable. `save_probabilities` also writes
    RUN/validation/CASE.npz: "probabilities" (I, J, K, classes) float16 in the source file's voxel order, as nnU-Net
    saves them: the out-of-fold probabilities that ensembles of trials average."""
    meta = store.cases[case.case_id]
    prediction = logits_to_original(logits, meta["crop_box"], meta["canonical_shape"], regions,
                                    with_probabilities=save_probabilities, plan=store.plan, spacing=meta["spacing"])
    if save_probabilities:
        prediction, probs = prediction
        with fileio.atomic_path(run.validation_dir / f"{case.case_id}.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, probabilities=from_canonical(probs, store.geometry(case.case_id)))
    nifti.write_label(run.validation_dir / f"{case.case_id}.nii.gz", prediction, store.geometry(case.case_id))
    label_path = store.source_path(meta["source"]["label"])
    if label_path is None or not label_path.is_file():
        return {}
    reference, _ = formats.read_label(label_path)
    return dice_per_class(prediction, reference, range(1, len(store.plan["labels"])))
