"""`medseg prepare`: validate a raw dataset, fingerprint and plan it, and write every case into a zarr3 store.

    validate + fingerprint (read every case once; nothing written)
      -> a problem anywhere: a report with one line per bad case, exit 2, nothing written
         (with skip_bad: the good cases go on and the report is written into the store)
      -> plan -> store header (fingerprint.json, plans.json, prepare.json)
      -> preprocess each case (crop, normalise, resample) -> cases/<id> written atomically
      -> manifest.json

Interrupted? Run the same command again: it checks that the source files and the data config are unchanged (sizes and
modification times in prepare.json), drops any half-written case, and prepares only the cases not yet in the store.
The result is byte-identical to an uninterrupted run. Memory is bounded by the largest case times the worker count:
workers hold one case at a time and send back only small records.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medseg_jax import config as config_lib
from medseg_jax import fileio
from medseg_jax.data import fingerprint as fp
from medseg_jax.data import preprocess
from medseg_jax.data import store as store_lib
from medseg_jax.data.cases import load_case
from medseg_jax.errors import MedsegError
from medseg_jax.io import datasets
from medseg_jax.io.datasets import Problem

log = logging.getLogger(__name__)

MAX_LOCATIONS_PER_CLASS = 10_000
MIN_LOCATION_COVERAGE = 0.01
_CONFIG_KEYS = ("target_spacing", "anisotropy_threshold", "normalization", "label_resampling", "chunk_shape")


class ValidationFailed(MedsegError):
    """Some cases are bad; `report` holds one line per bad case."""

    def __init__(self, message: str, problems: Sequence[Problem]):
        super().__init__(message)
        self.problems = list(problems)
        self.report = [p.line() for p in self.problems]


def report_tsv(problems: Sequence[Problem]) -> str:
    def clean(text):
        return str(text).replace("\t", " ").replace("\n", " ")
    return "case\tfile\tproblem\n" + "".join(f"{clean(p.case)}\t{clean(p.file)}\t{clean(p.problem)}\n"
                                              for p in problems)


# --- per-case work (runs in worker processes) ----------------------------------------------------------------------

def _relative(path: Path, root: Path | None) -> str:
    if root is None:
        return str(Path(path).absolute())
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def validate_case(case: datasets.Case, declared: Sequence[int], channels: int | None = None,
                  label_names: dict[int, str] | None = None) -> tuple[str, dict | None, Problem | None]:
    """Reads and checks one case (including its channel count against dataset.json's); returns its fingerprint or its
    problem. `label_names` match a Slicer segmentation's segments to the labels."""
    try:
        loaded = load_case(case, declared, label_names)
        if channels is not None and loaded.image.shape[-1] != channels:
            raise MedsegError(f"{case.image_paths[0]}: {loaded.image.shape[-1]} channels, dataset.json declares "
                              f"{channels}")
        record = fp.case_fingerprint(case.case_id, loaded.image, loaded.label, loaded.geometry.spacing)
    except MedsegError as error:
        return case.case_id, None, Problem.from_error(case.case_id, error, case.image_paths[0])
    return case.case_id, record, None


def class_locations(label: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Foreground voxel coordinates sorted by class: at most 10,000 per class but at least 1% of its voxels (nnU-Net's
    rule), chosen at random (seeded) and kept in voxel order. Returns (locations (N, 3), {class: [offset, count]})."""
    rng = np.random.default_rng(seed)
    flat = label.ravel()
    indices = np.flatnonzero(flat > 0)
    values = flat[indices]
    order = np.argsort(values, kind="stable")
    indices, values = indices[order], values[order]
    chunks, offsets, offset = [], {}, 0
    for value in np.unique(values):
        members = indices[np.searchsorted(values, value, "left"):np.searchsorted(values, value, "right")]
        keep = min(len(members), max(MAX_LOCATIONS_PER_CLASS, int(np.ceil(len(members) * MIN_LOCATION_COVERAGE))))
        if keep < len(members):
            members = np.sort(rng.choice(members, keep, replace=False))
        chunks.append(np.stack(np.unravel_index(members, label.shape), axis=-1).astype(np.int32))
        offsets[str(int(value))] = [offset, len(members)]
        offset += len(members)
    locations = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.int32)
    return locations, offsets


def prepare_case(case: datasets.Case, root: Path, source_root: Path | None, plan: dict, declared: Sequence[int],
                 extra: dict | None = None) -> str:
    """Reads, preprocesses and writes one case into the store (atomically). Source paths are kept relative to
    `source_root` (absolute when None or outside it); `extra` joins the case's record (`data/add.py`: the version
    that added it, the folder of a replacing case)."""
    loaded = load_case(case, declared)
    pre = preprocess.preprocess_case(loaded.image, loaded.geometry.spacing, plan, loaded.label)
    # an unlabelled case (pretraining) stores an all-background label: it compresses to nothing, and every reader of
    # the store stays as it is
    label = pre.label if pre.label is not None else np.zeros(pre.image.shape[:3], np.uint8)
    locations, offsets = class_locations(label, fp.case_seed(case.case_id))
    counts = np.bincount(label.ravel().astype(np.int64))
    meta = {
        "case_id": case.case_id,
        "shape": [int(s) for s in pre.image.shape[:3]],
        "num_channels": int(pre.image.shape[-1]),
        "source": {"images": [_relative(p, source_root) for p in case.image_paths],
                   "label": _relative(case.label_path, source_root) if case.label_path is not None else None},
        "geometry": loaded.geometry.to_dict(),
        "canonical_shape": list(pre.canonical_shape),
        "spacing": list(loaded.geometry.spacing),
        "crop_box": pre.crop_box,
        "class_voxels": {str(c): int(n) for c, n in enumerate(counts) if n},
        "class_locations": offsets,
        **(extra or {}),
    }
    store_lib.write_case(root, case.case_id, pre.image, label, locations, meta, plan["chunk_shape"])
    return case.case_id


# --- orchestration --------------------------------------------------------------------------------------------------

def map_cases(fn, items: Sequence, workers: int, desc: str, args: tuple = ()):
    """Yields fn(item, *args) for each item (in completion order with workers > 1), with a progress bar."""
    if not items:
        return
    bar = tqdm(total=len(items), desc=desc, unit="case", dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item, *args)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")  # no fork: tensorstore and jax keep threads
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(fn, item, *args) for item in items]
            try:
                for future in concurrent.futures.as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


def describe_source(spec: datasets.DatasetSpec, cases: Sequence[datasets.Case]) -> dict:
    """Files of the prepared cases with size and modification time: a changed source is noticed on resume."""
    def stat(path: Path) -> list:
        paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return [[_relative(p, spec.root), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]

    json_path = spec.root / "dataset.json"
    files = ([[_relative(json_path, spec.root), json_path.stat().st_size, json_path.stat().st_mtime_ns]]
             if json_path.is_file() else [])  # (a folder of unlabelled images has none)
    for case in cases:
        for path in (*case.image_paths, case.label_path):
            if path is not None:
                files.extend(stat(path))
    return {"root": str(spec.root.absolute()), "files": files}


def data_config_record(data_config) -> dict:
    plain = config_lib.to_plain(data_config)
    return {key: plain.get(key) for key in _CONFIG_KEYS}


def _check_out(out: Path) -> bool:
    """True when `out` is an existing store (to resume); refuses folders that hold anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise MedsegError(f"{out}: exists and is not a folder; choose another --out")
    if store_lib.is_store(out):
        return True
    if any(out.iterdir()):
        raise MedsegError(f"{out}: folder is not empty and is not a medseg store; choose another --out")
    return False


def prepare(source, out, data_config=None, *, skip_bad: bool = False, workers: int = 1, unlabelled: bool = False,
            plan_from=None) -> dict:
    """Prepares the dataset folder `source` into the store `out`; returns a summary dict. One process at a time
    prepares a store (`fileio.exclusive`); a second gets one line naming the first.

    `unlabelled`: a store of images only, for `medseg pretrain`: dataset.json's "unlabelled" list (or the
    imagesUnlabelled folder), or every image of a plain folder of NIfTI files. `plan_from` (a labelled store) gives
    the plan (spacing, normalisation, channels) instead of planning from the images, so that pretraining sees the
    images as fine-tuning will (needed for a plain folder; recommended for CT, whose normalisation is planned from
    labelled foreground), or that every site of a federated run preprocesses alike (a labelled dataset must then
    have the plan's labels)."""
    data_config = data_config or fp.default_data_config()
    if workers < 1:
        raise MedsegError(f"--workers {workers}: must be at least 1")
    out = Path(out)
    with fileio.exclusive(out, "being prepared"):
        return _prepare(Path(source), out, data_config, skip_bad, workers, unlabelled,
                        None if plan_from is None else Path(plan_from))


def _unlabelled_source(source: Path, problems: list[Problem],
                       plan_store: store_lib.Store | None) -> datasets.DatasetSpec:
    """The dataset spec of an unlabelled preparation; its `unlabelled` cases are the ones to prepare."""
    if (source / "dataset.json").is_file():
        spec = datasets.load_dataset(source, problems=problems, require_training=False)
        if not spec.unlabelled and not problems:
            raise MedsegError(f"{source / 'dataset.json'}: lists no unlabelled images (an 'unlabelled' list of image "
                              "paths, or an imagesUnlabelled folder)")
        return spec
    if plan_store is None:
        raise MedsegError(f"{source}: a folder of images without dataset.json needs --plan-from STORE (a labelled "
                          "store whose plan the images follow: channels, spacing, normalisation)")
    channel_names = {int(k): v for k, v in plan_store.plan["channel_names"].items()}
    cases = tuple(datasets.Case(case_id, paths, None) for case_id, paths in datasets.list_nifti_inputs(source))
    return datasets.DatasetSpec(root=source, name=source.name, channel_names=channel_names, labels={0: "background"},
                                training=(), test=(), file_ending=".nii.gz", unlabelled=cases)


def _borrowed_plan(store: store_lib.Store, channels: int) -> tuple[dict, dict]:
    """(plan, data-config record) of the labelled store given by --plan-from, for a store that follows it."""
    if store.num_channels != channels:
        raise MedsegError(f"--plan-from {store.root}: its plan has {store.num_channels} channel(s), the images "
                          f"{channels}")
    record = json.loads((store.root / "prepare.json").read_text())["data_config"]
    return dict(store.plan), record


def _prepare(source: Path, out: Path, data_config, skip_bad: bool, workers: int, unlabelled: bool = False,
             plan_from: Path | None = None) -> dict:
    existing = _check_out(out)
    problems: list[Problem] = []
    plan_store = store_lib.Store(plan_from) if plan_from is not None else None
    if unlabelled:
        spec = _unlabelled_source(source, problems, plan_store)
        to_prepare = spec.unlabelled
    else:
        spec = datasets.load_dataset(source, problems=problems)
        to_prepare = spec.training
    declared = sorted(spec.labels)
    if declared != list(range(len(declared))):
        raise MedsegError(f"{spec.root / 'dataset.json'}: label values {declared} are not 0..K-1 (not supported "
                          "yet)")
    config_record = data_config_record(data_config)
    borrowed = _borrowed_plan(plan_store, len(spec.channel_names)) if plan_store is not None else None
    if borrowed is not None:  # the images follow the labelled store's data config, whatever this one says
        config_record = borrowed[1]
        labels = {str(k): v for k, v in sorted(spec.labels.items())}
        if not unlabelled and borrowed[0]["labels"] != labels:
            raise MedsegError(f"--plan-from {plan_from}: its labels {borrowed[0]['labels']} differ from "
                              f"{spec.root / 'dataset.json'}'s {labels}")

    header = None
    if existing and (out / "prepare.json").is_file():
        header = json.loads((out / "prepare.json").read_text())
        by_id = {c.case_id: c for c in to_prepare}
        cases = [by_id[i] for i in header["cases"] if i in by_id]
        if (len(cases) != len(header["cases"]) or header["source"] != describe_source(spec, cases)
                or header["data_config"] != config_record):
            raise MedsegError(f"{out}: this store was prepared from other source files or another data config; "
                              "choose a new --out (or delete this store to start over)")
        if not skip_bad and header["problems"]:
            raise MedsegError(f"{out}: this store was started with --skip-bad ({len(header['problems'])} bad cases "
                              "left out); run again with --skip-bad to finish it")
        plan = json.loads((out / "plans.json").read_text())
        problems = [Problem(**p) for p in header["problems"]]
        done = len(store_lib.completed_cases(out) & set(header["cases"]))
        if done < len(cases):
            log.info("resuming %s: %d of %d cases already prepared", out, done, len(cases))
    else:
        results = list(map_cases(validate_case, to_prepare, workers, "validating",
                            (declared, len(spec.channel_names))))
        records = {case_id: record for case_id, record, _ in results if record is not None}
        problems += [problem for _, _, problem in results if problem is not None]
        problems.sort(key=lambda p: (p.case, p.file))
        if problems and not skip_bad:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValidationFailed(f"{problems[0].line()}{more}; nothing written; fix the bad cases or pass --skip-bad "
                                   "to prepare the good ones", problems)
        cases = [c for c in to_prepare if c.case_id in records]
        if not cases:
            raise ValidationFailed(f"{spec.root}: no good {'unlabelled' if unlabelled else 'training'} cases; nothing "
                                   "written", problems)
        fingerprint = fp.aggregate([records[c.case_id] for c in cases], spec.labels, spec.channel_names)
        if borrowed is not None:
            plan = borrowed[0]
        else:
            plan = fp.make_plan(fingerprint, spec.labels, spec.channel_names, spec.modality, data_config)
        spacing_2d = {c.spacing_2d for c in cases} - {None}
        if spacing_2d:  # what 2D pictures to predict are read at (they carry no pixel size of their own)
            plan["spacing_2d"] = list(spacing_2d.pop())
        if spec.regions:  # region-based labels: training learns these (loss.regions), prediction paints them back
            plan["regions"] = [list(region) for region in spec.regions]
        if unlabelled:
            plan["labelled"] = False  # `medseg train` refuses the store; `medseg pretrain` reads its images
        if existing:  # a store whose header never finished: ours to clear
            shutil.rmtree(out)
        store_lib.create_root(out)
        fileio.write_json(out / "fingerprint.json", fingerprint)
        fileio.write_json(out / "plans.json", plan)
        if problems:
            fileio.write_text(out / "validation_report.tsv", report_tsv(problems))
        header = {"format": store_lib.FORMAT, "dataset": spec.name, "source": describe_source(spec, cases),
                  "data_config": config_record, "cases": [c.case_id for c in cases],
                  "problems": [p.__dict__ for p in problems]}
        fileio.write_json(out / "prepare.json", header)  # last: its presence marks a resumable store

    store_lib.remove_partial_cases(out)
    newest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    if newest.get("version", 1) > 1:  # complete, and cases were added since (`medseg dataset add`): kept as it is
        return {"store": str(out), "cases": len(newest["cases"]), "prepared_now": 0, "problems": problems,
                "plan": plan}
    done = store_lib.completed_cases(out)
    todo = [c for c in cases if c.case_id not in done]
    for _ in map_cases(prepare_case, todo, workers, "preparing", (out, spec.root, plan, declared)):
        pass
    manifest = {"format": store_lib.FORMAT, "dataset": spec.name, "source_root": str(spec.root.absolute()),
                "cases": [store_lib.read_case_meta(out, c.case_id) for c in sorted(cases, key=lambda c: c.case_id)]}
    fileio.write_json(out / "manifest.json", manifest)
    return {"store": str(out), "cases": len(cases), "prepared_now": len(todo), "problems": problems, "plan": plan}


def format_plan(plan: dict) -> str:
    norms = ", ".join(n["scheme"] for n in plan["normalization"])
    spacing = "x".join(f"{v:.3g}" for v in plan["target_spacing"])
    shape = "x".join(str(v) for v in plan.get("median_shape_after_resampling", []))
    return f"target spacing {spacing} mm, median shape {shape}, normalisation {norms}"

