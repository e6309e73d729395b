"""`medseg results DIR --find-best`: nnU-Net's find_best_configuration for a sweep.

From the out-of-fold class probabilities (RUN/validation/CASE.npz) of every trial that finished all its folds:
1. each single trial and each ensemble of up to `max_members` trials (probabilities averaged) is scored by the mean
   over cases of the foreground-mean Dice on the scans' own grids; the best wins (ties: fewer members);
2. on the winner's out-of-fold labels, postprocessing is chosen step by step and kept only where it raises the
   cross-validation Dice: the largest connected component of the foreground (mean Dice over classes), then per class
   either its largest component or the removal of components smaller than a share of the class's median reference
   volume (that class's mean Dice).
The choice is written as DIR/inference_plan.json, which `medseg predict --plan DIR/inference_plan.json` reads: every
fold run of the chosen trials predicts, their probabilities are averaged, and the postprocessing applied.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, runs
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.infer.postprocess import labels_of_probabilities, postprocess
from medseg_jax.io import formats
from medseg_jax.io.geometry import to_canonical
from medseg_jax.metrics.overlap import dice_per_class, nanmean
from medseg_jax.sweep.results import collect

log = logging.getLogger(__name__)
PLAN_NAME = "inference_plan.json"
# candidate minimum component sizes, as shares of a class's median reference volume
MIN_SIZE_SHARES = (0.01, 0.05, 0.1, 0.2)

Loader = Callable[[str], tuple[np.ndarray, dict[str, np.ndarray]]]  # case -> (reference, {trial: probabilities})


def foreground_mean(per_case: dict[str, dict[int, float]]) -> float:
    """Mean over cases of each case's mean Dice over the classes defined there."""
    values = [nanmean(scores.values()) for scores in per_case.values()]
    return nanmean(values)


def class_mean(per_case: dict[str, dict[int, float]], label: int) -> float:
    return nanmean([scores[label] for scores in per_case.values()])


def score_candidates(case_ids: Sequence[str], load: Loader, trials: Sequence[str], classes: Sequence[int],
                     max_members: int = 2, regions=None) -> dict[tuple[str, ...], dict]:
    """{members: {case: {class: Dice}}} for every single trial and every ensemble of up to `max_members`."""
    candidates = [c for size in range(1, max_members + 1) for c in itertools.combinations(trials, size)]
    scores: dict[tuple[str, ...], dict] = {c: {} for c in candidates}
    for case_id in tqdm(case_ids, desc="scoring ensembles", unit="case"):
        reference, probabilities = load(case_id)
        for members in candidates:
            mean = np.mean([probabilities[t].astype(np.float32) for t in members], axis=0)
            scores[members][case_id] = dice_per_class(labels_of_probabilities(mean, regions), reference, classes)
    return scores


def choose_postprocessing(case_ids: Sequence[str], load_labels: Callable[[str], tuple[np.ndarray, np.ndarray]],
                          classes: Sequence[int]) -> tuple[dict, dict]:
    """(rules for `infer.postprocess.postprocess`, the Dice before and after each step), in two passes over the cases
    (one case in memory at a time). A class's rule only turns that class's voxels into background, so it changes only
    that class's Dice: the per-class choices are independent once the foreground step is decided."""
    base: dict[str, dict[int, float]] = {}
    with_lcc: dict[str, dict[int, float]] = {}
    volumes: dict[int, list[int]] = {label: [] for label in classes}
    foreground_rule = {"foreground_largest_component": True}
    for case_id in tqdm(case_ids, desc="postprocessing (foreground)", unit="case"):
        reference, labels = load_labels(case_id)
        base[case_id] = dice_per_class(labels, reference, classes)
        with_lcc[case_id] = dice_per_class(postprocess(labels, foreground_rule), reference, classes)
        for label in classes:
            count = int((reference == label).sum())
            if count:
                volumes[label].append(count)
    keep_foreground = foreground_mean(with_lcc) > foreground_mean(base)
    report: dict = {"before": foreground_mean(base), "steps": [
        {"step": "foreground largest component", "before": foreground_mean(base), "after": foreground_mean(with_lcc),
         "kept": keep_foreground}]}
    start = with_lcc if keep_foreground else base
    options = {label: [{"largest_component": True}] + [
        {"min_voxels": int(math.ceil(share * float(np.median(volumes[label]))))} for share in MIN_SIZE_SHARES
        if volumes[label] and share * float(np.median(volumes[label])) > 1] for label in classes}
    option_scores: dict[int, list[dict[str, float]]] = {label: [{} for _ in options[label]] for label in classes}
    for case_id in tqdm(case_ids, desc="postprocessing (classes)", unit="case"):
        reference, labels = load_labels(case_id)
        if keep_foreground:
            labels = postprocess(labels, foreground_rule)
        for label in classes:
            for index, option in enumerate(options[label]):
                rules = {"classes": {str(label): option}}
                option_scores[label][index][case_id] = dice_per_class(postprocess(labels, rules), reference,
                                                                      [label])[label]
    rules: dict = {"foreground_largest_component": keep_foreground, "classes": {}}
    final = {case_id: dict(scores) for case_id, scores in start.items()}
    for label in classes:
        before = class_mean(start, label)
        best_index, best_value = None, before
        for index, scores in enumerate(option_scores[label]):
            value = nanmean(scores.values())
            if value > best_value:
                best_index, best_value = index, value
        report["steps"].append({"step": f"class {label}", "rule": None if best_index is None else
                                options[label][best_index], "before": before, "after": best_value,
                                "kept": best_index is not None})
        if best_index is not None:
            rules["classes"][str(label)] = options[label][best_index]
            for case_id, value in option_scores[label][best_index].items():
                final[case_id][label] = value
    report["after"] = foreground_mean(final)
    return rules, report


