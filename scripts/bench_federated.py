"""Sites with different scanners (issue 18, part 4b): federated vs each site alone vs all data pooled.

Three simulated hospitals, each with its own CT phantoms (its own phantom seed) seen through its own scanner profile
(`medseg demo-data --scanner`): A "reference", B "soft-kernel" (soft kernel, thick slices, calibration drift),
C "low-dose" (strong noise and streaks). Every store is prepared with site A's plan (`medseg prepare --plan-from`),
as a consortium agrees on one preprocessing. Per seed (config.seed; the data stay the same), five models of the CT
demo's network, all with the same number of steps per model (ROUNDS x LOCAL_STEPS, the demo's schedule over them):

    alone-A, alone-B, alone-C   `medseg train` on one site's store
    pooled                      `medseg train` on one store of every site's training cases (what federated
                                learning stands in for when data cannot move)
    federated                   `medseg federated --strategy fedavg` over the three stores: ROUNDS rounds of
                                LOCAL_STEPS local steps per site (so three times the gradient steps of one run,
                                spread over the sites, as in practice)

Every model (its last checkpoint) predicts one common test set, TEST_CASES held-out cases from each site, and
`medseg evaluate` scores them together (its per-case table, Wilcoxon comparisons and box plots per seed). Printed and
written to JSON: per arm, the mean +- std over seeds of the test set's mean foreground Dice, and per scanner.
Re-running the same command continues where it stopped (finished runs and evaluations are kept).

    python scripts/bench_federated.py --cases 6 --test-cases 3 --rounds 6 --local-steps 25 --seeds 0,1,2 \\
        --out /tmp/bench_federated --json docs/bench_federated_cpu.json
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

SITES = {"A": "reference", "B": "soft-kernel", "C": "low-dose"}
ARMS = ("alone-A", "alone-B", "alone-C", "pooled", "federated")


def medseg(*args: str) -> None:
    print("$ medseg " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "medseg_jax.cli", *args], check=True, cwd=REPO)


def write_sites(out: Path, cases: int, test_cases: int) -> None:
    """Each site's dataset; the pooled training set and the common test set (file names prefixed by the site)."""
    from medseg_jax import fileio
    from medseg_jax.data.phantoms import write_demo_dataset

    for index, (site, scanner) in enumerate(SITES.items()):
        if not (out / "data" / site / "dataset.json").is_file():
            write_demo_dataset(out / "data" / site, modality="ct", num_train=cases, num_test=test_cases,
                               seed=10 + index, scanner=scanner)
    if (out / "data" / "pooled" / "dataset.json").is_file():
        return
    with fileio.atomic_dir(out / "data" / "pooled") as pooled, fileio.atomic_dir(out / "data" / "test") as test:
        for sub in ("imagesTr", "labelsTr"):
            (pooled / sub).mkdir()
        for sub in ("images", "labels"):
            (test / sub).mkdir()
        training = []
        for site in SITES:
            dataset = json.loads((out / "data" / site / "dataset.json").read_text())
            for entry in dataset["training"]:
                name = f"{site}_{Path(entry['image']).name}"
                for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                    shutil.copyfile(out / "data" / site / entry[key], pooled / sub / name)
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            for image in dataset["test"]:
                name = Path(image).name
                shutil.copyfile(out / "data" / site / image, test / "images" / f"{site}_{name}")
                shutil.copyfile(out / "data" / site / "labelsTs" / name, test / "labels" / f"{site}_{name}")
        fileio.write_json(pooled / "dataset.json", {**dataset, "name": "DemoCTPooled", "training": training,
                                                    "numTraining": len(training), "test": [], "numTest": 0,
                                                    "description": "the training cases of sites A, B and C"})
        fileio.write_json(test / "dataset.json", {"labels": dataset["labels"]})


def finished(run: Path) -> bool:
    return (run / "train_summary.json").is_file()


def train_arm(arm: str, run: Path, stores: Path, seed: int, rounds: int, local_steps: int, tiny: list[str]) -> None:
    if finished(run):
        return
    config = str(REPO / "medseg_jax" / "experiments" / "demo_ct.py")
    steps = rounds * local_steps
    # One validation case per site (federated: per-site validation Dice each round); the rest train.
    settings = [f"--config.seed={seed}", "--config.data.val_cases=1", "--config.train.log_every=5", *tiny]
    resume = ["--resume"] if (run / "checkpoints").is_dir() else []
    if arm == "federated":
        sites = ",".join(f"{site}={stores / site}" for site in SITES)
        medseg("federated", "--config", config, "--sites", sites, "--rounds", str(rounds), "--local-steps",
               str(local_steps), "--strategy", "fedavg", "--workdir", str(run), *settings)
        return
    store = stores / ("pooled" if arm == "pooled" else arm.split("-")[1])
    if not resume and run.exists():
        shutil.rmtree(run)  # stopped before its first checkpoint: start again
    medseg("train", "--config", config, "--workdir", str(run), "--store", str(store), *resume, *settings,
           f"--config.train.steps={steps}", f"--config.train.val_every={steps}",
           f"--config.train.checkpoint_every={local_steps}")


