"""Active learning on the phantoms (issue 19): which cases to annotate next, chosen by uncertainty or at random.

A simulated annotation loop through the command line a user would run. The unlabelled pool mixes CT phantoms from
three scanner profiles (reference, soft-kernel, low-dose; `medseg demo-data --scanner`), as scans arriving at a
deployed model do; the model starts from START reference-scanner cases. Per seed (the phantoms stay the same; the seed
sets the training and the random arm's draws), round 0 trains one model on the START cases; then each arm, ROUNDS
times:

    choose      uncertainty: the top ADD cases of `medseg rank --run MODEL --input POOL` (its priority: entropy,
                structure volumes, out-of-distribution score); random: ADD cases drawn from the pool
    annotate    their reference labels copied into a corrections folder (the annotator, simulated)
    add         `medseg dataset add --store ARM_STORE --source CORRECTIONS` (a new store version)
    fine-tune   `medseg train --init-from MODEL --store ARM_STORE` for FINETUNE_STEPS
    score       `medseg predict` + `medseg evaluate` on one common test set (TEST cases of each scanner profile)

Printed and written to JSON: per arm and round (labelled cases START + round x ADD) the mean +- std over seeds of the
test set's mean foreground Dice, the difference uncertainty - random per seed, and which scanner profiles each arm
chose. Re-running the same command continues where it stopped (finished steps are kept).

    python scripts/bench_active_learning.py --seeds 0,1,2,3,4 --out /tmp/bench_al \\
        --json docs/bench_active_learning_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_federated import case_dice, mean_std  # noqa: E402  (one way to read evaluate's per-case table)

SCANNERS = ("reference", "soft-kernel", "low-dose")
ARMS = ("uncertainty", "random")


def medseg(*args: str) -> None:
    print("$ medseg " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "medseg_jax.cli", *args], check=True, cwd=REPO)


def write_data(out: Path, start: int, pool_per_scanner: int, test_per_scanner: int) -> None:
    """data/<scanner>/ phantoms per profile (their own phantom seeds); data/start (a dataset of the first START
    reference cases), data/pool/{images,labels} (the rest, every profile: labels are the simulated annotator's) and
    data/test/{images,labels}."""
    from medseg_jax import fileio
    from medseg_jax.data.phantoms import write_demo_dataset

    for index, scanner in enumerate(SCANNERS):
        if not (out / "data" / scanner / "dataset.json").is_file():
            extra = start if scanner == "reference" else 0
            write_demo_dataset(out / "data" / scanner, modality="ct", num_train=pool_per_scanner + extra,
                               num_test=test_per_scanner, seed=20 + index, scanner=scanner)
    if (out / "data" / "start" / "dataset.json").is_file():
        return
    with (fileio.atomic_dir(out / "data" / "pool") as pool, fileio.atomic_dir(out / "data" / "test") as test,
          fileio.atomic_dir(out / "data" / "start") as first):
        for folder in (pool / "images", pool / "labels", test / "images", test / "labels", first / "imagesTr",
                       first / "labelsTr"):
            folder.mkdir(parents=True)
        training = []
        for scanner in SCANNERS:
            dataset = json.loads((out / "data" / scanner / "dataset.json").read_text())
            for index, entry in enumerate(dataset["training"]):
                name = f"{scanner}_{Path(entry['image']).name}"
                if scanner == "reference" and index < start:
                    for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                        shutil.copyfile(out / "data" / scanner / entry[key], first / sub / name)
                    training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
                    continue
                shutil.copyfile(out / "data" / scanner / entry["image"], pool / "images" / name)
                shutil.copyfile(out / "data" / scanner / entry["label"], pool / "labels" / name)
            for image in dataset["test"]:
                name = Path(image).name
                shutil.copyfile(out / "data" / scanner / image, test / "images" / f"{scanner}_{name}")
                shutil.copyfile(out / "data" / scanner / "labelsTs" / name, test / "labels" / f"{scanner}_{name}")
        fileio.write_json(first / "dataset.json", {**dataset, "name": "DemoCTActiveLearning", "training": training,
                                                   "numTraining": len(training), "test": [], "numTest": 0})
        fileio.write_json(test / "dataset.json", {"labels": dataset["labels"]})


def case_id(name: str) -> str:
    return name[: -len(".nii.gz")]


def choose(arm: str, model: Path, pool: list[str], add: int, work: Path, seed: int, round_: int,
           images: Path) -> list[str]:
    """The ADD pool cases an arm sends to the annotator."""
    if arm == "random":
        rng = np.random.default_rng([seed, round_])
        return sorted(str(c) for c in rng.choice(sorted(pool), add, replace=False))
    ranking = work / "ranking"
    if not (ranking / "ranking.csv").is_file():
        inputs = work / "pool"
        shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir(parents=True)
        for case in pool:  # the cases still unlabelled
            (inputs / f"{case}.nii.gz").symlink_to(images / f"{case}.nii.gz")
        medseg("rank", "--run", str(model), "--checkpoint", "latest", "--input", str(inputs), "--out",
               str(ranking), "--overwrite")
    with open(ranking / "ranking.csv") as f:
        return [row["case"] for row in csv.DictReader(f)][:add]


def annotate(cases: list[str], pool_dir: Path, folder: Path) -> None:
    """The simulated annotator: the chosen cases with their reference labels, as corrected cases come back."""
    if folder.is_dir():
        return
    from medseg_jax import fileio

    with fileio.atomic_dir(folder) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case in cases:
            shutil.copyfile(pool_dir / "images" / f"{case}.nii.gz", tmp / "imagesTr" / f"{case}_0000.nii.gz")
            shutil.copyfile(pool_dir / "labels" / f"{case}.nii.gz", tmp / "labelsTr" / f"{case}.nii.gz")


def train(run: Path, store: Path, steps: int, seed: int, init_from: Path | None, settings: list[str]) -> None:
    if (run / "train_summary.json").is_file():
        return
    resume = ["--resume"] if (run / "config.json").is_file() else []
    config = ["--config", str(REPO / "medseg_jax" / "experiments" / "demo_ct.py")]
    init = ["--init-from", str(init_from)] if init_from is not None and not resume else []
    medseg("train", *config, "--workdir", str(run), "--store", str(store), *init, *resume, f"--config.seed={seed}",
           f"--config.train.steps={steps}", f"--config.train.val_every={steps}",
           f"--config.train.checkpoint_every={max(steps // 4, 1)}", "--config.data.fold=all", *settings)


def score(run: Path, test: Path, work: Path) -> float:
    """The model's mean foreground Dice over the test set (mean per case, then over cases)."""
    result = work / "score.json"
    if not result.is_file():
        medseg("predict", "--run", str(run), "--checkpoint", "latest", "--disable-tta", "--input",
               str(test / "images"), "--output", str(work / "predictions"), "--overwrite")
        medseg("evaluate", "--pred", str(work / "predictions"), "--ref", str(test / "labels"), "--out",
               str(work / "evaluation"), "--overwrite")
        dice = next(iter(case_dice(work / "evaluation" / "per_case.csv").values()))
        result.write_text(json.dumps({"dice": float(np.mean(list(dice.values()))), "per_case": dice}))
    return json.loads(result.read_text())["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=2, help="labelled reference-scanner cases to start from")
    parser.add_argument("--pool", type=int, default=6, help="unlabelled pool cases per scanner profile")
    parser.add_argument("--test", type=int, default=2, help="test cases per scanner profile")
    parser.add_argument("--add", type=int, default=2, help="cases annotated per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--initial-steps", type=int, default=400, help="training steps of round 0")
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps per round")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--tiny", action="store_true", help="a short run of the whole pipeline (tests)")
    parser.add_argument("--out", default="/tmp/bench_active_learning")
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_active_learning_cpu.json"))
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # The CT demo's recipe on a coarser grid with a narrower network, so that 5 seeds x 2 arms x ROUNDS fine-tunings
    # (and a ranking of the pool before each) fit an hour on 2 CPU cores.
    spacing = "(12,12,12)" if args.tiny else "(8,8,8)"
    settings = ["--config.model.features=(4,8)" if args.tiny else "--config.model.features=(8,16,32)",
                "--config.model.deep_supervision=False", "--config.train.patch_size=(16,16,16)" if args.tiny else
                "--config.train.patch_size=(32,32,32)", "--config.train.log_every=10",
                f"--config.data.target_spacing={spacing}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    write_data(out, args.start, args.pool, args.test)
    data = out / "data"
    start_store = out / "stores" / "start"
    medseg("prepare", "--source", str(data / "start"), "--out", str(start_store), "--config",
           str(REPO / "medseg_jax" / "experiments" / "demo_ct.py"), settings[-1])
    pool_all = sorted(case_id(p.name) for p in (data / "pool" / "images").iterdir())

    results: dict[str, dict[int, list[float]]] = {arm: {} for arm in ARMS}
    chosen: dict[str, dict[int, list[list[str]]]] = {arm: {} for arm in ARMS}
    for seed in seeds:
        base = out / "seed" / str(seed)
        first = base / "round0" / "run"
        train(first, start_store, args.initial_steps, seed, None, settings)
        first_dice = score(first, data / "test", base / "round0")
        for arm in ARMS:
            store = base / arm / "store"
            if not store.is_dir():  # each arm grows its own copy of the starting store
                shutil.copytree(start_store, base / arm / ".store.tmp", dirs_exist_ok=True)
                (base / arm / ".store.tmp").rename(store)
            model, pool, curve, picks = first, list(pool_all), [first_dice], []
            for round_ in range(1, args.rounds + 1):
                work = base / arm / f"round{round_}"
                picks_file = work / "chosen.json"
                if not picks_file.is_file():
                    work.mkdir(parents=True, exist_ok=True)
                    picks_file.write_text(json.dumps(choose(arm, model, pool, args.add, work, seed, round_,
                                                            data / "pool" / "images")))
                cases = json.loads(picks_file.read_text())
                annotate(cases, data / "pool", work / "corrections")
                in_store = {meta["case_id"] for meta in json.loads((store / "manifest.json").read_text())["cases"]}
                if not set(cases) <= in_store:
                    medseg("dataset", "add", "--store", str(store), "--source", str(work / "corrections"))
                run = work / "run"
                train(run, store, args.finetune_steps, seed, model, settings)
                curve.append(score(run, data / "test", work))
                model, pool = run, [c for c in pool if c not in cases]
                picks.append(cases)
            results[arm][seed], chosen[arm][seed] = curve, picks

    labelled = [args.start + r * args.add for r in range(args.rounds + 1)]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "command": " ".join(sys.argv),
               "scanners": SCANNERS, "start": args.start, "pool_per_scanner": args.pool,
               "test_per_scanner": args.test, "add_per_round": args.add, "rounds": args.rounds,
               "initial_steps": args.initial_steps, "finetune_steps": args.finetune_steps, "seeds": seeds,
               "labelled_cases": labelled, "arms": {}}
    print(f"\ntest set: {args.test} cases of each scanner profile; mean foreground Dice, mean +- std over seeds "
          f"{seeds}, after each round (labelled cases {labelled})")
    for arm in ARMS:
        per_round = [mean_std([results[arm][s][r] for s in seeds]) for r in range(args.rounds + 1)]
        profiles = {scanner: sum(c.startswith(scanner + "_") for s in seeds for pick in chosen[arm][s] for c in pick)
                    for scanner in SCANNERS}
        summary["arms"][arm] = {"dice_by_round": per_round, "chosen": chosen[arm], "chosen_by_scanner": profiles}
        print(f"{arm:12s} " + "  ".join(f"{r['mean']:.3f}+-{r['std']:.3f}" for r in per_round)
              + f"   chose {profiles}")
    difference = [mean_std(np.subtract([results["uncertainty"][s][r] for s in seeds],
                                       [results["random"][s][r] for s in seeds])) for r in range(args.rounds + 1)]
    summary["uncertainty_minus_random"] = difference
    print("uncertainty - random: " + "  ".join(f"{d['mean']:+.3f} ({', '.join(f'{v:+.3f}' for v in d['per_seed'])})"
                                                for d in difference[1:]))
    summary["total_seconds"] = round(time.time() - started, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json} ({summary['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
