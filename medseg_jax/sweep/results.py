"""`medseg results DIR`: a sweep's cross-validation table from its out-of-fold predictions.

Each case is predicted once per trial, by the fold that held it out (RUN/validation/CASE.nii.gz, in the scan's own
geometry), and scored against its source label: Dice, HD95 and NSD per class (and the rest of `medseg evaluate`'s
metrics). Per trial: mean +- std over cases and over folds (each fold's mean over its cases), per class and for the
foreground mean (the mean over classes of a case); wall-clock, steps and device from the runs' training summaries.
Against the baseline trial, on the cases both have: the Wilcoxon signed-rank p-value and a bootstrap 95% confidence
interval of the mean difference of each case's foreground-mean Dice (and per class). Trials are ranked by foreground
mean Dice.

    DIR/results/per_case.csv    trial x case x class: fold and every metric
    DIR/results/results.csv     one row per trial (rank order)
    DIR/results/results.json    the same, with per-class statistics and comparisons
    DIR/results/results.md      the ranked table
    DIR/results/results.png     per-class mean Dice per trial with 95% bootstrap intervals
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg_jax import fileio, runs
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.evaluate import METRICS, format_number, score_files
from medseg_jax.metrics import report

TABLE_METRICS = ("dice", "hd95", "nsd")
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


def _cell(value) -> str:
    """A CSV cell: numbers as `medseg evaluate` writes them, nothing for a missing value."""
    return "" if value is None else format_number(value) if isinstance(value, float) else str(value)


def bootstrap_interval(differences: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | tuple[None, None]:
    """95% percentile bootstrap interval of the mean of paired differences (cases resampled with replacement)."""
    values = np.asarray([d for d in differences if math.isfinite(d)], np.float64)
    if values.size < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def read_manifest(path: Path) -> dict:
    """A sweep's sweep.json; a damaged one is a one-line error (it is rewritten whole at every change, atomically, so
    only a hand edit can damage it)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read the sweep manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("trials"), dict):
        raise MedsegError(f"{path}: not a sweep manifest (written by `medseg sweep`)")
    return manifest


def collect(workdir: Path) -> tuple[dict, dict[str, dict[int, runs.RunDir]]]:
    """The manifest and, per trial, its finished fold runs."""
    manifest_path = workdir / "sweep.json"
    if not manifest_path.is_file():
        raise MedsegError(f"{workdir}: no sweep.json here; run `medseg sweep SWEEP --workdir {workdir}` first")
    manifest = read_manifest(manifest_path)
    finished: dict[str, dict[int, runs.RunDir]] = {}
    for trial, entry in manifest["trials"].items():
        for fold, info in sorted(entry["folds"].items(), key=lambda item: int(item[0])):
            run = runs.RunDir(workdir / info["run"])
            if run.summary_path.is_file() and run.validation_dir.is_dir():
                finished.setdefault(trial, {})[int(fold)] = run
    if not finished:
        raise MedsegError(f"{workdir}: no trial has a finished fold yet; run or continue the sweep first")
    return manifest, finished


def score_sweep(finished: dict[str, dict[int, runs.RunDir]], tolerance_mm: float = 1.0,
                workers: int = 1) -> list[dict]:
    """One row per trial x case x class: each case scored from the fold run that held it out."""
    tasks, fold_of = [], {}
    stores: dict[tuple, Store] = {}
    for trial, folds in finished.items():
        for fold, run in folds.items():
            config = run.load_config()
            key = (config.data.store, run.store_version())  # the cases (and labels) the run was trained with
            if key not in stores:
                stores[key] = Store(key[0], version=key[1])
            store = stores[key]
            labels = {int(k): v for k, v in store.plan["labels"].items()}
            classes = [c for c in sorted(labels) if c != 0]
            # 2D pictures' references are read at the pixel size the validation predictions were written with
            spacing_2d = tuple(store.plan["spacing_2d"]) if store.plan.get("spacing_2d") else None
            val_ids = json.loads(run.splits_path.read_text())[fold]["val"] if run.splits_path.is_file() else []
            for case_id in val_ids:
                prediction = run.validation_dir / f"{case_id}.nii.gz"
                reference = store.source_path(store.cases[case_id]["source"]["label"])
                if not prediction.is_file():
                    raise MedsegError(f"{prediction}: out-of-fold prediction missing (trial {trial}, fold {fold})")
                if reference is None or not reference.is_file():
                    raise MedsegError(f"case {case_id}: its source label ({reference}) is not readable any more")
                fold_of[(trial, case_id)] = fold
                tasks.append((trial, prediction, reference, labels, classes, float(tolerance_mm), "surfel",
                              spacing_2d))
    rows = score_files(tasks, workers)
    for row in rows:
        row["fold"] = fold_of[(row["prediction"], row["case"])]
        row["trial"] = row.pop("prediction")
    return rows


