"""Files in, files out: a trained run directory + scans -> label maps in each scan's own geometry.

Each input is brought to canonical orientation, cropped to its nonzero region, normalised and resampled exactly as in
training (the run's plans.json), segmented by Gaussian-weighted sliding-window inference, resampled back onto its crop
box (logits, linear; background outside), and written with the input's shape, affine and voxel order under the
input's file name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, runs
from medseg_jax.data import preprocess
from medseg_jax.errors import MedsegError
from medseg_jax.infer.forward import make_forward
from medseg_jax.infer.postprocess import label_dtype, labels_of_probabilities, logits_to_original, postprocess
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.io import datasets, nifti
from medseg_jax.models.registry import build_network, output_channels
from medseg_jax.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)


def output_name(case_id: str, paths) -> str:
    if Path(paths[0]).is_dir():  # a DICOM series: the prediction is NIfTI in the series' geometry
        return case_id + ".nii.gz"
    if len(paths) == 1:
        return Path(paths[0]).name
    name = Path(paths[0]).name
    ending = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    return case_id + ending


class Predictor:
    """A loaded run: `predict_array(image, spacing)` and `predict_file(paths, output)`."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best", mesh: dict | None = None):
        run = runs.RunDir(run_dir)
        if not run.path.is_dir():
            raise MedsegError(f"{run.path}: run directory not found")
        self.config, self.plans = run.load_config(), run.load_plans()
        num_classes, in_channels = len(self.plans["labels"]), len(self.plans["normalization"])
        self.model = build_network(self.config, num_classes, in_channels)
        params = runs.load_params(run.path, checkpoint)
        patch = tuple(int(p) for p in self.config.train.patch_size)
        batch = int(self.config.infer.batch_size)
        # The training mesh need not exist here: by default every local device takes windows (as many as divide the
        # window batch); `mesh` ({"data": D, "space": S, ...}) splits each window over devices instead.
        section = dict(mesh or {})
        if section.get("data", -1) in (-1, None):
            space = int(section.get("space", 1)) * int(section.get("space2", 1))
            available = max(1, len(jax.devices()) // space)
            section["data"] = max(d for d in range(1, min(batch, available) + 1) if batch % d == 0)
        self.layout = mesh_lib.make_mesh_layout(section, spatial_dims=len(patch))
        mesh_lib.check_batch_divisible(batch, self.layout, key="infer.batch_size")
        mesh_lib.check_patch(self.layout, patch, self.model)
        self.params = jax.device_put(params, self.layout.tree_shardings(params))
        self.forward = make_forward(self.model, self.layout, (batch, *patch, in_channels), self.params)
        self.regions = self.config.loss.get("regions") if "loss" in self.config else None
        self.num_outputs = output_channels(num_classes, self.regions)

    def logits(self, image: np.ndarray, spacing) -> tuple[np.ndarray, preprocess.Preprocessed]:
        """Canonical image (X, Y, Z, C) -> (logits on the preprocessed grid, the preprocessing record)."""
        pre = preprocess.preprocess_case(image, spacing, self.plans)
        logits = sliding_window_inference(lambda windows: self.forward(self.params, windows), pre.image,
                                          tuple(self.config.train.patch_size), self.num_outputs,
                                          overlap=self.config.infer.overlap, batch_size=self.config.infer.batch_size)
        return logits, pre

    def predict_array(self, image: np.ndarray, spacing) -> np.ndarray:
        """Canonical image (X, Y, Z, C) -> canonical label map (X, Y, Z) on the same grid."""
        logits, pre = self.logits(image, spacing)
        return logits_to_original(logits, pre.crop_box, pre.canonical_shape, self.regions)

    def predict_file(self, paths, output: Path) -> None:
        image, geometry = nifti.read_images(paths)
        if image.shape[-1] != len(self.plans["normalization"]):
            raise MedsegError(f"{paths[0]}: {image.shape[-1]} channels, the model was trained on "
                              f"{len(self.plans['normalization'])}")
        nifti.write_label(output, self.predict_array(image, geometry.spacing), geometry)


class EnsemblePredictor(Predictor):
    """An inference plan (`medseg results --find-best` writes SWEEP/inference_plan.json): every run it lists predicts,
    their class probabilities on the scan's grid are averaged, and the plan's postprocessing is applied."""

    def __init__(self, plan_path: str | Path, mesh: dict | None = None):
        plan_path = Path(plan_path)
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, ValueError) as exc:
            raise MedsegError(f"{plan_path}: cannot read the inference plan ({exc})") from None
        if not isinstance(plan, dict) or plan.get("kind") != "medseg inference plan" or not plan.get("runs"):
            raise MedsegError(f"{plan_path}: not an inference plan (written by `medseg results --find-best`)")
        self.members = [Predictor(plan_path.parent / run, plan.get("checkpoint", "latest"), mesh)
                        for run in plan["runs"]]
        first = self.members[0]
        for run, member in zip(plan["runs"], self.members):
            if member.plans["labels"] != first.plans["labels"] or member.regions != first.regions:
                raise MedsegError(f"{plan_path}: run {run} predicts other labels than {plan['runs'][0]}")
        self.plans, self.regions, self.rules = first.plans, first.regions, plan.get("postprocessing")

    def predict_array(self, image: np.ndarray, spacing) -> np.ndarray:
        total = None
        for member in self.members:
            logits, pre = member.logits(image, spacing)
            _, probabilities = logits_to_original(logits, pre.crop_box, pre.canonical_shape, member.regions,
                                                  with_probabilities=True)
            total = probabilities.astype(np.float32) if total is None else total + probabilities
        labels = labels_of_probabilities(total / len(self.members), self.regions)
        return postprocess(labels.astype(label_dtype(labels)), self.rules)


