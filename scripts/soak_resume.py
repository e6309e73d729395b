"""Kill-and-resume soak: `medseg prepare`, `train` and `predict` killed with SIGKILL at random moments, then run again;
every re-run must end with exactly the uninterrupted result (store files byte for byte, trained params bit for bit on
CPU, prediction files byte for byte).

    python scripts/soak_resume.py --kills 21 --seed 0 --out runs/soak      # results: runs/soak/soak.json

First the three commands run once uninterrupted (the reference, and how long each takes). Then trials until `--kills`
processes were really killed mid-run: a command is taken in turn (prepare, train, predict), started in a fresh folder
(predict and train over the reference's store and run), sent SIGKILL after a random 5-80% of its reference duration
(a trial whose process had already finished is checked too, but not counted as a kill), and re-run as a user would:
the same command (`medseg train ... --resume` once the run directory holds a run) until it exits 0. A re-run that
fails, or a result that differs from the reference, is a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN = ["--config.data.val_cases=1", "--config.model.features=(4,8)", "--config.train.patch_size=(16,16,16)",
         "--config.train.steps=8", "--config.train.checkpoint_every=2", "--config.train.log_every=2",
         "--config.train.val_every=4", "--config.train.warmup_steps=1", "--config.data.target_spacing=(6,6,6)"]


def medseg(*args) -> list[str]:
    return [sys.executable, "-m", "medseg_jax.cli", *map(str, args)]


def run(command, timeout=1800) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def tree_digest(folder: Path, skip=()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest), leaving out names in `skip`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not any(s in p.parts or p.name == s for s in skip)}


def params_digest(run_dir: Path) -> str:
    import jax

    from medseg_jax import runs

    latest, _ = runs.RunDir(run_dir).checkpoint_managers()
    params = runs.restore_raw(latest, latest.latest_step())["params"]
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return f"step {latest.latest_step()}: {digest.hexdigest()}"


class Commands:
    def __init__(self, root: Path, data: Path, store: Path, run_dir: Path):
        self.root, self.data, self.store, self.run_dir = root, data, store, run_dir

    def prepare(self, out: Path):
        return medseg("prepare", "--source", self.data, "--out", out, "--config", "experiments/demo_ct.py",
                      "--config.data.target_spacing=(6,6,6)")

    def train(self, workdir: Path, resume: bool):
        if resume:
            return medseg("train", "--workdir", workdir, "--resume")
        return medseg("train", "--config", "experiments/demo_ct.py", "--workdir", workdir,
                      f"--config.data.store={self.store}", *TRAIN)

    def predict(self, out: Path):
        return medseg("predict", "--run", self.run_dir, "--input", self.data / "imagesTs", "--output", out)


def result_of(kind: str, folder: Path) -> object:
    if kind == "prepare":
        return tree_digest(folder)
    if kind == "train":
        return params_digest(folder)
    return tree_digest(folder, skip=(".medseg_predictions.json",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/soak")
    args = parser.parse_args()
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = random.Random(args.seed)

    data = root / "data"
    made = run(medseg("demo-data", "--out", data, "--cases", "5", "--test-cases", "3"))
    assert made.returncode == 0, made.stderr
    commands = Commands(root, data, root / "reference" / "store", root / "reference" / "run")
    reference, seconds = {}, {}
    for kind, folder, command in (("prepare", commands.store, commands.prepare(commands.store)),
                                  ("train", commands.run_dir, commands.train(commands.run_dir, False)),
                                  ("predict", root / "reference" / "predictions",
                                   commands.predict(root / "reference" / "predictions"))):
        started = time.time()
        done = run(command)
        assert done.returncode == 0, f"{kind}: {done.stderr[-3000:]}"
        seconds[kind] = time.time() - started
        reference[kind] = result_of(kind, folder)
        print(f"reference {kind}: {seconds[kind]:.1f} s", flush=True)

    trials = []
    kinds = ("prepare", "train", "predict")
    index = 0
    while sum(t["killed"] for t in trials) < args.kills:
        kind = kinds[index % 3]
        folder = root / f"trial_{index:02d}_{kind}"
        fraction = rng.uniform(0.05, 0.8)
        first = {"prepare": commands.prepare(folder), "train": commands.train(folder, False),
                 "predict": commands.predict(folder)}[kind]
        process = subprocess.Popen(first, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * seconds[kind])
        killed = process.poll() is None
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        reruns, outcome = 0, None
        while reruns < 3:
            reruns += 1
            again = first
            if kind == "train" and (folder / "config.json").is_file():
                again = commands.train(folder, True)
            finished = run(again)
            if finished.returncode == 0:
                break
            outcome = finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else "no message"
        same = finished.returncode == 0 and result_of(kind, folder) == reference[kind]
        trials.append({"trial": index, "command": kind, "killed_after_s": round(fraction * seconds[kind], 2),
                       "killed": killed, "reruns": reruns, "identical": same, "last_error": outcome})
        print(f"trial {index:2d} {kind:8s} killed after {fraction * seconds[kind]:5.1f} s "
              f"({'killed' if killed else 'had finished'}), {reruns} re-run(s): "
              f"{'identical' if same else 'DIFFERENT OR FAILED: ' + str(outcome)}", flush=True)
        index += 1

    summary = {"kills": sum(t["killed"] for t in trials), "trials": len(trials),
               "identical": sum(t["identical"] for t in trials), "reference_seconds": seconds, "trials_detail": trials}
    (root / "soak.json").write_text(json.dumps(summary, indent=2))
    print(f"{summary['identical']} of {summary['trials']} trials identical to the uninterrupted result "
          f"({summary['kills']} really killed mid-run); {root / 'soak.json'}")
    sys.exit(0 if summary["identical"] == summary["trials"] else 1)


if __name__ == "__main__":
    main()
