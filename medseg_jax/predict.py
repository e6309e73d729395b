"""Files in, files out: trained runs (one, an ensemble, an inference plan) or an exported model + scans -> label maps in
each scan's own geometry.

Each input is brought to canonical orientation, cropped to its nonzero region, normalised and resampled exactly as in
training (each model's own plans.json), segmented by Gaussian-weighted sliding-window inference with mirror test-time
augmentation (`infer.mirror_axes`, in the same compiled call as the windows), resampled back onto its crop box (logits,
linear; background outside), and written with the input's shape, affine and voxel order under the input's file name.
An ensemble averages its members' class probabilities on the scan's grid (as nnU-Net does), then applies the
postprocessing of the inference plan. `--save-probabilities` writes those probabilities beside each label map
(CASE.npz, float16, in the source file's voxel order), which `medseg ensemble` averages.

A model exported by `medseg export` (medseg_jax/export.py) predicts here through `jax.export` without the model code:
this module imports the models only when it opens a run directory.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, runs
from medseg_jax import qc as qc_lib
from medseg_jax.data import preprocess
from medseg_jax.errors import MedsegError
from medseg_jax.infer.postprocess import (
    check_rules,
    label_dtype,
    labels_of_probabilities,
    logits_to_original,
    postprocess,
)
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.infer.tta import mirrored
from medseg_jax.io import annotations, datasets, formats, nifti
from medseg_jax.io.geometry import Geometry, from_canonical, to_canonical
from medseg_jax.metrics import uncertainty
from medseg_jax.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

PLAN_KIND = "medseg inference plan"
EXPORT_KIND = "medseg exported model"
EXPORT_MANIFEST = "model.json"
OUTPUT_FORMATS = ("nifti", "dicom-seg")


def output_name(case_id: str, paths, output_format: str = "nifti") -> str:
    if output_format == "dicom-seg":
        return case_id + ".dcm"
    # CASE + the input's own ending, as nnU-Net names predictions (scan_0000.png -> scan.png, matching labelsTs/);
    # a JPEG's labels go to PNG, which keeps them; a DICOM series' to NIfTI in the series' geometry
    return formats.prediction_path(paths[0], Path("."), case_id).name


def annotation_paths(annotations_dir: Path, case_id: str) -> tuple[Path, Path]:
    """A case's pre-annotations: the Slicer segmentation and the uncertainty map."""
    return annotations_dir / f"{case_id}.seg.nrrd", annotations_dir / f"{case_id}_uncertainty.nii.gz"


def probabilities_name(case_id: str) -> str:
    return case_id + ".npz"


# --- one model ------------------------------------------------------------------------------------------------------

