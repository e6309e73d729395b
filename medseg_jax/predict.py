"""Files in, files out: a trained run directory + scans -> label maps in each scan's own geometry.

Each input is brought to canonical orientation, cropped to its nonzero region, normalised and resampled exactly as in
training (the run's plans.json), segmented by Gaussian-weighted sliding-window inference, resampled back onto its crop
box (logits, linear; background outside), and written with the input's shape, affine and voxel order under the
input's file name.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from medseg_jax import runs
from medseg_jax.data import preprocess
from medseg_jax.errors import MedsegError
from medseg_jax.infer.forward import make_forward
from medseg_jax.infer.postprocess import logits_to_original
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.io import datasets, nifti
from medseg_jax.models.registry import build_network, output_channels
from medseg_jax.parallel import mesh as mesh_lib


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


def check_inputs(inputs) -> list[tuple[str, tuple, str]]:
    """Reads every input once; returns the problems as (case_id, paths, message)."""
    problems = []
    for case_id, paths in inputs:
        try:
            nifti.read_images(paths)
        except MedsegError as exc:
            problems.append((case_id, paths, str(exc)))
    return problems


def predict(run_dir, input_path, output_dir, *, overwrite: bool = False, skip_bad: bool = False,
            checkpoint: str = "best", mesh: dict | None = None) -> dict:
    """Predicts every scan under `input_path` into `output_dir`. Returns {"written": [...], "failed": [...]}.

    Before writing anything: all inputs are read and checked, and existing outputs are refused unless `overwrite`.
    With `skip_bad`, bad inputs are reported and the good ones predicted.
    """
    inputs = datasets.list_nifti_inputs(input_path)
    output_dir = Path(output_dir)
    targets = {case_id: output_dir / output_name(case_id, paths) for case_id, paths in inputs}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists ({len(existing)} outputs would be overwritten); "
                          "pass --overwrite or choose another --output")
    predictor = Predictor(run_dir, checkpoint, mesh)
    problems = check_inputs(inputs)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise MedsegError(f"{problems[0][2]}{more}; nothing written; pass --skip-bad to predict the good inputs")
    bad = {case_id for case_id, _, _ in problems}
    written = []
    for case_id, paths in tqdm(inputs, desc="predicting", unit="case"):
        if case_id in bad:
            continue
        predictor.predict_file(paths, targets[case_id])
        written.append(str(targets[case_id]))
    return {"written": written, "failed": [{"case": c, "problem": m} for c, _, m in problems]}
