"""Files in, reports out: predictions against references, per case and per class.

`per_case.csv` has one row per case and foreground class; `summary.json` has the mean Dice per class and over
foreground classes. Dice is NaN for a class absent from both prediction and reference (it is undefined) and such cases
are left out of that class's mean, as nnU-Net does; `summary.json` counts them per class.
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
from medseg_jax.io import layout, nifti
from medseg_jax.metrics.overlap import dice_per_class, nanmean


def _find_label_names(ref_dir: Path, dataset_json: str | Path | None) -> dict[int, str] | None:
    candidates = [Path(dataset_json)] if dataset_json else [ref_dir / "dataset.json", ref_dir.parent / "dataset.json"]
    for path in candidates:
        if path.is_file():
            try:
                labels = json.loads(path.read_text()).get("labels")
            except json.JSONDecodeError as exc:
                raise MedsegError(f"{path}: not valid JSON ({exc})") from None
            return layout.parse_labels(path, labels)
        if dataset_json:
            raise MedsegError(f"{path}: dataset.json not found")
    return None


def _nifti_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedsegError(f"{folder}: {role} folder not found")
    files = {p.name: p for p in sorted(folder.iterdir()) if p.name.endswith((".nii.gz", ".nii"))}
    if not files:
        raise MedsegError(f"{folder}: no .nii/.nii.gz files in the {role} folder")
    return files


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined mean is written as null."""
    return None if np.isnan(value) else float(value)


def evaluate(pred_dir, ref_dir, out_dir, *, dataset_json=None, overwrite: bool = False) -> dict:
    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    outputs = [out_dir / "per_case.csv", out_dir / "summary.json"]
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists; pass --overwrite or choose another --out")
    preds, refs = _nifti_files(pred_dir, "prediction"), _nifti_files(ref_dir, "reference")
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    if missing:
        raise MedsegError(f"{ref_dir / missing[0]}: no prediction for this reference in {pred_dir} "
                          f"({len(missing)} missing)")
    if extra:
        raise MedsegError(f"{pred_dir / extra[0]}: no reference for this prediction in {ref_dir} ({len(extra)} extra)")

    names = _find_label_names(ref_dir, dataset_json)
    loaded = []
    for name in tqdm(sorted(refs), desc="reading", unit="case", leave=False):
        # Prediction and reference must share one grid, so comparing their canonical arrays compares the files.
        ref, ref_geometry = nifti.read_label(refs[name])
        pred, pred_geometry = nifti.read_label(preds[name])
        nifti.check_same_grid(ref_geometry, pred_geometry, refs[name], preds[name])
        loaded.append((name, pred, ref))
    if names is None:
        values = sorted({int(v) for _, _, ref in loaded for v in np.unique(ref)} | {0})
        names = {v: str(v) for v in values}
    if names:
        for name, pred, ref in loaded:
            for array, folder in ((ref, ref_dir), (pred, pred_dir)):
                layout.check_declared_labels(array, names, folder / name)
    classes = [c for c in sorted(names) if c != 0]

    rows = []
    for name, pred, ref in tqdm(loaded, desc="evaluating", unit="case"):
        scores = dice_per_class(pred, ref, classes)
        for c in classes:
            rows.append({"case": name.replace(".nii.gz", "").replace(".nii", ""), "label": c,
                         "name": names[c], "dice": scores[c],
                         "ref_voxels": int((ref == c).sum()), "pred_voxels": int((pred == c).sum())})

    per_class = {}
    undefined = {}
    for c in classes:
        values = [r["dice"] for r in rows if r["label"] == c]
        per_class[names[c]] = nanmean(values)
        undefined[names[c]] = int(sum(np.isnan(values)))
    summary = {"mean_dice": _finite_or_none(nanmean(per_class.values())),
               "per_class": {k: _finite_or_none(v) for k, v in per_class.items()}, "num_cases": len(loaded),
               "labels": {str(c): names[c] for c in classes}, "cases_with_class_absent_in_both": undefined}

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "label", "name", "dice", "ref_voxels", "pred_voxels"])
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "dice": "nan" if np.isnan(row["dice"]) else f"{row['dice']:.6f}"})
    out_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out_dir / "per_case.csv", buffer.getvalue())
    fileio.write_json(out_dir / "summary.json", summary)
    return summary
