"""Evaluation reports from per-case metric rows: summary statistics, paired tests, Markdown, box plots.

A row is one (prediction set, case, class): {"prediction", "case", "label", "name", <metric>: float, ...}. Undefined
values (NaN, e.g. Dice when the class is absent from both masks; inf, e.g. HD when exactly one mask is empty: see
`metrics.surface`) are left out of means, medians and standard deviations and counted per class and metric as
`undefined`. Paired comparisons between prediction
sets use the Wilcoxon signed-rank test (scipy, two-sided, zero differences dropped as in Wilcoxon's original method)
on the cases where both values are defined.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

HIGHER_IS_BETTER = {"dice": True, "iou": True, "precision": True, "recall": True, "nsd": True, "hd": False,
                    "hd95": False, "assd": False}


def _finite(value) -> float | None:
    """JSON has no NaN or infinity: undefined values are written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def statistics(values: Sequence[float]) -> dict:
    array = np.asarray(values, np.float64)
    defined = array[np.isfinite(array)]
    if not defined.size:
        return {"mean": None, "median": None, "std": None, "n": 0, "undefined": int(array.size)}
    return {"mean": float(defined.mean()), "median": float(np.median(defined)), "std": float(defined.std()),
            "n": int(defined.size), "undefined": int(array.size - defined.size)}


def summarize(rows: Sequence[dict], metrics: Sequence[str]) -> dict:
    """{prediction: {class name: {metric: statistics}}} plus the foreground mean of each metric's class means."""
    out: dict = {}
    for prediction in dict.fromkeys(r["prediction"] for r in rows):
        mine = [r for r in rows if r["prediction"] == prediction]
        per_class = {}
        for name in dict.fromkeys(r["name"] for r in mine):
            per_class[name] = {m: statistics([r[m] for r in mine if r["name"] == name]) for m in metrics}
        foreground = {}
        for m in metrics:
            means = [c[m]["mean"] for c in per_class.values() if c[m]["mean"] is not None]
            foreground[m] = float(np.mean(means)) if means else None
        out[prediction] = {"per_class": per_class, "foreground_mean": foreground,
                           "num_cases": len({r["case"] for r in mine})}
    return out


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired values, on the pairs where both are defined; None (the test
    is undefined) with fewer than two such pairs or no difference at all."""
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2 or not any(x != y for x, y in pairs):
        return None
    return float(stats.wilcoxon([x for x, _ in pairs], [y for _, y in pairs], zero_method="wilcox").pvalue)


def wilcoxon_comparisons(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """Paired Wilcoxon signed-rank p-values for every pair of prediction sets, per class and metric."""
    predictions = list(dict.fromkeys(r["prediction"] for r in rows))
    table = {(r["prediction"], r["case"], r["name"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    results = []
    for a, b in itertools.combinations(predictions, 2):
        for name in names:
            for metric in metrics:
                pairs = [(table[(a, c, name)][metric], table[(b, c, name)][metric]) for c in cases
                         if (a, c, name) in table and (b, c, name) in table]
                pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
                differences = [x - y for x, y in pairs]
                p_value = paired_wilcoxon([x for x, _ in pairs], [y for _, y in pairs])
                results.append({"a": a, "b": b, "name": name, "metric": metric, "n": len(pairs),
                                "median_difference": float(np.median(differences)) if differences else None,
                                "p_value": p_value})
    return results


def markdown(summary: dict, comparisons: Sequence[dict], metrics: Sequence[str], notes: Iterable[str] = ()) -> str:
    lines = ["# Evaluation", ""]
    lines += [f"- {note}" for note in notes]
    for prediction, result in summary.items():
        lines += ["", f"## {prediction} ({result['num_cases']} cases)", "",
                  "| class | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for name, values in result["per_class"].items():
            cells = []
            for m in metrics:
                s = values[m]
                cell = "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
                if s["undefined"]:
                    cell += f" ({s['undefined']} undef.)"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        fg = result["foreground_mean"]
        lines.append("| **foreground mean** | " + " | ".join("n/a" if fg[m] is None else f"**{fg[m]:.4f}**"
                                                          for m in metrics) + " |")
    if comparisons:
        lines += ["", "## Paired comparisons (Wilcoxon signed-rank, two-sided)", "",
                  "| A | B | class | metric | n | median A−B | p |", "|---|---|---|---|---:|---:|---:|"]
        for c in comparisons:
            median = "n/a" if c["median_difference"] is None else f"{c['median_difference']:+.4f}"
            p = "n/a" if c["p_value"] is None else f"{c['p_value']:.4g}"
            lines.append(f"| {c['a']} | {c['b']} | {c['name']} | {c['metric']} | {c['n']} | {median} | {p} |")
    return "\n".join(lines) + "\n"


def dice_table(summary: dict) -> str:
    """The console table of an evaluation summary (`medseg evaluate`, `medseg demo`): mean Dice per class and over
    the foreground classes."""
    width = max([len(n) for n in summary["per_class"]] + [12])
    lines = [f"{'class':<{width}}  mean Dice", "-" * (width + 11)]
    for name, value in summary["per_class"].items():
        lines.append(f"{name:<{width}}  {'n/a' if value is None else f'{value:.4f}'}")
    lines.append("-" * (width + 11))
    mean = summary["mean_dice"]
    lines.append(f"{'foreground':<{width}}  {'n/a' if mean is None else f'{mean:.4f}'}  ({summary['num_cases']} cases)")
    return "\n".join(lines)


def box_plot(rows: Sequence[dict], metric: str, path: Path, unit: str = "") -> None:
    """One box per (class, prediction set) of the defined per-case values, with the points drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predictions = list(dict.fromkeys(r["prediction"] for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    width = 0.8 / len(predictions)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) * max(1, len(predictions)) + 1.5), 3.6), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rng = np.random.default_rng(0)
    for p_index, prediction in enumerate(predictions):
        positions, data = [], []
        for n_index, name in enumerate(names):
            values = [r[metric] for r in rows if r["prediction"] == prediction and r["name"] == name]
            values = [v for v in values if math.isfinite(v)]
            positions.append(n_index + (p_index - (len(predictions) - 1) / 2) * width)
            data.append(values)
        drawn = [(pos, d) for pos, d in zip(positions, data) if d]
        if drawn:
            box = ax.boxplot([d for _, d in drawn], positions=[pos for pos, _ in drawn], widths=width * 0.8,
                             patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(colors[p_index % len(colors)])
                patch.set_alpha(0.35)
            for pos, d in drawn:
                ax.scatter(pos + rng.uniform(-width * 0.2, width * 0.2, len(d)), d, s=8,
                           color=colors[p_index % len(colors)], zorder=3)
        ax.plot([], [], color=colors[p_index % len(colors)], label=prediction, linewidth=6, alpha=0.5)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(metric + (f" ({unit})" if unit else ""))
    ax.set_title(f"{metric} per case")
    if len(predictions) > 1:
        ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    from medseg_jax import fileio

    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
