"""Metrics benchmark: `medseg_jax.metrics.evaluate_case` against DeepMind's surface-distance and MONAI on one CT-sized
case, single-threaded, with the values of all three compared on the same case.

    .venv/bin/python scripts/bench_metrics.py                   # 512 x 512 x 400, 5 classes; prints a Markdown table
    .venv/bin/python scripts/bench_metrics.py --size 256 256 200

The case: a label volume of 5 organ-like classes (lumpy ellipsoids of different sizes and a long tube, spacing 0.8 x
0.8 x 1.0 mm) and a prediction that is a perturbed copy (each organ shifted by a few voxels, rescaled, with its own
surface bumps, plus a small false-positive blob far from class 1). Timed:

* ours: `evaluate_case(pred, ref, spacing, labels=1..5, tolerance_mm=1, surface=...)`, which returns all overlap and
  surface metrics of all classes (best of `--repeat` runs);
* surface-distance, as its users call it, per class on the full volume: `compute_surface_distances(ref == c,
  pred == c, spacing)` then `compute_robust_hausdorff(d, 100)`, `(d, 95)`, `compute_average_surface_distance(d)` and
  `compute_surface_dice_at_tolerance(d, 1)` (one run);
* MONAI 1.6 on one-hot float tensors [1, 6, X, Y, Z] built beforehand: `compute_hausdorff_distance` (HD),
  `compute_hausdorff_distance(percentile=95)`, `compute_average_surface_distance(symmetric=True)` and
  `compute_surface_dice(class_thresholds=[1] * 5)`, all with `spacing=` (one run each).

Everything runs on one CPU core (affinity pinned where the OS allows, OMP/MKL/OpenBLAS/torch threads set to 1).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy import ndimage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg_jax.metrics import evaluate_case  # noqa: E402

SPACING = (0.8, 0.8, 1.0)
TOLERANCE = 1.0
METRICS = ("hd", "hd95", "assd", "nsd")


def _lumpy_ellipsoid(out, label, center, radii, rng, bumps):
    """Writes `label` where ((x - c) / r)² summed <= 1 + bumps * smooth noise, inside the ellipsoid's box only."""
    shape = np.array(out.shape)
    margin = np.ceil(np.asarray(radii) * (1 + bumps) + 2).astype(int)
    lo = np.maximum(np.floor(center).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(center).astype(int) + margin + 1, shape)
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    value = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    if bumps:
        noise = ndimage.zoom(rng.standard_normal(tuple(max(2, int(s) // 12) for s in hi - lo)),
                             [(b - a) / max(2, int(b - a) // 12) for a, b in zip(lo, hi)], order=1)
        noise = noise[tuple(slice(0, b - a) for a, b in zip(lo, hi))]
        noise = np.pad(noise, [(0, (b - a) - n) for a, b, n in zip(lo, hi, noise.shape)], mode="edge")
        value = value - bumps * noise
    region = out[tuple(slice(a, b) for a, b in zip(lo, hi))]
    region[value <= 1] = label


def make_case(size, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.asarray(size) / np.array([512, 512, 400])
    organs = [  # (center, semi-axes) in voxels of a 512 x 512 x 400 volume
        ((300, 230, 200), (95, 75, 85)),    # liver
        ((200, 330, 210), (40, 30, 55)),    # spleen
        ((220, 200, 170), (28, 22, 45)),    # kidney
        ((330, 340, 170), (26, 22, 42)),    # kidney
        ((256, 256, 200), (9, 9, 170)),     # aorta-like tube
    ]
    ref, pred = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    for label, (center, radii) in enumerate(organs, 1):
        center, radii = np.asarray(center) * scale, np.asarray(radii) * scale
        _lumpy_ellipsoid(ref, label, center, radii, rng, bumps=0.15)
        _lumpy_ellipsoid(pred, label, center + rng.integers(-3, 4, 3) * np.minimum(scale, 1),
                         radii * rng.uniform(0.93, 1.07, 3), rng, bumps=0.2)
    _lumpy_ellipsoid(pred, 1, np.array([120, 100, 330]) * scale, np.array([6, 5, 4]) * np.maximum(scale, 0.5), rng,
                     bumps=0.0)
    return pred, ref


def _best(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_surface_distance(pred, ref, labels):
    import surface_distance as sd

    np.Inf = np.inf  # surface-distance 0.1 uses np.Inf, gone in NumPy 2 (only reached with empty masks)
    out = {}
    for label in labels:
        d = sd.compute_surface_distances(ref == label, pred == label, list(SPACING))
        to_pred, to_ref = sd.compute_average_surface_distance(d)
        out[label] = {"hd": sd.compute_robust_hausdorff(d, 100), "hd95": sd.compute_robust_hausdorff(d, 95),
                      "assd": (to_pred + to_ref) / 2, "nsd": sd.compute_surface_dice_at_tolerance(d, TOLERANCE)}
    return out


def one_hot(labelmap, classes):
    import torch

    tensor = torch.zeros((1, classes + 1) + labelmap.shape, dtype=torch.float32)
    source = torch.from_numpy(labelmap)
    for c in range(classes + 1):
        tensor[0, c] = source == c
    return tensor


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 400], metavar=("X", "Y", "Z"))
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours (best taken); references run once")
    parser.add_argument("--skip-references", action="store_true")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    start = time.perf_counter()
    pred, ref = make_case(tuple(args.size))
    labels = list(range(1, 6))
    print(f"case {tuple(args.size)} made in {time.perf_counter() - start:.1f} s; voxels per class (ref/pred): "
          + ", ".join(f"{c}: {int((ref == c).sum())}/{int((pred == c).sum())}" for c in labels), flush=True)

    rows, values = [], {}
    for surface in ("surfel", "voxel"):
        def run(surface=surface):
            return evaluate_case(pred, ref, SPACING, labels, TOLERANCE, surface)

        seconds, values[surface] = _best(run, args.repeat)
        rows.append((f"medseg_jax `evaluate_case(surface=\"{surface}\")`, all metrics", seconds, surface))
        print(f"ours {surface}: {seconds:.2f} s", flush=True)

    if not args.skip_references:
        seconds, values["surface-distance"] = _best(lambda: run_surface_distance(pred, ref, labels), 1)
        rows.append(("surface-distance: `compute_surface_distances` + HD, HD95, ASSD, NSD per class", seconds,
                     "surfel"))
        print(f"surface-distance: {seconds:.2f} s", flush=True)

        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

        y_pred, y = one_hot(pred, 5), one_hot(ref, 5)
        spacing = list(SPACING)
        calls = {
            "hd": ("compute_hausdorff_distance", lambda: compute_hausdorff_distance(y_pred, y, spacing=spacing)),
            "hd95": ("compute_hausdorff_distance(percentile=95)",
                     lambda: compute_hausdorff_distance(y_pred, y, percentile=95, spacing=spacing)),
            "assd": ("compute_average_surface_distance(symmetric=True)",
                     lambda: compute_average_surface_distance(y_pred, y, symmetric=True, spacing=spacing)),
            "nsd": ("compute_surface_dice",
                    lambda: compute_surface_dice(y_pred, y, class_thresholds=[TOLERANCE] * 5, spacing=spacing)),
        }
        monai_values, total = {c: {} for c in labels}, 0.0
        for metric, (name, call) in calls.items():
            seconds, result = _best(call, 1)
            total += seconds
            for c in labels:
                monai_values[c][metric] = float(result[0, c - 1])
            print(f"MONAI {metric}: {seconds:.2f} s", flush=True)
            rows.append((f"&nbsp;&nbsp;MONAI `{name}`", seconds, None))
        values["MONAI"] = monai_values
        rows.append(("MONAI: HD + HD95 + ASSD + NSD calls", total, "voxel"))

    ours = {r[2]: r[1] for r in rows[:2]}
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import monai

    print()
    print(f"Metrics benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cpu}, 1 core "
          f"(of {os.cpu_count()}), Python {platform.python_version()}, NumPy {np.__version__}, "
          f"SciPy {scipy.__version__}, torch {torch.__version__}, MONAI {monai.__version__}; "
          f"case {' x '.join(map(str, args.size))} voxels, "
          f"5 classes, spacing {' x '.join(map(str, SPACING))} mm, NSD at {TOLERANCE:g} mm.")
    print()
    print("| computation | seconds | reference / ours |")
    print("|---|---:|---:|")
    for name, seconds, convention in rows:
        ratio = "" if convention is None or name.startswith("medseg_jax") else f"{seconds / ours[convention]:.1f}x"
        print(f"| {name} | {seconds:.2f} | {ratio} |")

    if not args.skip_references:
        print()
        print("Agreement on this case (max relative difference over classes; surfel vs surface-distance, voxel vs "
              "MONAI):")
        for ours_key, their_key in (("surfel", "surface-distance"), ("voxel", "MONAI")):
            worst = {m: max(abs(values[ours_key][c][m] - float(values[their_key][c][m]))
                            / max(abs(float(values[their_key][c][m])), 1e-12) for c in labels) for m in METRICS}
            print(f"- {ours_key}: " + ", ".join(f"{m} {v:.1e}" for m, v in worst.items()))
        print()
        print("| class | surfel HD95 / NSD (ours = surface-distance) | voxel HD95 / NSD (ours = MONAI) |")
        print("|---|---|---|")
        for c in labels:
            s, v = values["surfel"][c], values["voxel"][c]
            print(f"| {c} | {s['hd95']:.2f} mm / {s['nsd']:.3f} | {v['hd95']:.2f} mm / {v['nsd']:.3f} |")
    assert all(math.isfinite(values[s][c][m]) for s in ("surfel", "voxel") for c in labels for m in METRICS)


if __name__ == "__main__":
    main()