def case_dice(per_case_csv: Path) -> dict[str, dict[str, float]]:
    """arm -> case -> mean foreground Dice of the case (classes absent from both are left out)."""
    values: dict[str, dict[str, list[float]]] = {}
    with open(per_case_csv) as f:
        for row in csv.DictReader(f):
            if row["dice"] not in ("", "nan"):
                values.setdefault(row["prediction"], {}).setdefault(row["case"], []).append(float(row["dice"]))
    return {arm: {case: float(np.mean(v)) for case, v in cases.items()} for arm, cases in values.items()}


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"per_seed": values, "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="training cases per site")
    parser.add_argument("--test-cases", type=int, default=3, help="test cases per site (the common test set)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=25)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tiny", action="store_true", help="a short run of the whole pipeline (tests)")
    parser.add_argument("--out", default="/tmp/bench_federated")
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_federated_cpu.json"))
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    spacing = ["--config.data.target_spacing=(8,8,8)"] if args.tiny else []
    tiny = ["--config.model.features=(4,8)", "--config.model.deep_supervision=False",
            "--config.train.patch_size=(16,16,16)", *spacing] if args.tiny else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    write_sites(out, args.cases, args.test_cases)
    stores = out / "stores"
    config = str(REPO / "medseg_jax" / "experiments" / "demo_ct.py")
    for name in (*SITES, "pooled"):  # (prepare continues a store it had begun)
        plan = ["--config", config, *spacing] if name == "A" else ["--plan-from", str(stores / "A")]
        medseg("prepare", "--source", str(out / "data" / name), "--out", str(stores / name), *plan)

    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        runs_dir = out / "runs" / f"seed{seed}"
        for arm in ARMS:
            train_arm(arm, runs_dir / arm, stores, seed, args.rounds, args.local_steps, tiny)
            seconds[arm].append(json.loads((runs_dir / arm / "train_summary.json").read_text())["wall_seconds"])
        evaluation = out / "evaluation" / f"seed{seed}"
        if not (evaluation / "per_case.csv").is_file():
            predictions = out / "predictions" / f"seed{seed}"
            for arm in ARMS:
                if not (predictions / arm / ".done").is_file():
                    medseg("predict", "--run", str(runs_dir / arm), "--checkpoint", "latest", "--disable-tta",
                           "--input", str(out / "data" / "test" / "images"), "--output", str(predictions / arm),
                           "--overwrite")
                    (predictions / arm / ".done").touch()
            medseg("evaluate", "--pred", *[str(predictions / arm) for arm in ARMS], "--ref",
                   str(out / "data" / "test" / "labels"), "--out", str(evaluation), "--overwrite")
        per_seed[seed] = case_dice(evaluation / "per_case.csv")

    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "command": " ".join(sys.argv),
               "sites": SITES, "cases_per_site": args.cases, "test_cases_per_site": args.test_cases,
               "rounds": args.rounds, "local_steps": args.local_steps,
               "steps_per_model": args.rounds * args.local_steps, "seeds": seeds, "arms": {}}
    print(f"\ncommon test set: {args.test_cases} cases from each of sites {', '.join(SITES)}; mean foreground Dice "
          f"per arm, mean +- std over seeds {seeds}")
    for arm in ARMS:
        overall = [np.mean(list(per_seed[s][arm].values())) for s in seeds]
        by_site = {site: mean_std([np.mean([d for c, d in per_seed[s][arm].items() if c.startswith(f"{site}_")])
                                   for s in seeds]) for site in SITES}
        summary["arms"][arm] = {"test_dice": mean_std(overall), "by_site": by_site,
                                "train_seconds": mean_std(seconds[arm])}
        print(f"{arm:10s} {np.mean(overall):.4f} +- {summary['arms'][arm]['test_dice']['std']:.4f}   "
              + "  ".join(f"{site} {v['mean']:.3f}" for site, v in by_site.items())
              + f"   ({np.mean(seconds[arm]):.0f} s per run)")
    federated = summary["arms"]["federated"]["test_dice"]["per_seed"]
    summary["federated_minus"] = {arm: mean_std(np.subtract(federated, summary["arms"][arm]["test_dice"]["per_seed"]))
                                  for arm in ARMS if arm != "federated"}
    for arm, difference in summary["federated_minus"].items():
        print(f"federated - {arm}: {', '.join(f'{d:+.4f}' for d in difference['per_seed'])} "
              f"(mean {difference['mean']:+.4f})")
    summary["total_seconds"] = round(time.time() - started, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json} ({summary['total_seconds']:.0f} s in all); per-seed reports in {out / 'evaluation'}")


if __name__ == "__main__":
    main()
