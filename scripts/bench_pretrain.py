"""Few labels (issue 18, part 4a): does masked-image-modelling pretraining on unlabelled scans help fine-tuning?

CT phantoms (seed 0): LABELLED labelled cases and UNLABELLED images without labels. One pretraining run
(`medseg pretrain`, the CT demo's network) on the unlabelled images, prepared with the labelled store's plan. Then a
sweep (the experiments issue's machinery, so the figures come out of its results tables): trials "scratch" and
"pretrained" (`train.init_from` the pretraining run: its encoder, decoder and head fresh) x seeds, 2-fold
cross-validation over the labelled cases (each run trains on half of them and is scored on the other half), the same
steps, schedule and data for both arms. Prints the sweep's table and, per arm, the mean +- std over seeds of the
out-of-fold mean foreground Dice, with the paired difference per seed; writes JSON.

    python scripts/bench_pretrain.py --labelled 4 --unlabelled 30 --pretrain-steps 300 --steps 100 --seeds 0,1,2 \\
        --out /tmp/bench_pretrain --json docs/bench_pretrain_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SWEEP = """
from medseg_jax.experiments.trials import Sweep, product


def get_sweep():
    arms = {{"scratch": {{}}, "pretrained": {{"train.init_from": {pretrained!r}}}}}
    seeds = {{f"seed{{s}}": {{"seed": s}} for s in {seeds!r}}}
    return Sweep(base="demo_ct", trials=product(arms, seeds), baseline="scratch-seed{first}", folds=(0, 1),
                 changes={{"data.num_folds": 2, "train.steps": {steps}, "train.val_every": {steps},
                          "train.log_every": 10, "train.checkpoint_every": {steps}}})
"""


def medseg(*args: str) -> None:
    command = [sys.executable, "-m", "medseg_jax.cli", *args]
    print("$ medseg " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=4)
    parser.add_argument("--unlabelled", type=int, default=30)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning (and scratch) steps per run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of the whole pipeline (tests)")
    parser.add_argument("--out", default="/tmp/bench_pretrain")
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_pretrain_cpu.json"))
    args = parser.parse_args()

    from medseg_jax.data.phantoms import write_demo_dataset
    from medseg_jax.sweep import results
    from medseg_jax.sweep.runner import run_sweep

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tiny = ["--config.model.features=(4,8)", "--config.train.patch_size=(16,16,16)",
            "--config.pretrain.mask_block=(4,4,4)", "--config.data.target_spacing=(6,6,6)"] if args.tiny else []
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.time()
    data = write_demo_dataset(out / "data", modality="ct", num_train=args.labelled, num_test=0, seed=0,
                              num_unlabelled=args.unlabelled)
    config = str(REPO / "medseg_jax" / "experiments" / "demo_ct.py")
    spacing = [t for t in tiny if "target_spacing" in t]
    medseg("prepare", "--source", str(data), "--out", str(out / "store"), "--config", config, *spacing)
    medseg("prepare", "--source", str(data), "--out", str(out / "unlabelled"), "--unlabelled", "--plan-from",
           str(out / "store"))
    tick = time.time()
    medseg("pretrain", "--config", config, "--workdir", str(out / "pretrained"), "--store", str(out / "unlabelled"),
           f"--config.train.steps={args.pretrain_steps}", f"--config.train.batch_size={args.pretrain_batch}",
           "--config.train.log_every=10", f"--config.train.checkpoint_every={args.pretrain_steps}", *tiny)
    pretrain_seconds = time.time() - tick
    losses = [json.loads(line)["loss"] for line in (out / "pretrained" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]

    sweep_file = out / "few_labels_sweep.py"
    sweep_file.write_text(SWEEP.format(pretrained=str(out / "pretrained"), seeds=seeds, first=seeds[0],
                                       steps=args.steps))
    tick = time.time()
    run_sweep(str(sweep_file), out / "sweep", executor="local", max_parallel=1,
              overrides=[f"--config.data.store={out / 'store'}", *tiny])
    sweep_seconds = time.time() - tick
    table = results.results(out / "sweep")
    print((out / "sweep" / "results" / "results.md").read_text())

    by_trial = {t["trial"]: t["dice"]["mean"] for t in table["trials"]}
    arms = {}
    for arm in ("scratch", "pretrained"):
        values = [by_trial[f"{arm}-seed{s}"] for s in seeds]
        arms[arm] = {"per_seed": values, "mean": float(np.mean(values)),
                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    differences = [by_trial[f"pretrained-seed{s}"] - by_trial[f"scratch-seed{s}"] for s in seeds]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "command": " ".join(sys.argv),
               "labelled": args.labelled, "unlabelled": args.unlabelled, "pretrain_steps": args.pretrain_steps,
               "steps": args.steps, "seeds": seeds, "pretrain_seconds": round(pretrain_seconds, 1),
               "pretrain_loss_first_last": [losses[0], losses[-1]] if losses else None,
               "sweep_seconds": round(sweep_seconds, 1), "arms": arms,
               "pretrained_minus_scratch": {"per_seed": differences, "mean": float(np.mean(differences))},
               "total_seconds": round(time.time() - started, 1)}
    for arm, values in arms.items():
        print(f"{arm}: out-of-fold mean foreground Dice {values['mean']:.4f} +- {values['std']:.4f} over seeds "
              f"{seeds} ({', '.join(f'{v:.4f}' for v in values['per_seed'])})")
    print(f"pretrained - scratch per seed: {', '.join(f'{d:+.4f}' for d in differences)} "
          f"(mean {np.mean(differences):+.4f})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json} ({summary['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
