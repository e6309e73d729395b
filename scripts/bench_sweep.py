"""What a sweep costs per run beyond training: launch (a fresh Python, imports), compilation, data, export.

Runs a small sweep (TRIALS loss trials x FOLDS folds of the CT demo at a CPU size, one run at a time through the local
executor) and reads, per run: the sweep's wall time for it (process start to exit), the run's own wall time (train()
start to end), its first step (compilation, or the persistent compilation cache's load, plus the first batch) and its
training loop. The first fold of each trial compiles; the other folds load the train step from the sweep's compilation
cache (DIR/xla_cache), which is the point of sharing it.

    python scripts/bench_sweep.py [--steps 40] [--folds 2] [--out /tmp/bench_sweep]
    python scripts/bench_sweep.py --read runs/ablation     # the same figures from a sweep that already ran
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SWEEP = """
from medseg_jax.experiments.trials import Sweep


def get_sweep():
    return Sweep(base="demo_ct", trials={"dice_ce": {"loss.name": "dice_ce"}, "dice": {"loss.name": "dice"}},
                 changes={"train.patch_size": (32, 32, 32), "model.features": (8, 16, 32), "train.log_every": 10,
                          "train.checkpoint_every": 20},
                 folds=(0, 1, 2, 3, 4))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--out", default="/tmp/bench_sweep")
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_sweep.json"))
    parser.add_argument("--read", help="a finished sweep folder to read instead of running one")
    args = parser.parse_args()
    if args.read:
        sweep_dir = Path(args.read)
        report(sweep_dir, json.loads((sweep_dir / "sweep.json").read_text()), None, args)
        return

    from medseg_jax.data.phantoms import write_demo_dataset
    from medseg_jax.sweep.runner import run_sweep

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dataset = write_demo_dataset(out / "data", modality="ct", num_train=args.cases, num_test=0, seed=0)
    (out / "bench_sweep_file.py").write_text(SWEEP)
    overrides = [f"--config.data.dataset={dataset}", f"--config.train.steps={args.steps}",
                 f"--config.train.val_every={args.steps}"]
    started = time.time()
    manifest = run_sweep(str(out / "bench_sweep_file.py"), out / "sweep",
                         folds=",".join(str(f) for f in range(args.folds)), overrides=overrides)
    report(out / "sweep", manifest, time.time() - started, args)


def report(sweep_dir: Path, manifest: dict, total: float | None, args) -> None:
    rows = []
    for trial, entry in manifest["trials"].items():
        for fold, info in sorted(entry["folds"].items()):
            if info.get("status") != "done" or "seconds" not in info:
                continue
            summary = json.loads((sweep_dir / info["run"] / "train_summary.json").read_text())
            rows.append({"trial": trial, "fold": int(fold), "run_seconds": info["seconds"],
                         "train_wall_seconds": summary["wall_seconds"], "loop_seconds": summary["train_seconds"],
                         "first_step_seconds": summary["first_step_seconds"], "steps": summary["steps"],
                         "launch_seconds": round(info["seconds"] - summary["wall_seconds"], 1)})
    prepare_seconds = None if total is None else round(total - sum(r["run_seconds"] for r in rows), 1)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores", "python": platform.python_version(),
              "jax": __import__("jax").__version__, "sweep": str(sweep_dir), "sweep_file": manifest.get("sweep"),
              "sweep_seconds": None if total is None else round(total, 1),
              "prepare_and_split_seconds": prepare_seconds, "runs": rows}
    print(f"{'trial':18} {'fold':>4} {'run s':>7} {'launch s':>8} {'first step s':>12} {'loop s':>7} "
          f"{'rest of train() s':>17}")
    for r in rows:
        rest = r["train_wall_seconds"] - r["loop_seconds"]
        print(f"{r['trial']:18} {r['fold']:>4} {r['run_seconds']:>7.1f} {r['launch_seconds']:>8.1f} "
              f"{r['first_step_seconds']:>12.1f} {r['loop_seconds']:>7.1f} {rest:>17.1f}")
    compiled = [r for r in rows if r["fold"] == min(x["fold"] for x in rows)]
    cached = [r for r in rows if r not in compiled]
    for name, group in (("first fold (compiles)", compiled), ("later folds (compilation cache)", cached)):
        if group:
            mean = lambda key, g=group: sum(r[key] for r in g) / len(g)  # noqa: E731
            print(f"{name}: mean run {mean('run_seconds'):.1f} s, launch {mean('launch_seconds'):.1f} s, first step "
                  f"{mean('first_step_seconds'):.1f} s, loop {mean('loop_seconds'):.1f} s")
    if total is not None:
        print(f"sweep {total:.1f} s, of which preparing the store and folds {prepare_seconds:.1f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