class Member:
    """One model with its preprocessing plan: `logits(image, spacing)` on its preprocessed grid."""

    name: str
    plans: dict
    regions: list | None
    num_outputs: int
    patch: tuple[int, ...]
    overlap: float
    batch_size: int
    mirror_axes: tuple[int, ...]

    def dispatch(self, windows: np.ndarray):
        raise NotImplementedError

    def fetch(self, result) -> np.ndarray:
        return np.asarray(result)

    @property
    def in_channels(self) -> int:
        return len(self.plans["normalization"])

    def _windows(self, volume: np.ndarray, flip: Sequence[int] = ()) -> np.ndarray:
        """Sliding-window logits of a preprocessed volume, seen mirrored along `flip` (and mirrored back)."""
        if flip:
            volume = np.flip(volume, tuple(flip))
        logits = sliding_window_inference(self.dispatch, volume, self.patch, self.num_outputs,
                                          overlap=self.overlap, batch_size=self.batch_size, fetch=self.fetch)
        return np.ascontiguousarray(np.flip(logits, tuple(flip))) if flip else logits

    def on_scan(self, image: np.ndarray, geometry: Geometry, with_probabilities: bool):
        """Canonical image -> its canonical label map, or its (X, Y, Z, K) probabilities."""
        view = next(self.views_on_scan(image, geometry, [()], with_probabilities))
        return view[1] if with_probabilities else view

    def views_on_scan(self, image: np.ndarray, geometry: Geometry, flips: Sequence[Sequence[int]],
                      with_probabilities: bool = True):
        """Canonical image -> per test-time view (`flips`: the spatial axes each view mirrors, () the plain one) its
        canonical label map, or (label map, (X, Y, Z, K) float16 probabilities), one view at a time; the scan is
        preprocessed once. The label map is the argmax of the logits, as a prediction's.

        A plan with "voxel_order": "file" (an nnU-Net model imported from a reader that keeps each file's voxel order,
        as its default SimpleITKIO does) sees the scan in its file's voxel order and spacing, as it was trained."""
        order = self.plans.get("voxel_order", "canonical")
        if order not in ("canonical", "file"):
            raise MedsegError(f"{self.name}: plans.json 'voxel_order' {order!r} is not canonical or file")
        file_order = order == "file"
        if file_order:
            image, spacing = from_canonical(image, geometry), geometry.file_spacing()
        else:
            spacing = geometry.spacing
        pre = preprocess.preprocess_case(image, spacing, self.plans)
        for flip in flips:
            result = logits_to_original(self._windows(pre.image, flip), pre.crop_box, pre.canonical_shape,
                                        self.regions, with_probabilities=with_probabilities, plan=self.plans,
                                        spacing=spacing)
            if file_order:
                result = tuple(to_canonical(r, geometry) for r in result) if with_probabilities else \
                    to_canonical(result, geometry)
            yield result


def _axes(mirror_axes, dims: int) -> tuple[int, ...]:
    return tuple(int(a) for a in mirror_axes if int(a) < dims)


def configured_mirror_axes(config) -> tuple[int, ...]:
    """The axes a run mirrors at prediction by default: `infer.mirror_axes` among those its training augmentation
    mirrored (nnU-Net's inference_allowed_mirroring_axes). A model that never saw a flipped scan would be averaged
    with predictions it was not trained for: the demo's CT model, trained without mirroring, drops from test Dice
    0.876 to 0.449 with all flips, since left and right organs trade places."""
    wanted = config.get("infer", {}).get("mirror_axes", (0, 1, 2))
    augment = config.get("augment", {})
    trained = augment.get("mirror_axes", (0, 1, 2)) if float(augment.get("p_mirror", 0.0)) > 0 else ()
    return tuple(int(a) for a in wanted if int(a) in {int(t) for t in trained})