def _case_foreground(rows: Sequence[dict], metric: str) -> dict[str, float]:
    """Per case, the mean over classes of `metric` (defined values only)."""
    by_case: dict[str, list[float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row[metric])
    out = {}
    for case, values in by_case.items():
        defined = [v for v in values if math.isfinite(v)]
        out[case] = float(np.mean(defined)) if defined else float("nan")
    return out


def _over_folds(rows: Sequence[dict], metric: str) -> dict:
    """Mean and std over folds of each fold's mean (over its cases) of the case foreground means."""
    fold_means = []
    for fold in sorted({r["fold"] for r in rows}):
        values = [v for v in _case_foreground([r for r in rows if r["fold"] == fold], metric).values()
                  if math.isfinite(v)]
        if values:
            fold_means.append(float(np.mean(values)))
    if not fold_means:
        return {"mean": None, "std": None, "folds": 0}
    return {"mean": float(np.mean(fold_means)), "std": float(np.std(fold_means)), "folds": len(fold_means)}


def summarize_trials(rows: Sequence[dict], manifest: dict, finished: dict, baseline: str) -> list[dict]:
    trials = []
    base_rows = [r for r in rows if r["trial"] == baseline]
    base_case = _case_foreground(base_rows, "dice")
    for trial, folds in finished.items():
        mine = [r for r in rows if r["trial"] == trial]
        names = list(dict.fromkeys(r["name"] for r in mine))
        entry: dict = {"trial": trial, "folds": sorted(folds), "num_cases": len({r["case"] for r in mine}),
                       "complete": sorted(folds) == sorted(int(f) for f in manifest["folds"])}
        for metric in TABLE_METRICS:
            case_values = _case_foreground(mine, metric)
            stats = report.statistics(list(case_values.values()))
            entry[metric] = {"mean": stats["mean"], "std_cases": stats["std"], "undefined": stats["undefined"],
                             "over_folds": _over_folds(mine, metric),
                             "per_class": {name: report.statistics([r[metric] for r in mine if r["name"] == name])
                                           for name in names}}
        entry["dice"]["per_class_ci95"] = {
            name: list(bootstrap_interval([r["dice"] for r in mine if r["name"] == name])) for name in names}
        summaries = [json.loads(run.summary_path.read_text()) for run in folds.values()]
        entry["wall_seconds"] = round(sum(s.get("wall_seconds", 0.0) for s in summaries), 1)
        entry["train_seconds"] = round(sum(s.get("train_seconds", 0.0) for s in summaries), 1)
        entry["steps"] = sorted({s.get("steps") for s in summaries})
        entry["device"] = sorted({str(s.get("device")) for s in summaries})
        # Paired against the baseline on the cases both predicted.
        my_case = _case_foreground(mine, "dice")
        shared = sorted(set(my_case) & set(base_case))
        differences = [my_case[c] - base_case[c] for c in shared]
        low, high = bootstrap_interval(differences)
        comparison = {"baseline": baseline, "cases": len(shared),
                      "mean_difference": float(np.nanmean(differences)) if differences else None,
                      "ci95": [low, high], "p_value": report.paired_wilcoxon([my_case[c] for c in shared],
                                                                 [base_case[c] for c in shared]),
                      "per_class": {}}
        for name in names:
            a = {r["case"]: r["dice"] for r in mine if r["name"] == name}
            b = {r["case"]: r["dice"] for r in base_rows if r["name"] == name}
            both = [c for c in shared if c in a and c in b]
            diffs = [a[c] - b[c] for c in both]
            comparison["per_class"][name] = {
                "ci95": list(bootstrap_interval(diffs)),
                "p_value": report.paired_wilcoxon([a[c] for c in both], [b[c] for c in both])}
        entry["vs_baseline"] = None if trial == baseline else comparison
        trials.append(entry)
    trials.sort(key=lambda t: -(t["dice"]["mean"] if t["dice"]["mean"] is not None else -math.inf))
    for rank, entry in enumerate(trials, start=1):
        entry["rank"] = rank
    return trials


def _pm(stats: dict, key: str = "std_cases", digits: int = 4) -> str:
    if stats.get("mean") is None:
        return "n/a"
    spread = stats.get(key)
    return f"{stats['mean']:.{digits}f} ± {spread:.{digits}f}" if spread is not None else f"{stats['mean']:.{digits}f}"


def markdown_table(trials: Sequence[dict], baseline: str) -> str:
    lines = ["| rank | trial | folds | cases | Dice (± cases) | Dice (± folds) | HD95 mm | NSD | Δ Dice vs "
             f"{baseline} [95% CI] | p | train s |", "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for t in trials:
        vs = t["vs_baseline"]
        if vs is None:
            delta, p = "(baseline)", ""
        else:
            ci = vs["ci95"]
            delta = "n/a" if vs["mean_difference"] is None else (
                f"{vs['mean_difference']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci[0] is not None else ""))
            p = "n/a" if vs["p_value"] is None else f"{vs['p_value']:.3g}"
        folds = ",".join(map(str, t["folds"])) + ("" if t["complete"] else " (incomplete)")
        lines.append(f"| {t['rank']} | {t['trial']} | {folds} | {t['num_cases']} | {_pm(t['dice'])} | "
                     f"{_pm(t['dice']['over_folds'], 'std')} | {_pm(t['hd95'], digits=2)} | {_pm(t['nsd'])} | "
                     f"{delta} | {p} | {t['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def _plot(trials: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(trials[0]["dice"]["per_class"]) if trials else []
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(trials) * max(1, len(names))), 4))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        means, errors = [], [[], []]
        for t in trials:
            mean = t["dice"]["per_class"].get(name, {}).get("mean")
            low, high = t["dice"]["per_class_ci95"].get(name, (None, None))
            means.append(mean or 0.0)
            errors[0].append(0.0 if low is None else max(0.0, (mean or 0.0) - low))
            errors[1].append(0.0 if high is None else max(0.0, high - (mean or 0.0)))
        positions = np.arange(len(trials)) + (k - (len(names) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(np.arange(len(trials)), [t["trial"] for t in trials], rotation=20, ha="right")
    ax.set_ylabel("Dice (mean over cases, bootstrap 95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("cross-validation Dice per class (out-of-fold predictions)")
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def results(workdir: str | Path, out: str | Path | None = None, tolerance_mm: float = 1.0, workers: int = 1) -> dict:
    workdir = Path(workdir)
    out = Path(out) if out else workdir / "results"
    manifest, finished = collect(workdir)
    baseline = manifest["baseline"] if manifest["baseline"] in finished else next(iter(finished))
    rows = score_sweep(finished, tolerance_mm, workers)
    trials = summarize_trials(rows, manifest, finished, baseline)
    table = markdown_table(trials, baseline)
    per_case_columns = ["trial", "fold", "case", "label", "name", *METRICS]
    trial_columns = ["rank", "trial", "folds", "num_cases", "dice_mean", "dice_std_cases", "dice_mean_over_folds",
                     "dice_std_over_folds", "hd95_mean", "nsd_mean", "delta_dice", "delta_ci_low", "delta_ci_high",
                     "p_value", "wall_seconds", "train_seconds", "steps", "device"]
    flat = []
    for t in trials:
        vs = t["vs_baseline"] or {}
        flat.append({"rank": t["rank"], "trial": t["trial"], "folds": " ".join(map(str, t["folds"])),
                     "num_cases": t["num_cases"], "dice_mean": t["dice"]["mean"],
                     "dice_std_cases": t["dice"]["std_cases"], "dice_mean_over_folds": t["dice"]["over_folds"]["mean"],
                     "dice_std_over_folds": t["dice"]["over_folds"]["std"], "hd95_mean": t["hd95"]["mean"],
                     "nsd_mean": t["nsd"]["mean"], "delta_dice": vs.get("mean_difference"),
                     "delta_ci_low": (vs.get("ci95") or [None, None])[0],
                     "delta_ci_high": (vs.get("ci95") or [None, None])[1],
                     "p_value": vs.get("p_value"), "wall_seconds": t["wall_seconds"],
                     "train_seconds": t["train_seconds"], "steps": " ".join(map(str, t["steps"])),
                     "device": " ".join(t["device"])})
    content = {"sweep": manifest.get("sweep"), "baseline": baseline, "metrics": list(TABLE_METRICS),
               "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": BOOTSTRAP_SEED}, "trials": trials}
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "per_case.csv", _csv(sorted(rows, key=lambda r: (r["trial"], r["case"], r["label"])),
                                                   per_case_columns))
    fileio.write_text(out / "results.csv", _csv(flat, trial_columns))
    fileio.write_json(out / "results.json", _json_safe(content))
    notes = (f"Cross-validation of {Path(manifest.get('sweep', '')).stem}: out-of-fold predictions in each scan's "
             f"geometry; Dice/HD95/NSD as foreground means per case (mean ± std over cases; over folds: std of the "
             f"fold means); Δ vs {baseline}: mean paired difference with a {BOOTSTRAP_SAMPLES}-sample bootstrap 95% "
             f"CI and the Wilcoxon signed-rank p-value.")
    fileio.write_text(out / "results.md", f"# Sweep results\n\n{notes}\n\n{table}")
    _plot(trials, out / "results.png")
    return content


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
