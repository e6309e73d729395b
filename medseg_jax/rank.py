"""`medseg rank`: which predictions to check, and which scans to annotate next, first.

Every scan is predicted in several test-time views: each model of the ensemble (`--run` several times, or an
inference plan) times each mirroring of the input (the axes the model was trained to mirror, or `--mirror-axes`).
Per case, from the views' class probabilities on the scan's grid (medseg_jax/metrics/uncertainty.py):

    entropy              mean normalised predictive entropy over the voxels some view calls foreground
    mutual_information   its part the views disagree on (BALD), over the same voxels (NaN with one view)
    disagreement         1 - mean Dice of each view's structures with the consensus's (NaN with one view)
    volume_z             the mean over structures of |z| of their log-volume against the training cases' (the
                         run's store)
    ood                  how unlike the training scans its preprocessed intensities are (percentiles, z-scored)

and `priority`, the mean of the case's percentile ranks in these columns among the cases ranked together (each
column counts alike whatever its scale). Scans whose `ood` exceeds `ood_threshold` (3: their intensities lie
three training spreads away) are flagged and come first whatever their priority: a wrong series, another modality
or a broken scan gives a confident-looking prediction as often as an unsure one. The consensus is the argmax of
the views' mean probabilities, as an ensemble predicts.

    OUT/ranking.csv    one row per case, highest priority first, with every column and the structure volumes (ml)
    OUT/report.json    the same, with the views, the reference (training cases used) and the settings
    OUT/montage.png    the top cases: the axial slice of highest entropy, with the consensus and the entropy map
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, runs, viz
from medseg_jax.data import preprocess
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.infer.postprocess import labels_of_probabilities
from medseg_jax.infer.tta import mirror_combinations
from medseg_jax.io import datasets, nifti
from medseg_jax.metrics import uncertainty
from medseg_jax.predict import RunMember, check_inputs, configured_mirror_axes, read_plan

log = logging.getLogger(__name__)

COLUMNS = ("entropy", "mutual_information", "disagreement", "volume_z", "ood")
OUTPUTS = ("ranking.csv", "report.json", "montage.png")
MAX_REFERENCE_CASES = 60
OOD_THRESHOLD = 3.0


def _members(run_dirs: Sequence[str | Path], plan, checkpoint: str, mirror_axes, mesh) -> list[tuple]:
    """(member without fused mirroring, the flips of its views) per model."""
    if plan is not None:
        content = read_plan(plan)
        run_dirs, checkpoint = [Path(plan).parent / r for r in content["runs"]], content.get("checkpoint", "latest")
    if not run_dirs:
        raise MedsegError("give the models as --run RUN [--run RUN ...] or --plan PLAN.json")
    members = []
    for run_dir in run_dirs:
        member = RunMember(run_dir, checkpoint, mesh, mirror_axes=())
        dims = len(member.patch)
        axes = configured_mirror_axes(member.config) if mirror_axes is None else mirror_axes
        members.append((member, mirror_combinations([a for a in axes if int(a) < dims])))
    first = members[0][0]
    for member, _ in members[1:]:
        if member.plans["labels"] != first.plans["labels"] or member.regions != first.regions:
            raise MedsegError(f"{member.path}: predicts other labels than {first.path}; rank one task at a time")
    return members


def training_reference(member: RunMember) -> dict | None:
    """The training cases' structure volumes (ml, per class) and intensity profiles, from the store the first run
    trained on; None (with a warning) when that store is not on this machine."""
    store_path = member.config.data.get("store") or str(runs.RunDir(member.path).path / "store")
    try:
        store = Store(store_path)
    except MedsegError:
        log.warning("%s: the run's store %s is not here: volume_z and ood left out", member.path, store_path)
        return None
    if not store.labelled:
        return None
    voxel_ml = float(np.prod(store.plan["target_spacing"])) / 1000.0
    classes = [int(c) for c in store.plan["labels"] if int(c) != 0]
    volumes: dict[int, list[float]] = {c: [] for c in classes}
    profiles = []
    case_ids = store.case_ids[:MAX_REFERENCE_CASES]
    for case_id in tqdm(case_ids, desc="reading the training cases", unit="case", leave=False):
        image, label = store.read_case(case_id)
        counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=max(classes, default=0) + 1)
        for c in classes:
            volumes[c].append(float(counts[c]) * voxel_ml)
        profiles.append(uncertainty.intensity_profile(image))
    return {"store": str(store.root), "cases": len(case_ids), "volumes_ml": volumes, "profiles": profiles}


def score_case(members, image: np.ndarray, geometry, reference: dict | None) -> tuple[dict, dict]:
    """One scan's columns (and volumes), and what the montage shows of it."""
    first = members[0][0]
    regions = first.regions
    statistics = uncertainty.ViewStatistics(independent=bool(regions))
    for member, flips in members:
        for probabilities in member.views_on_scan(image, geometry, flips):
            statistics.add(probabilities, labels_of_probabilities(probabilities, regions))
    consensus = labels_of_probabilities(statistics.mean_probabilities, regions)
    maps = statistics.maps()
    roi = uncertainty.region_of_interest(statistics.labels)
    within = roi if roi.any() else np.ones(roi.shape, bool)
    classes = sorted(int(c) for c in first.plans["labels"] if int(c) != 0)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    volumes = {c: float((consensus == c).sum()) * voxel_ml for c in classes}
    row = {"entropy": float(maps["entropy"][within].mean()),
           "mutual_information": float(maps["mutual_information"][within].mean()) if statistics.count > 1
           else float("nan"),
           "disagreement": uncertainty.disagreement(statistics.labels, consensus, classes),
           "views": statistics.count, "volume_z": float("nan"), "ood": float("nan")}
    if reference is not None:
        scores = uncertainty.volume_z_scores(volumes, reference["volumes_ml"], floor_ml=voxel_ml)
        row["volume_z"] = float(np.mean([abs(z) for z in scores.values()])) if scores else float("nan")
        pre = preprocess.preprocess_case(image, geometry.spacing, first.plans)
        row["ood"] = uncertainty.intensity_ood_score(uncertainty.intensity_profile(pre.image),
                                                     reference["profiles"])
    row.update({f"volume_ml_{first.plans['labels'][str(c)]}": volumes[c] for c in classes})
    z = int(np.argmax(maps["entropy"].sum(axis=(0, 1))))  # the axial slice the model is least sure of
    shown = {"image": image[:, :, z, 0], "labels": consensus[:, :, z], "entropy": maps["entropy"][:, :, z], "z": z}
    return row, shown