class RunMember(Member):
    """A run directory (trained, or imported from nnU-Net / MONAI) at one checkpoint."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best", mesh: dict | None = None,
                 mirror_axes: Sequence[int] | None = None):
        # The model code is imported here, not at the top, so that an exported model predicts without it.
        from medseg_jax.infer.forward import make_forward
        from medseg_jax.models.registry import build_network, output_channels

        run = runs.RunDir(run_dir)
        if not run.path.is_dir():
            raise MedsegError(f"{run.path}: run directory not found")
        self.name, self.path, self.checkpoint = run.path.name, run.path, checkpoint
        self.config, self.plans = run.load_config(), run.load_plans()
        num_classes = len(self.plans["labels"])
        self.model = build_network(self.config, num_classes, self.in_channels)
        params = runs.load_params(run.path, checkpoint)
        self.patch = tuple(int(p) for p in self.config.train.patch_size)
        self.batch_size, self.overlap = int(self.config.infer.batch_size), float(self.config.infer.overlap)
        configured = configured_mirror_axes(self.config)
        self.mirror_axes = _axes(configured if mirror_axes is None else mirror_axes, len(self.patch))
        # The training mesh need not exist here: by default every local device takes windows (as many as divide the
        # window batch); `mesh` ({"data": D, "space": S, ...}) splits each window over devices instead.
        section = dict(mesh or {})
        if section.get("data", -1) in (-1, None):
            space = int(section.get("space", 1)) * int(section.get("space2", 1))
            available = max(1, len(jax.devices()) // space)
            section["data"] = max(d for d in range(1, min(self.batch_size, available) + 1)
                                  if self.batch_size % d == 0)
        self.layout = mesh_lib.make_mesh_layout(section, spatial_dims=len(self.patch))
        mesh_lib.check_batch_divisible(self.batch_size, self.layout, key="infer.batch_size")
        mesh_lib.check_patch(self.layout, self.patch, self.model)
        self.params = jax.device_put(params, self.layout.tree_shardings(params))
        self.forward = make_forward(self.model, self.layout, (self.batch_size, *self.patch, self.in_channels),
                                    self.params, mirror_axes=self.mirror_axes)
        self.regions = self.config.loss.get("regions") if "loss" in self.config else None
        self.num_outputs = output_channels(num_classes, self.regions)

    def dispatch(self, windows):
        return self.forward.dispatch(self.params, windows)

    def fetch(self, result):
        return mesh_lib.to_host(result)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


class ExportedMember(Member):
    """One model of an exported model folder: its StableHLO forward pass (`jax.export`) and parameters, run without
    the flax model. Mirror TTA is applied around the exported call, so it stays a choice at prediction time."""

    def __init__(self, model_dir: Path, entry: dict, mirror_axes: Sequence[int] | None = None):
        from jax import export as jax_export

        self.name, self.plans, self.regions = entry["name"], entry["plans"], entry.get("regions")
        self.num_outputs, self.patch = int(entry["num_outputs"]), tuple(int(p) for p in entry["patch_size"])
        self.overlap, self.batch_size = float(entry["overlap"]), int(entry["batch_size"])
        self.mirror_axes = _axes(entry.get("mirror_axes", ()) if mirror_axes is None else mirror_axes, len(self.patch))
        forward_path, params_path = model_dir / entry["forward"], model_dir / entry["params"]
        try:
            exported = jax_export.deserialize(bytearray(forward_path.read_bytes()))
            with np.load(params_path) as saved:
                self.params = [jax.device_put(saved[f"p{i:05d}"]) for i in range(len(saved.files))]
        except (OSError, ValueError, KeyError) as exc:
            raise MedsegError(f"{forward_path}: cannot load the exported model ({exc})") from None
        platform = jax.devices()[0].platform
        if platform not in exported.platforms:
            raise MedsegError(f"{forward_path}: exported for {', '.join(exported.platforms)}, not for this "
                              f"{platform} device; export again with --platforms including {platform}")
        call = jax.jit(lambda params, windows: mirrored(lambda w: exported.call(params, w), self.mirror_axes)(windows))
        self._call = call

    def dispatch(self, windows):
        return self._call(self.params, windows)


def read_export_manifest(model_dir: str | Path) -> dict:
    """model.json of an exported model folder, checked: its kind, and that this jax can load it."""
    model_dir = Path(model_dir)
    path = model_dir / EXPORT_MANIFEST
    if not model_dir.is_dir():
        raise MedsegError(f"{model_dir}: exported model folder not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read the exported model's manifest ({exc}); "
                          "is this a folder written by `medseg export`?") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != EXPORT_KIND or not manifest.get("members"):
        raise MedsegError(f"{path}: not an exported model (written by `medseg export`)")
    exported_with = str(manifest.get("jax_version", "0"))
    if _version(jax.__version__) < _version(exported_with):
        raise MedsegError(f"{model_dir}: exported with jax {exported_with}, newer than this jax {jax.__version__}; "
                          f"it loads in {manifest.get('loads_in', 'jax >= ' + exported_with)}: upgrade jax")
    return manifest


# --- models together ------------------------------------------------------------------------------------------------

class Predictor:
    """Members (one or more models) averaged, then postprocessed: `predict_case(image, geometry)`."""

    def __init__(self, members: list[Member], postprocessing: dict | None = None, source: str = "models"):
        first = members[0]
        for member in members[1:]:
            if member.plans["labels"] != first.plans["labels"] or member.regions != first.regions:
                raise MedsegError(f"{source}: {member.name} predicts labels {member.plans['labels']}"
                                  f"{' as regions ' + str(member.regions) if member.regions else ''}, "
                                  f"{first.name} predicts {first.plans['labels']}"
                                  f"{' as regions ' + str(first.regions) if first.regions else ''}; "
                                  "an ensemble needs the same labels")
            if member.in_channels != first.in_channels:
                raise MedsegError(f"{source}: {member.name} takes {member.in_channels} channels, {first.name} "
                                  f"{first.in_channels}; an ensemble needs the same inputs")
        check_rules(postprocessing, source)
        self.members, self.rules, self.source = members, postprocessing, source
        self.plans, self.regions = first.plans, first.regions

    @property
    def in_channels(self) -> int:
        return self.members[0].in_channels

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.plans["labels"].items()}

    def predict_case(self, image: np.ndarray, geometry: Geometry, with_probabilities: bool = False,
                     statistics=None):
        """Canonical image (X, Y, Z, C) and its geometry -> (canonical label map, float32 probabilities (X, Y, Z, K)
        or None). `statistics` (metrics.uncertainty.ViewStatistics) also receives each member's probabilities and
        labels, for quality control; the prediction is the same with or without it."""
        if len(self.members) == 1 and not with_probabilities:
            # argmax of the logits on the scan's grid, as before ensembles existed (bit-identical predictions)
            member = self.members[0]
            if statistics is None:
                labels = member.on_scan(image, geometry, with_probabilities=False)
            else:
                labels, probabilities = next(member.views_on_scan(image, geometry, [()]))
                statistics.add(probabilities, labels)
            return postprocess(labels, self.rules, geometry.spacing), None
        total = None
        for member in self.members:
            member_labels, probabilities = next(member.views_on_scan(image, geometry, [()]))
            if statistics is not None:
                statistics.add(probabilities, member_labels)
            probabilities = probabilities.astype(np.float32)
            total = probabilities if total is None else total + probabilities
        mean = total / len(self.members)
        labels = labels_of_probabilities(mean, self.regions)
        return postprocess(labels.astype(label_dtype(labels)), self.rules, geometry.spacing), mean


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MedsegError(f"{path}: {what} not found")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read the {what} ({exc})") from None
    if not isinstance(value, dict):
        raise MedsegError(f"{path}: the {what} must be a JSON object")
    return value


def read_plan(plan_path: str | Path) -> dict:
    """An inference plan (`medseg results --find-best` writes SWEEP/inference_plan.json), checked."""
    plan_path = Path(plan_path)
    plan = _read_json(plan_path, "inference plan")
    if plan.get("kind") != PLAN_KIND or not plan.get("runs"):
        raise MedsegError(f"{plan_path}: not an inference plan (written by `medseg results --find-best`)")
    return plan


def read_postprocessing(path: str | Path) -> dict:
    """Postprocessing rules from a JSON file: an inference plan's, or the rules themselves."""
    path = Path(path)
    value = _read_json(path, "postprocessing file")
    rules = value.get("postprocessing") if value.get("kind") == PLAN_KIND else value
    check_rules(rules, str(path))
    return rules


