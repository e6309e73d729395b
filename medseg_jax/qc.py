"""Quality control of predictions: per case, how sure the models are (medseg_jax/metrics/uncertainty.py), whether its
structures have the sizes training saw, and whether the scan looks like the training scans; ranked, with a report
and a montage. `medseg rank` (medseg_jax/rank.py) computes it from many test-time views; `medseg predict --qc` from
the views prediction computes anyway (the ensemble's members).

Per case:

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
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, viz
from medseg_jax.data import preprocess
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.infer.postprocess import labels_of_probabilities
from medseg_jax.metrics import uncertainty

log = logging.getLogger(__name__)

COLUMNS = ("entropy", "mutual_information", "disagreement", "volume_z", "ood")
OUTPUTS = ("ranking.csv", "report.json", "montage.png")
MAX_REFERENCE_CASES = 60
OOD_THRESHOLD = 3.0


def check_out_dir(out_dir: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuses, before anything is computed, a file in the way or an earlier report (unless `overwrite`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsegError(f"{flag} {out_dir}: is a file, not a folder")
    existing = [out_dir / name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists; pass --overwrite or choose another {flag}")


def training_store(config, run_path: str | Path) -> str:
    """Where a run's training cases are: its config's store, or the store training prepared inside the run."""
    return config.data.get("store") or str(Path(run_path) / "store")


def save_case(qc_dir: Path, case_id: str, row: dict, shown: dict) -> None:
    """A case's row and montage slices, kept so that an interrupted `medseg predict --qc` reports every case."""
    cases = qc_dir / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(cases / f"{case_id}.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, image=shown["image"], labels=shown["labels"], entropy=shown["entropy"],
                            z=shown["z"])
    fileio.write_json(cases / f"{case_id}.json", _json_safe(row))


def load_case(qc_dir: Path, case_id: str) -> tuple[dict, dict] | None:
    """What `save_case` kept of a case, or None."""
    row_path, shown_path = qc_dir / "cases" / f"{case_id}.json", qc_dir / "cases" / f"{case_id}.npz"
    if not (row_path.is_file() and shown_path.is_file()):
        return None
    import json

    row = {k: (float("nan") if v is None and k in COLUMNS else v) for k, v in json.loads(row_path.read_text()).items()}
    with np.load(shown_path) as saved:
        shown = {k: saved[k] for k in ("image", "labels", "entropy")} | {"z": int(saved["z"])}
    return row, shown


def training_reference(store_path: str | Path, source: str) -> dict | None:
    """The training cases' structure volumes (ml, per class) and intensity profiles, from the store `source` (a
    run) trained on; None (with a warning) when that store is not on this machine."""
    try:
        store = Store(store_path)
    except MedsegError:
        log.warning("%s: its training store %s is not here: volume_z and ood left out", source, store_path)
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


def case_row(statistics: uncertainty.ViewStatistics, image: np.ndarray, geometry, plans: dict, regions,
             reference: dict | None) -> tuple[dict, dict]:
    """One scan's columns (and structure volumes) from its views, and what the montage shows of it."""
    consensus = labels_of_probabilities(statistics.mean_probabilities, regions)
    maps = statistics.maps()
    roi = uncertainty.region_of_interest(statistics.labels)
    within = roi if roi.any() else np.ones(roi.shape, bool)
    classes = sorted(int(c) for c in plans["labels"] if int(c) != 0)
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
        pre = preprocess.preprocess_case(image, geometry.spacing, plans)
        row["ood"] = uncertainty.intensity_ood_score(uncertainty.intensity_profile(pre.image),
                                                     reference["profiles"])
    row.update({f"volume_ml_{plans['labels'][str(c)]}": volumes[c] for c in classes})
    z = int(np.argmax(maps["entropy"].sum(axis=(0, 1))))  # the axial slice the model is least sure of
    shown = {"image": image[:, :, z, 0], "labels": consensus[:, :, z], "entropy": maps["entropy"][:, :, z], "z": z}
    return row, shown


def write_report(rows: list[dict], shown: dict, out_dir: Path, labels: dict[int, str], *, top: int = 6,
                 ood_threshold: float = OOD_THRESHOLD, **details) -> dict:
    """Ranks `rows` ({"case", "file", columns...}), writes ranking.csv, report.json (with `details`) and
    montage.png into `out_dir`; returns the report."""
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
    report = {"ranked_by": columns, "ood_threshold": ood_threshold, "cases": rows, **details,
              "labels": {str(k): v for k, v in labels.items()}}
    header = ["rank", "case", "priority", "flag", *COLUMNS, "views",
              *[k for k in rows[0] if k.startswith("volume_ml_")], "file"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (("" if not math.isfinite(v) else f"{v:.6g}") if isinstance(v, float) else v)
                         for k, v in row.items()})  # (a column a case has no value for is empty, as evaluate's)
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
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