def rank(run_dirs: Sequence[str | Path] = (), input_path=None, out_dir=None, *, plan=None, checkpoint: str = "best",
         mirror_axes: Sequence[int] | None = None, mesh: dict | None = None, top: int = 6, overwrite: bool = False,
         skip_bad: bool = False, ood_threshold: float = OOD_THRESHOLD) -> dict:
    """Ranks the scans under `input_path` (see the module docstring); returns report.json's content."""
    inputs = datasets.list_nifti_inputs(input_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsegError(f"--out {out_dir}: is a file, not a folder")
    existing = [out_dir / name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists; pass --overwrite or choose another --out")
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if plan is not None and run_dirs:
        raise MedsegError("give the models as --run RUN [--run RUN ...] or --plan PLAN.json, not both")
    members = _members(run_dirs, plan, checkpoint, mirror_axes, mesh)
    first = members[0][0]
    problems = check_inputs(inputs, channels=first.in_channels)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise MedsegError(f"{problems[0][2]}{more}; nothing written; pass --skip-bad to rank the good inputs")
    bad = {case_id for case_id, _, _ in problems}
    todo = [(case_id, paths) for case_id, paths in inputs if case_id not in bad]
    if not todo:
        raise MedsegError(f"{input_path}: no scan to rank")
    reference = training_reference(first)

    rows, shown = [], {}
    for case_id, paths in tqdm(todo, desc="ranking", unit="case"):
        image, geometry = nifti.read_images(paths)
        row, shown[case_id] = score_case(members, image, geometry, reference)
        rows.append({"case": case_id, "file": str(paths[0]), **row})
    columns = [c for c in COLUMNS if any(math.isfinite(r[c]) for r in rows)]
    ranks = np.stack([uncertainty.percentile_ranks([r[c] for r in rows]) for c in columns])
    for row, case_ranks in zip(rows, ranks.T):
        finite = case_ranks[np.isfinite(case_ranks)]
        row["priority"] = float(finite.mean()) if finite.size else float("nan")
        row["flag"] = (f"intensities unlike the training scans (ood {row['ood']:.1f})"
                       if math.isfinite(row["ood"]) and row["ood"] > ood_threshold else "")
    rows.sort(key=lambda r: (not r["flag"], -r["priority"] if math.isfinite(r["priority"]) else math.inf, r["case"]))
    for position, row in enumerate(rows, start=1):
        row["rank"] = position

    labels = {int(k): str(v) for k, v in first.plans["labels"].items()}
    report = {"ranked_by": columns, "ood_threshold": ood_threshold, "cases": rows,
              "failed": [{"case": c, "problem": m} for c, _, m in problems],
              "models": [{"run": str(m.path), "checkpoint": m.checkpoint, "flips": [list(f) for f in flips]}
                         for m, flips in members],
              "reference": None if reference is None else {"store": reference["store"], "cases": reference["cases"]},
              "labels": {str(k): v for k, v in labels.items()}}
    header = ["rank", "case", "priority", "flag", *COLUMNS, "views",
              *[k for k in rows[0] if k.startswith("volume_ml_")], "file"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out_dir / "ranking.csv", buffer.getvalue())
    fileio.write_json(out_dir / "report.json", _json_safe(report))
    viz.uncertainty_montage_png([(r["case"], r["priority"], shown[r["case"]]) for r in rows[:max(1, top)]],
                                out_dir / "montage.png", labels)
    return report


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