def open_predictor(runs_or_plan: str | Path | Sequence[str | Path] = (), checkpoint: str = "best",
                   mesh: dict | None = None, *, plan: str | Path | None = None, model: str | Path | None = None,
                   mirror_axes: Sequence[int] | None = None, postprocessing: dict | None = None) -> Predictor:
    """The predictor of run directories (an ensemble when several), of an inference plan (`plan`, or a .json given
    as the run), or of an exported model folder (`model`). `mirror_axes` overrides each model's own; `postprocessing`
    rules replace the plan's."""
    run_dirs = [runs_or_plan] if isinstance(runs_or_plan, (str, Path)) else list(runs_or_plan)
    if len(run_dirs) == 1 and Path(run_dirs[0]).is_file() and str(run_dirs[0]).endswith(".json") and plan is None:
        plan, run_dirs = run_dirs[0], []  # `--run SWEEP/inference_plan.json`, as issue 15 documented it
    chosen = [name for name, given in (("--run", run_dirs), ("--plan", plan), ("--model", model)) if given]
    if len(chosen) != 1:
        raise MedsegError("give the models as one of --run RUN [--run RUN ...], --plan PLAN.json or --model DIR"
                          + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if model is not None:
        model = Path(model)
        manifest = read_export_manifest(model)
        members = [ExportedMember(model, entry, mirror_axes) for entry in manifest["members"]]
        rules = manifest.get("postprocessing") if postprocessing is None else postprocessing
        return Predictor(members, rules, source=str(model))
    if plan is not None:
        plan = Path(plan)
        content = read_plan(plan)
        members = [RunMember(plan.parent / run, content.get("checkpoint", "latest"), mesh, mirror_axes)
                   for run in content["runs"]]
        rules = content.get("postprocessing") if postprocessing is None else postprocessing
        return Predictor(members, rules, source=str(plan))
    members = [RunMember(run, checkpoint, mesh, mirror_axes) for run in run_dirs]
    return Predictor(members, postprocessing, source=" + ".join(str(r) for r in run_dirs))


# --- files ----------------------------------------------------------------------------------------------------------

def write_probabilities(path: Path, canonical_probabilities: np.ndarray, geometry: Geometry, labels: dict,
                       regions=None) -> None:
    """CASE.npz: "probabilities" (I, J, K, classes) float16 in the source file's voxel order (as the out-of-fold ones
    of cross-validation), with the geometry, labels and regions `medseg ensemble` needs to write label maps."""
    with fileio.atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=from_canonical(canonical_probabilities.astype(np.float16), geometry),
                            geometry=json.dumps(geometry.to_dict()), labels=json.dumps(labels),
                            regions=json.dumps(regions))