def open_predictor(run: str | Path, checkpoint: str = "best", mesh: dict | None = None) -> Predictor:
    """A run directory's predictor, or an inference plan's ensemble (a .json file)."""
    if Path(run).is_file() and str(run).endswith(".json"):
        return EnsemblePredictor(run, mesh)
    return Predictor(run, checkpoint, mesh)


def check_inputs(inputs, channels: int | None = None) -> list[tuple[str, tuple, str]]:
    """Reads every input once; returns the problems as (case_id, paths, message): unreadable files, dangling links,
    and images whose channel count is not the model's."""
    problems = []
    for case_id, paths in inputs:
        try:
            image, _ = nifti.read_images(paths)
            if channels is not None and image.shape[-1] != channels:
                raise MedsegError(f"{paths[0]}: {image.shape[-1]} channels, the model was trained on {channels}")
        except MedsegError as exc:
            problems.append((case_id, paths, str(exc)))
    return problems


RECORD = ".medseg_predictions.json"  # in the output folder: the outputs this command wrote, and from what


def check_output_dir(output_dir: Path, inputs) -> None:
    """Refuses, before anything is computed, an output folder that is a file, is not writable, or is (or holds) an
    input: predictions must never replace or mix with the scans."""
    if output_dir.exists() and not output_dir.is_dir():
        raise MedsegError(f"--output {output_dir}: is a file, not a folder; choose a folder for the predictions")
    out = Path(os.path.realpath(output_dir))
    for _, paths in inputs:
        for path in paths:
            resolved = Path(os.path.realpath(path))  # (a link loop stays a path here; reading it reports it)
            if resolved == out or out in resolved.parents:
                raise MedsegError(f"--output {output_dir}: holds the input {path}; predictions would mix with or "
                                  "replace the scans: choose an output folder apart from the inputs")
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MedsegError(f"--output {output_dir}: cannot write into {existing} (permission denied or read-only)")


def _source(run_dir, checkpoint: str, paths) -> dict:
    return {"run": os.path.realpath(run_dir), "checkpoint": checkpoint,
            "inputs": [os.path.realpath(p) for p in paths]}


def _written_by_us(target: Path, entry: dict | None, source: dict) -> bool:
    """Whether `target` is this command's complete output for `source`: recorded from the same run, checkpoint and
    inputs, and still the file written then (same size and time; a record without them is an output renamed into
    place just before a kill)."""
    if entry is None or not target.is_file() or {k: entry.get(k) for k in source} != source:
        return False
    stat = target.stat()
    return "size" not in entry or (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)


def predict(run_dir, input_path, output_dir, *, overwrite: bool = False, skip_bad: bool = False,
            checkpoint: str = "best", mesh: dict | None = None) -> dict:
    """Predicts every scan under `input_path` into `output_dir`. Returns {"written": [...], "skipped": [...],
    "failed": [...]}.

    Before anything is computed: the output folder is checked (not an input, writable), all inputs are read and
    checked, and existing outputs are refused unless `overwrite` — except those this command already wrote from the
    same run, checkpoint and inputs (recorded in the output folder): a re-run after an interruption skips them and
    predicts the rest. With `skip_bad`, bad inputs are reported and the good ones predicted.
    """
    inputs = datasets.list_nifti_inputs(input_path)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, inputs)
    targets = {case_id: output_dir / output_name(case_id, paths) for case_id, paths in inputs}
    record_path = output_dir / RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    done = {case_id for case_id, paths in inputs if not overwrite and _written_by_us(
        targets[case_id], record.get(targets[case_id].name), _source(run_dir, checkpoint, paths))}
    existing = [str(p) for c, p in targets.items() if p.exists() and c not in done]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists ({len(existing)} outputs would be overwritten); "
                          "pass --overwrite or choose another --output")
    predictor = open_predictor(run_dir, checkpoint, mesh)
    todo = [(case_id, paths) for case_id, paths in inputs if case_id not in done]
    problems = check_inputs(todo, channels=len(predictor.plans["normalization"]))
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise MedsegError(f"{problems[0][2]}{more}; nothing written; pass --skip-bad to predict the good inputs")
    if done:
        log.info("%d of %d outputs already predicted from this run: skipped (--overwrite predicts them again)",
                 len(done), len(inputs))
    bad = {case_id for case_id, _, _ in problems}
    written = []
    for case_id, paths in tqdm(todo, desc="predicting", unit="case"):
        if case_id in bad:
            continue
        fileio.remove_temporaries(targets[case_id])  # what a killed earlier run left half-written
        # Recorded before the output is renamed into place: after a kill at any moment, an output that exists is
        # complete and recorded, so the re-run skips it.
        record[targets[case_id].name] = _source(run_dir, checkpoint, paths)
        fileio.write_json(record_path, record)
        predictor.predict_file(paths, targets[case_id])
        stat = targets[case_id].stat()
        record[targets[case_id].name].update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        fileio.write_json(record_path, record)
        written.append(str(targets[case_id]))
    return {"written": written, "skipped": sorted(str(targets[c]) for c in done),
            "failed": [{"case": c, "problem": m} for c, _, m in problems]}
