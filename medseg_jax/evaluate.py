"""Files in, reports out: one or several prediction folders against references, per case, class and metric.

    OUT/per_case.csv      prediction x case x class: Dice, IoU, precision, recall, volume difference, HD, HD95, ASSD,
                          NSD (distances in mm from the reference's voxel spacing), voxel counts
    OUT/summary.json      per prediction folder, class and metric: mean, median, std, defined n, undefined count;
                          paired Wilcoxon p-values between folders; top-level `mean_dice` / `per_class` (Dice) of the
                          first folder
    OUT/report.md         the same as tables
    OUT/boxplot_<m>.png   per-case values per class (and folder)

Undefined values (Dice with the class absent from both masks, as nnU-Net; surface distances with an empty mask) are
NaN in the CSV, left out of means and counted. Every file is read and checked before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio
from medseg_jax.errors import MedsegError
from medseg_jax.io import datasets, formats, nifti
from medseg_jax.metrics import report


def _find_dataset_json(ref_dir: Path, dataset_json: str | Path | None) -> tuple[Path, dict] | None:
    """(path, content) of the dataset.json given, or beside or above the references; None without one."""
    candidates = [Path(dataset_json)] if dataset_json else [ref_dir / "dataset.json", ref_dir.parent / "dataset.json"]
    for path in candidates:
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise MedsegError(f"{path}: not valid JSON ({exc})") from None
        if dataset_json:
            raise MedsegError(f"{path}: dataset.json not found")
    return None


def _image_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedsegError(f"{folder}: {role} folder not found")
    files = {p.name: p for p in sorted(folder.iterdir())
             if formats.ending_of(p.name) is not None and not p.name.startswith(".") and p.is_file()}
    if not files:
        raise MedsegError(f"{folder}: no .nii/.nii.gz files (nor {', '.join(formats.ENDINGS[2:])}) in the {role} "
                          "folder")
    return files


METRICS = ("dice", "iou", "precision", "recall", "hd", "hd95", "assd", "nsd")
UNITS = {"hd": "mm", "hd95": "mm", "assd": "mm"}


def _case_id(name: str) -> str:
    ending = formats.ending_of(name)
    return name[: -len(ending)] if ending else name


def _evaluate_one(task) -> tuple[list[dict], str | None]:
    """Reads one (prediction, reference) pair and scores it; returns (rows, problem). Runs in worker processes."""
    from medseg_jax.metrics import evaluate_case

    prediction, pred_path, ref_path, names, classes, tolerance_mm, surface, *spacing_2d = task
    spacing_2d = spacing_2d[0] if spacing_2d else None  # mm per pixel of 2D pictures (dataset.json's spacing_2d)
    try:
        ref, ref_geometry = formats.read_label(ref_path, spacing_2d)
        pred, pred_geometry = formats.read_label(pred_path, spacing_2d)
        # Prediction and reference must share one grid, so comparing their canonical arrays compares the files.
        nifti.check_same_grid(ref_geometry, pred_geometry, ref_path, pred_path)
        if names is not None:
            datasets.check_declared_labels(ref, names, ref_path)
            datasets.check_declared_labels(pred, names, pred_path)
            present = classes
        else:
            present = sorted(({int(v) for v in np.unique(ref)} | {int(v) for v in np.unique(pred)}) - {0})
        scores = evaluate_case(pred, ref, ref_geometry.spacing, present, tolerance_mm=tolerance_mm, surface=surface)
    except MedsegError as exc:
        return [], str(exc)
    rows = []
    for label in present:
        rows.append({"prediction": prediction, "case": _case_id(Path(ref_path).name), "label": label,
                     "name": names[label] if names else str(label), **scores[label]})
    return rows, None


def score_files(tasks: list[tuple], workers: int = 1) -> list[dict]:
    """Scores (prediction name, prediction file, reference file, label names, classes, NSD tolerance mm, surface
    convention) tasks, in `workers` processes; raises MedsegError naming the first unreadable or mismatched file."""
    rows, problems = [], []
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(tqdm(pool.map(_evaluate_one, tasks), total=len(tasks), desc="evaluating", unit="case"))
    else:
        results = [_evaluate_one(t) for t in tqdm(tasks, desc="evaluating", unit="case")]
    for case_rows, problem in results:
        rows.extend(case_rows)
        if problem:
            problems.append(problem)
    if problems:
        raise MedsegError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
    return rows


def evaluate(pred_dirs, ref_dir, out_dir, *, dataset_json=None, overwrite: bool = False, tolerance_mm: float = 1.0,
             surface: str = "surfel", workers: int = 1) -> dict:
    """Scores every prediction folder in `pred_dirs` (a path or a list) against `ref_dir`; writes the reports into
    `out_dir` and returns summary.json's content."""
    pred_dirs = [Path(p) for p in ([pred_dirs] if isinstance(pred_dirs, (str, Path)) else pred_dirs)]
    ref_dir, out_dir = Path(ref_dir), Path(out_dir)
    if surface not in ("surfel", "voxel"):
        raise MedsegError(f"--surface {surface}: must be surfel (DeepMind surface-distance) or voxel (MONAI)")
    if not tolerance_mm > 0:
        raise MedsegError(f"--tolerance {tolerance_mm}: the NSD tolerance must be a positive distance in mm")
    outputs = [out_dir / "per_case.csv", out_dir / "summary.json", out_dir / "report.md"]
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists; pass --overwrite or choose another --out")
    refs = _image_files(ref_dir, "reference")
    labels_of = {}
    for index, pred_dir in enumerate(pred_dirs):
        label = pred_dir.name or str(pred_dir)
        labels_of[pred_dir] = label if label not in labels_of.values() else f"{label}#{index + 1}"
        preds = _image_files(pred_dir, "prediction")
        missing, extra = sorted(set(refs) - set(preds)), sorted(set(preds) - set(refs))
        if missing:
            raise MedsegError(f"{ref_dir / missing[0]}: no prediction for this reference in {pred_dir} "
                              f"({len(missing)} missing)")
        if extra:
            raise MedsegError(f"{pred_dir / extra[0]}: no reference for this prediction in {ref_dir} "
                              f"({len(extra)} extra)")
    found = _find_dataset_json(ref_dir, dataset_json)
    names = datasets.parse_labels(found[0], found[1].get("labels")) if found else None
    classes = [c for c in sorted(names) if c != 0] if names else None
    # distances of 2D pictures in mm, as the dataset gives their pixel size (else pixels)
    spacing_2d = datasets.parse_spacing_2d(found[0], found[1].get("spacing_2d")) if found else None
    tasks = [(labels_of[d], d / name, refs[name], names, classes, float(tolerance_mm), surface, spacing_2d)
             for d in pred_dirs for name in sorted(refs)]

    rows = score_files(tasks, workers)
    if names is None:  # no dataset.json: the classes found in any file
        found = sorted({r["label"] for r in rows})
        names = {0: "0", **{c: str(c) for c in found}}
        classes = found
        # cases without a class get NaN rows so that every case counts for every class
        present = {(r["prediction"], r["case"], r["label"]) for r in rows}
        for prediction in labels_of.values():
            for name in sorted(refs):
                for c in classes:
                    if (prediction, _case_id(name), c) not in present:
                        rows.append({"prediction": prediction, "case": _case_id(name), "label": c, "name": str(c),
                                     **{m: float("nan") for m in METRICS}, "ref_voxels": 0, "pred_voxels": 0})
    order = {p: i for i, p in enumerate(labels_of.values())}
    rows.sort(key=lambda r: (order[r["prediction"]], r["case"], r["label"]))

    stats = report.summarize(rows, METRICS)
    comparisons = report.wilcoxon_comparisons(rows, METRICS) if len(pred_dirs) > 1 else []
    first = stats[next(iter(labels_of.values()))]
    dice = {name: c["dice"]["mean"] for name, c in first["per_class"].items()}
    summary = {
        "mean_dice": first["foreground_mean"]["dice"],
        "per_class": dice,
        "num_cases": len(refs),
        "labels": {str(c): names[c] for c in classes},
        "cases_with_class_absent_in_both": {name: c["dice"]["undefined"] for name, c in first["per_class"].items()},
        "surface": surface, "tolerance_mm": float(tolerance_mm),
        "predictions": {p: str(d) for d, p in labels_of.items()},
        "metrics": stats,
        "comparisons": comparisons,
    }
    columns = ["prediction", "case", "label", "name", *METRICS]
    extra_columns = [k for k in rows[0] if k not in columns] if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + extra_columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (format_number(v) if isinstance(v, float) else v) for k, v in row.items()})
    convention = ("surfel: surface elements as DeepMind's surface-distance" if surface == "surfel"
                  else "voxel: boundary voxels as MONAI")
    notes = [f"references: {ref_dir}", f"surface distances in mm, convention {convention}; NSD at "
             f"{tolerance_mm:g} mm", "undefined values (empty masks) are left out of means and counted"]
    out_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out_dir / "per_case.csv", buffer.getvalue())
    fileio.write_json(out_dir / "summary.json", summary)
    fileio.write_text(out_dir / "report.md", report.markdown(stats, comparisons, METRICS, notes))
    for metric in METRICS:
        report.box_plot(rows, metric, out_dir / f"boxplot_{metric}.png", UNITS.get(metric, ""))
    return summary


def format_number(value: float) -> str:
    """How reports write a number: 6 significant digits, nan and inf by name."""
    return "nan" if np.isnan(value) else ("inf" if np.isinf(value) else f"{value:.6g}")