def write_prediction(target: Path, labels: np.ndarray, geometry: Geometry, paths, output_format: str,
                     label_names: dict[int, str]) -> None:
    if output_format == "dicom-seg":
        from medseg_jax.io.dicom_seg import write_dicom_seg

        write_dicom_seg(target, labels, paths[0], label_names)
    else:
        formats.write_label(target, labels, geometry)


def check_inputs(inputs, channels: int | None = None) -> list[tuple[str, tuple, str]]:
    """Reads every input once; returns the problems as (case_id, paths, message): unreadable files, dangling links,
    and images whose channel count is not the model's."""
    problems = []
    for case_id, paths in inputs:
        try:
            image, _ = formats.read_images(paths)
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


def _source(models: dict, paths) -> dict:
    return {**models, "inputs": [os.path.realpath(p) for p in paths]}


def _written_by_us(target: Path, entry: dict | None, source: dict) -> bool:
    """Whether `target` is this command's complete output for `source`: recorded from the same models, options and
    inputs, and still the file written then (same size and time; a record without them is an output renamed into
    place just before a kill)."""
    if entry is None or not target.is_file() or {k: entry.get(k) for k in source} != source:
        return False
    stat = target.stat()
    return "size" not in entry or (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)


def _models_description(run_dirs, checkpoint, plan, model, mirror_axes, postprocessing, output_format,
                        with_probabilities) -> dict:
    """What a recorded output was predicted from and how: a re-run with anything else predicts it again."""
    if plan is not None or model is not None:
        models = {"plan" if plan is not None else "model": os.path.realpath(plan if plan is not None else model)}
    elif len(run_dirs) == 1:
        models = {"run": os.path.realpath(run_dirs[0]), "checkpoint": checkpoint}
    else:
        models = {"run": [os.path.realpath(r) for r in run_dirs], "checkpoint": checkpoint}
    options = {"mirror_axes": None if mirror_axes is None else list(mirror_axes), "postprocessing": postprocessing,
               "format": output_format, "probabilities": with_probabilities}
    if any(v not in (None, "nifti", False) for v in options.values()):
        models["options"] = options  # (absent for the defaults, so records of earlier versions still match)
    return models