def find_best(workdir: str | Path, max_members: int = 2) -> dict:
    """Chooses the best trial or ensemble and its postprocessing from a sweep's out-of-fold predictions; writes
    DIR/inference_plan.json and returns it."""
    workdir = Path(workdir)
    manifest, finished = collect(workdir)
    wanted = sorted(int(f) for f in manifest["folds"])
    complete = {t: folds for t, folds in finished.items() if sorted(folds) == wanted}
    if not complete:
        raise MedsegError(f"{workdir}: no trial has finished all its folds ({wanted}); finish the sweep first")
    left_out = sorted(set(manifest["trials"]) - set(complete))
    if left_out:
        log.info("left out (folds unfinished): %s", ", ".join(left_out))
    # Which run predicted each case out of fold (the same folds for every trial of a sweep).
    fold_runs: dict[str, dict[str, runs.RunDir]] = {t: {} for t in complete}
    for trial, folds in complete.items():
        for fold, run in folds.items():
            for case_id in json.loads(run.splits_path.read_text())[fold]["val"]:
                if not (run.validation_dir / f"{case_id}.npz").is_file():
                    raise MedsegError(f"{run.validation_dir / (case_id + '.npz')}: out-of-fold probabilities "
                                      "missing (runs trained before cross-validation saved them)")
                fold_runs[trial][case_id] = run
    first = next(iter(complete))
    case_ids = sorted(fold_runs[first])
    config = next(iter(complete[first].values())).load_config()
    store = Store(config.data.store)
    classes = [int(k) for k in store.plan["labels"] if int(k) != 0]
    regions = config.loss.get("regions") or None
    trials = sorted(complete)

    def reference_of(case_id: str) -> np.ndarray:
        path = store.source_path(store.cases[case_id]["source"]["label"])
        if path is None or not path.is_file():
            raise MedsegError(f"case {case_id}: its source label ({path}) is not readable any more")
        return formats.read_label(path)[0]

    def load(case_id: str):
        probabilities = {}
        for trial in trials:
            with np.load(fold_runs[trial][case_id].validation_dir / f"{case_id}.npz") as saved:
                # saved in the file's voxel order; the reference is read onto the canonical grid
                probabilities[trial] = to_canonical(saved["probabilities"], store.geometry(case_id))
        return reference_of(case_id), probabilities

    scores = score_candidates(case_ids, load, trials, classes, min(max_members, len(trials)), regions)
    ranked = sorted(scores, key=lambda members: (-foreground_mean(scores[members]), len(members), members))
    best = ranked[0]

    def load_labels(case_id: str):
        reference, probabilities = load(case_id)
        mean = np.mean([probabilities[t].astype(np.float32) for t in best], axis=0)
        return reference, labels_of_probabilities(mean, regions).astype(np.int16)

    rules, steps = choose_postprocessing(case_ids, load_labels, classes)
    plan = {
        "kind": "medseg inference plan",
        "sweep": manifest.get("sweep"),
        "members": list(best),
        # relative to this file, so the sweep folder can move
        "runs": [str(complete[t][f].path.relative_to(workdir)) for t in best for f in wanted],
        "checkpoint": "latest",  # the out-of-fold predictions came from each run's final parameters
        "postprocessing": rules,
        "cross_validation": {
            "cases": len(case_ids),
            "candidates": [{"members": list(m), "dice": foreground_mean(scores[m])} for m in ranked],
            "postprocessing": steps,
        },
    }
    fileio.write_json(workdir / PLAN_NAME, plan)
    return plan


def describe(plan: dict) -> str:
    cv = plan["cross_validation"]
    lines = ["| candidate | CV Dice |", "|---|---:|"]
    lines += [f"| {' + '.join(c['members'])} | {c['dice']:.4f} |" for c in cv["candidates"]]
    lines += ["", "| postprocessing step | Dice before | after | kept |", "|---|---:|---:|---|"]
    for step in cv["postprocessing"]["steps"]:
        name = step["step"] + (f" {step['rule']}" if step.get("rule") else "")
        lines.append(f"| {name} | {step['before']:.4f} | {step['after']:.4f} | {'yes' if step['kept'] else 'no'} |")
    return "\n".join(lines) + "\n"