def predict(run_dir=(), input_path=None, output_dir=None, *, overwrite: bool = False, skip_bad: bool = False,
            checkpoint: str = "best", mesh: dict | None = None, plan=None, model=None,
            mirror_axes: Sequence[int] | None = None, postprocessing: dict | None = None,
            save_probabilities: bool = False, output_format: str = "nifti", qc: bool = False,
            ood_threshold: float | None = None, pre_annotations: bool = False) -> dict:
    """Predicts every scan under `input_path` into `output_dir` with the run(s) `run_dir`, the inference `plan` or the
    exported `model`. Returns {"written": [...], "skipped": [...], "failed": [...]}.

    Before anything is computed: the output folder is checked (not an input, writable), all inputs are read and
    checked, and existing outputs are refused unless `overwrite` — except those this command already wrote from the
    same models, options and inputs (recorded in the output folder): a re-run after an interruption skips them and
    predicts the rest. With `skip_bad`, bad inputs are reported and the good ones predicted. The next case is read
    and the last one written while the current one is computed. `qc` also writes the quality-control report of
    medseg_jax/qc.py into OUTPUT/qc (from the views prediction computes anyway: the ensemble's members).
    `pre_annotations` also writes, for annotators, OUTPUT/annotations/CASE.seg.nrrd (3D Slicer: a named, coloured
    segment per label), CASE_uncertainty.nii.gz (the voxels' normalised entropy, 0 sure .. 1 unsure) and labels.txt
    (ITK-SNAP's label descriptions for the label maps).
    """
    if output_format not in OUTPUT_FORMATS:
        raise MedsegError(f"--output-format {output_format}: not one of {', '.join(OUTPUT_FORMATS)}")
    run_dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    inputs = datasets.list_nifti_inputs(input_path)
    if output_format == "dicom-seg":
        not_series = [paths[0] for _, paths in inputs if not Path(paths[0]).is_dir()]
        if not_series:
            raise MedsegError(f"{not_series[0]}: not a DICOM series; --output-format dicom-seg needs DICOM series "
                              "inputs (the segmentation references their images)")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, inputs)
    targets = {case_id: output_dir / output_name(case_id, paths, output_format) for case_id, paths in inputs}
    record_path = output_dir / RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    models = _models_description(run_dirs, checkpoint, plan, model, mirror_axes, postprocessing, output_format,
                                 save_probabilities)
    qc_dir = output_dir / "qc"
    done = {case_id for case_id, paths in inputs if not overwrite and _written_by_us(
        targets[case_id], record.get(targets[case_id].name), _source(models, paths))
        and (not qc or qc_lib.load_case(qc_dir, case_id) is not None)
        and (not pre_annotations or all(p.is_file() for p in annotation_paths(output_dir / "annotations", case_id)))}
    extra = [(c, output_dir / probabilities_name(c)) for c in targets] if save_probabilities else []
    annotations_dir = output_dir / "annotations"
    if pre_annotations:
        extra += [(c, path) for c in targets for path in annotation_paths(annotations_dir, c)]
    existing = [str(p) for c, p in targets.items() if p.exists() and c not in done]
    existing += [str(p) for c, p in extra if p.exists() and c not in done]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists ({len(existing)} outputs would be overwritten); "
                          "pass --overwrite or choose another --output")
    predictor = open_predictor(run_dirs, checkpoint, mesh, plan=plan, model=model, mirror_axes=mirror_axes,
                               postprocessing=postprocessing)
    todo = [(case_id, paths) for case_id, paths in inputs if case_id not in done]
    problems = check_inputs(todo, channels=predictor.in_channels)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise MedsegError(f"{problems[0][2]}{more}; nothing written; pass --skip-bad to predict the good inputs")
    if done:
        log.info("%d of %d outputs already predicted with these models: skipped (--overwrite predicts them again)",
                 len(done), len(inputs))
    bad = {case_id for case_id, _, _ in problems}
    todo = [(case_id, paths) for case_id, paths in todo if case_id not in bad]
    reference = None
    if qc:
        first = predictor.members[0]
        if isinstance(first, RunMember):
            reference = qc_lib.training_reference(qc_lib.training_store(first.config, first.path), str(first.path))

    if pre_annotations:
        annotations_dir.mkdir(parents=True, exist_ok=True)
        annotations.write_itksnap_labels(annotations_dir / "labels.txt", predictor.label_names)

    def write(case_id, paths, labels, probabilities, geometry, uncertainty_map=None):
        target = targets[case_id]
        if uncertainty_map is not None:  # (before the label map, whose presence marks the case done)
            seg_path, uncertainty_path = annotation_paths(annotations_dir, case_id)
            annotations.write_seg_nrrd(seg_path, labels, geometry, predictor.label_names)
            nifti.write_image(uncertainty_path, uncertainty_map[..., None].astype(np.float32), geometry)
        fileio.remove_temporaries(target)  # what a killed earlier run left half-written
        # Recorded before the output is renamed into place: after a kill at any moment, an output that exists is
        # complete and recorded, so the re-run skips it.
        record[target.name] = _source(models, paths)
        fileio.write_json(record_path, record)
        if probabilities is not None:
            probabilities_path = output_dir / probabilities_name(case_id)
            fileio.remove_temporaries(probabilities_path)
            write_probabilities(probabilities_path, probabilities, geometry, predictor.plans["labels"],
                               predictor.regions)
        write_prediction(target, labels, geometry, paths, output_format, predictor.label_names)
        stat = target.stat()
        record[target.name].update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        fileio.write_json(record_path, record)
        return str(target)

    written = []
    # 2D pictures carry no pixel size: they are read at the one the training pictures had (dataset.json spacing_2d)
    spacing_2d = predictor.plans.get("spacing_2d")
    with concurrent.futures.ThreadPoolExecutor(1) as reader, concurrent.futures.ThreadPoolExecutor(1) as writer:
        reads = [reader.submit(formats.read_images, paths, spacing_2d) for _, paths in todo[:1]]
        pending_write = None
        for index, (case_id, paths) in enumerate(tqdm(todo, desc="predicting", unit="case")):
            image, geometry = reads[index].result()
            if index + 1 < len(todo):
                reads.append(reader.submit(formats.read_images, todo[index + 1][1], spacing_2d))
            reads[index] = None  # (the image is ours now; let the reader's copy go)
            statistics = (uncertainty.ViewStatistics(independent=bool(predictor.regions))
                          if qc or pre_annotations else None)
            labels, probabilities = predictor.predict_case(image, geometry, save_probabilities, statistics)
            if qc:
                qc_lib.save_case(qc_dir, case_id, *qc_lib.case_row(statistics, image, geometry, predictor.plans,
                                                                   predictor.regions, reference))
            if pending_write is not None:
                written.append(pending_write.result())
            uncertainty_map = statistics.maps()["entropy"] if pre_annotations else None
            pending_write = writer.submit(write, case_id, paths, labels, probabilities, geometry, uncertainty_map)
        if pending_write is not None:
            written.append(pending_write.result())
    if qc:
        kept = {case_id: qc_lib.load_case(qc_dir, case_id) for case_id, _ in inputs if case_id not in bad}
        rows = [{"case": case_id, "file": str(paths[0]), **kept[case_id][0]} for case_id, paths in inputs
                if case_id not in bad]
        qc_lib.write_report(rows, {c: v[1] for c, v in kept.items()}, qc_dir, predictor.label_names,
                            ood_threshold=qc_lib.OOD_THRESHOLD if ood_threshold is None else ood_threshold,
                            models=models, reference=None if reference is None else
                            {"store": reference["store"], "cases": reference["cases"]})
    return {"written": written, "skipped": sorted(str(targets[c]) for c in done),
            "failed": [{"case": c, "problem": m} for c, _, m in problems]}


# --- medseg ensemble: saved probability folders averaged ------------------------------------------------------------

def _load_probabilities(path: Path) -> tuple[np.ndarray, Geometry, dict, list | None]:
    try:
        with np.load(path) as saved:
            probabilities = saved["probabilities"].astype(np.float32)
            geometry = Geometry.from_dict(json.loads(str(saved["geometry"])))
            labels, regions = json.loads(str(saved["labels"])), json.loads(str(saved["regions"]))
    except (OSError, ValueError, KeyError) as exc:
        raise MedsegError(f"{path}: not probabilities saved by `medseg predict --save-probabilities` ({exc})") from None
    return probabilities, geometry, labels, regions


def ensemble(folders: Sequence[str | Path], output_dir: str | Path, *, postprocessing: dict | None = None,
             overwrite: bool = False, save_probabilities: bool = False) -> dict:
    """Averages the probabilities that `medseg predict --save-probabilities` saved in several folders (the same cases
    in each) and writes the label maps (NIfTI, in each scan's geometry) into `output_dir`. Everything is checked before
    anything is written: the same cases and labels everywhere, no output overwritten unless `overwrite`."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise MedsegError("medseg ensemble needs at least two folders of saved probabilities")
    cases = []
    for folder in folders:
        if not folder.is_dir():
            raise MedsegError(f"{folder}: folder not found")
        found = sorted(p.name[:-len(".npz")] for p in folder.glob("*.npz"))
        if not found:
            raise MedsegError(f"{folder}: no saved probabilities (CASE.npz from `medseg predict "
                              "--save-probabilities`)")
        cases.append(found)
    for folder, found in zip(folders[1:], cases[1:]):
        if found != cases[0]:
            missing = sorted(set(cases[0]) ^ set(found))
            raise MedsegError(f"{folder}: holds other cases than {folders[0]} (differ: {', '.join(missing[:5])})")
    check_rules(postprocessing, "--postprocessing")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, [(None, folders)])
    targets = {case_id: output_dir / f"{case_id}.nii.gz" for case_id in cases[0]}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists ({len(existing)} outputs would be overwritten); "
                          "pass --overwrite or choose another --output")
    first_labels = None
    for folder in folders:  # labels agree everywhere: checked on the first case before any work
        _, _, labels, regions = _load_probabilities(folder / f"{cases[0][0]}.npz")
        if first_labels is None:
            first_labels = (labels, regions)
        elif (labels, regions) != first_labels:
            raise MedsegError(f"{folder}: probabilities of labels {labels} differ from {folders[0]}'s "
                              f"{first_labels[0]}; an ensemble needs the same labels")
    written = []
    for case_id in tqdm(cases[0], desc="ensembling", unit="case"):
        total, geometry = None, None
        for folder in folders:
            probabilities, case_geometry, labels, regions = _load_probabilities(folder / f"{case_id}.npz")
            if (labels, regions) != first_labels or (total is not None and probabilities.shape != total.shape):
                raise MedsegError(f"{folder / (case_id + '.npz')}: other labels or grid than in {folders[0]}")
            total = probabilities if total is None else total + probabilities
            geometry = geometry or case_geometry
        mean = to_canonical(total / len(folders), geometry)
        labels = labels_of_probabilities(mean, first_labels[1])
        labels = postprocess(labels.astype(label_dtype(labels)), postprocessing, geometry.spacing)
        fileio.remove_temporaries(targets[case_id])
        if save_probabilities:
            write_probabilities(output_dir / probabilities_name(case_id), mean, geometry, first_labels[0],
                               first_labels[1])
        nifti.write_label(targets[case_id], labels, geometry)
        written.append(str(targets[case_id]))
    return {"written": written}
