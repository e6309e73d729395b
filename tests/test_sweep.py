"""Cross-validation folds; sweeps (local and submitit executors, kill and re-run, a failing trial); results tables."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data import splits as splits_lib
from medseg_jax.errors import MedsegError
from medseg_jax.experiments import schema
from tests.conftest import REPO, TINY_OVERRIDES, built_once

# --- folds ---------------------------------------------------------------------------------------------------------


def _data(**values) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"fold": "holdout", "val_cases": 2, "num_folds": 5, "split_seed": 12345,
                                      "splits_file": "", "group_regex": "", "groups_file": "", **values})


def test_folds_are_disjoint_cover_every_case_and_are_drawn_by_seed():
    cases = [f"case_{i:03d}" for i in range(23)]
    folds = splits_lib.kfold_splits(cases, 5, seed=12345)
    held_out = [set(f["val"]) for f in folds]
    assert len(folds) == 5
    assert set().union(*held_out) == set(cases)
    assert sum(len(v) for v in held_out) == len(cases)  # disjoint
    assert sorted(len(v) for v in held_out) == [4, 4, 5, 5, 5]
    for fold in folds:
        assert set(fold["train"]) == set(cases) - set(fold["val"])
    assert splits_lib.kfold_splits(cases, 5, seed=12345) == folds
    assert splits_lib.kfold_splits(cases, 5, seed=1) != folds
    # fold k of the config is the k-th split
    train, val, listed = splits_lib.train_val_cases(_data(fold="3"), cases)
    assert (train, val) == (sorted(folds[3]["train"]), folds[3]["val"]) and listed == folds
    assert splits_lib.train_val_cases(_data(fold="all"), cases)[:2] == (cases, [])
    assert splits_lib.train_val_cases(_data(), cases)[:2] == (cases[:-2], cases[-2:])  # the hold-out as before


def test_grouped_folds_keep_a_patient_in_one_fold(tmp_path):
    cases = [f"patient{p:02d}_scan{s}" for p in range(9) for s in range(1 + p % 3)]
    folds = splits_lib.train_val_cases(_data(fold="0", num_folds=4, group_regex=r"^(patient\d+)_"), cases)[2]
    fold_of_patient: dict[str, set] = {}
    for k, fold in enumerate(folds):
        for case in fold["val"]:
            fold_of_patient.setdefault(case.split("_")[0], set()).add(k)
    assert len(fold_of_patient) == 9 and all(len(f) == 1 for f in fold_of_patient.values())
    assert set().union(*[set(f["val"]) for f in folds]) == set(cases)
    # the same grouping from a mapping file (CSV and JSON)
    (tmp_path / "groups.csv").write_text("".join(f"{c},{c.split('_')[0]}\n" for c in cases))
    (tmp_path / "groups.json").write_text(json.dumps({c: c.split("_")[0] for c in cases}))
    for name in ("groups.csv", "groups.json"):
        assert splits_lib.train_val_cases(_data(fold="0", num_folds=4, groups_file=str(tmp_path / name)),
                                          cases)[2] == folds
    with pytest.raises(MedsegError, match="does not match case 'other'"):
        splits_lib.train_val_cases(_data(fold="0", group_regex=r"^(patient\d+)_"), cases + ["other"])
    (tmp_path / "partial.csv").write_text(f"{cases[0]},a\n")
    with pytest.raises(MedsegError, match=r"partial.csv: no group for case"):
        splits_lib.train_val_cases(_data(fold="0", groups_file=str(tmp_path / "partial.csv")), cases)


def test_nnunet_splits_final_json_is_read(tmp_path):
    cases = [f"liver_{i}" for i in range(6)]
    nnunet = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2] + cases[4:], "val": cases[2:4]},
              {"train": cases[:4], "val": cases[4:]}]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(nnunet))  # nnU-Net writes it with save_json: a list of {"train", "val"}
    train, val, folds = splits_lib.train_val_cases(_data(fold=1, splits_file=str(path)), cases)
    assert (train, val) == (sorted(nnunet[1]["train"]), nnunet[1]["val"]) and folds == nnunet
    with pytest.raises(MedsegError, match="'data.fold': 3 but there are 3 folds"):
        splits_lib.train_val_cases(_data(fold=3, splits_file=str(path)), cases)
    with pytest.raises(MedsegError, match="names case 'liver_5', which the store does not hold"):
        splits_lib.train_val_cases(_data(fold=0, splits_file=str(path)), cases[:5])
    path.write_text(json.dumps([{"train": cases, "val": cases[:1]}]))
    with pytest.raises(MedsegError, match="in both train and val"):
        splits_lib.train_val_cases(_data(fold=0, splits_file=str(path)), cases)
    path.write_text("{}")
    with pytest.raises(MedsegError, match="splits_final.json: expected a list"):
        splits_lib.train_val_cases(_data(fold=0, splits_file=str(path)), cases)


def test_fold_values_are_checked_up_front():
    from medseg_jax.experiments.base import get_config

    config = get_config()
    for good in ("holdout", "all", "0", 4):
        with config.ignore_type():
            config.data.fold = good
        schema.check(config)
    for bad in ("fold1", -1, 1.5, True):
        with config.ignore_type():
            config.data.fold = bad
        with pytest.raises(MedsegError, match="config key 'data.fold'"):
            schema.check(config)
    with config.ignore_type():
        config.data.fold = "0"
    config.data.num_folds = 1
    with pytest.raises(MedsegError, match="'data.num_folds': 1 must be at least 2"):
        schema.check(config)


# --- sweeps --------------------------------------------------------------------------------------------------------

SWEEP_FILE = """
from medseg_jax.experiments.trials import Sweep


def get_sweep():
    return Sweep(base="demo_ct", trials={TRIALS}, folds=(0, 1))  # the baseline: the first trial
"""
TRIALS = {"dice_ce": {"loss.name": "dice_ce"}, "dice": {"loss.name": "dice"}}
STEPS = 6


def _sweep_overrides(dataset: Path, steps: int = STEPS) -> list[str]:
    return [f"--config.data.dataset={dataset}", "--config.data.num_folds=2", f"--config.train.steps={steps}",
            f"--config.train.val_every={steps}", *TINY_OVERRIDES]


def _write_sweep(folder: Path, trials: dict = TRIALS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_sweep.py"
    path.write_text(SWEEP_FILE.replace("{TRIALS}", repr(trials)))
    return path


def _per_case(workdir: Path) -> list[dict]:
    with open(workdir / "results" / "per_case.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def local_sweep(tiny_dataset, tmp_path_factory) -> Path:
    """2 trials x 2 folds through the local executor, two runs at once, then the results."""
    from medseg_jax.sweep import results
    from medseg_jax.sweep.runner import run_sweep

    def build(root):
        run_sweep(str(_write_sweep(root)), root / "sweep", executor="local", max_parallel=2,
                  overrides=_sweep_overrides(tiny_dataset))
        results.results(root / "sweep")

    return built_once(tmp_path_factory, "local_sweep", build) / "sweep"


def test_a_sweep_runs_every_trial_and_fold_as_an_ordinary_run(local_sweep, tiny_dataset):
    manifest = json.loads((local_sweep / "sweep.json").read_text())
    assert manifest["folds"] == [0, 1] and set(manifest["trials"]) == set(TRIALS)
    splits = json.loads((local_sweep / "splits.json").read_text())
    assert len(splits) == 2
    for trial in TRIALS:
        assert manifest["trials"][trial]["changes"] == TRIALS[trial]
        for fold in (0, 1):
            entry = manifest["trials"][trial]["folds"][str(fold)]
            assert entry["status"] == "done", entry
            run = local_sweep / entry["run"]
            config = json.loads((run / "config.json").read_text())
            assert config["data"]["fold"] == str(fold)
            assert config["loss"]["name"] == TRIALS[trial]["loss.name"]
            summary = json.loads((run / "train_summary.json").read_text())
            assert summary["steps"] == STEPS
            # out-of-fold predictions of the fold's held-out cases: label maps in the scan's geometry, probabilities
            assert sorted(p.name for p in (run / "validation").glob("*.nii.gz")) == [
                f"{c}.nii.gz" for c in splits[fold]["val"]]
            with np.load(run / "validation" / f"{splits[fold]['val'][0]}.npz") as saved:
                probabilities = saved["probabilities"]
            assert probabilities.dtype == np.float16 and probabilities.shape[-1] == 3
            source = nib.load(tiny_dataset / "labelsTr" / f"{splits[fold]['val'][0]}.nii.gz")
            assert probabilities.shape[:3] == source.shape  # the file's voxel order, as nnU-Net saves them
            np.testing.assert_allclose(probabilities.astype(np.float32).sum(-1), 1.0, atol=5e-3)
            assert (local_sweep / entry["log"]).is_file()
    # every case is predicted once per trial, by the fold that held it out
    rows = _per_case(local_sweep)
    cases = {r["case"] for r in rows if r["trial"] == "dice_ce"}
    assert cases == {c for s in splits for c in s["val"]} and len(cases) == 6


def test_the_results_table_equals_what_the_per_case_csv_gives(local_sweep):
    rows = _per_case(local_sweep)
    content = json.loads((local_sweep / "results" / "results.json").read_text())
    table = {r["trial"]: r for r in csv.DictReader(open(local_sweep / "results" / "results.csv"))}
    for trial in TRIALS:
        mine = [r for r in rows if r["trial"] == trial]
        by_case: dict[str, list[float]] = {}
        for r in mine:
            by_case.setdefault(r["case"], []).append(float(r["dice"]))
        case_means = [np.mean([v for v in values if math.isfinite(v)]) for values in by_case.values()]
        assert float(table[trial]["dice_mean"]) == pytest.approx(np.mean(case_means), rel=1e-5)
        assert float(table[trial]["dice_std_cases"]) == pytest.approx(np.std(case_means), rel=1e-4, abs=1e-6)
        fold_means = [np.mean([np.mean([float(r["dice"]) for r in mine if r["case"] == c and r["fold"] == str(k)])
                               for c in {r["case"] for r in mine if r["fold"] == str(k)}]) for k in (0, 1)]
        assert float(table[trial]["dice_mean_over_folds"]) == pytest.approx(np.mean(fold_means), rel=1e-5)
    other = next(t for t in content["trials"] if t["trial"] == "dice")
    assert other["vs_baseline"]["cases"] == 6 and other["vs_baseline"]["baseline"] == "dice_ce"
    assert next(t for t in content["trials"] if t["trial"] == "dice_ce")["vs_baseline"] is None
    assert [t["rank"] for t in content["trials"]] == [1, 2]
    assert (local_sweep / "results" / "results.png").stat().st_size > 0
    assert "| rank | trial |" in (local_sweep / "results" / "results.md").read_text()


def test_rerunning_a_finished_sweep_changes_nothing(local_sweep, tiny_dataset):
    from medseg_jax.sweep.runner import run_sweep

    summaries = sorted(local_sweep.glob("trials/*/fold_*/train_summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    run_sweep(str(local_sweep.parent / "tiny_sweep.py"), local_sweep, overrides=_sweep_overrides(tiny_dataset))
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    # a changed sweep is refused before anything is written
    with pytest.raises(MedsegError, match=r"fold_0: this run was started with another config \(train.steps: 6 "):
        run_sweep(str(local_sweep.parent / "tiny_sweep.py"), local_sweep,
                  overrides=_sweep_overrides(tiny_dataset, steps=8))


def test_a_failing_trial_is_reported_and_the_others_finish(tiny_dataset, tmp_path):
    from medseg_jax.sweep.runner import run_sweep

    # needs 3 devices for its batch: fails in the run (after the up-front checks), as a crash would
    trials = {"good": {}, "broken": {"mesh.data": 3}}
    workdir = tmp_path / "sweep"
    with pytest.raises(MedsegError) as error:
        run_sweep(str(_write_sweep(tmp_path, trials)), workdir, folds="0",
                  overrides=_sweep_overrides(tiny_dataset, steps=2))
    assert "1 of 2 runs failed (broken fold 0" in str(error.value)
    manifest = json.loads((workdir / "sweep.json").read_text())
    assert manifest["trials"]["good"]["folds"]["0"]["status"] == "done"
    assert manifest["trials"]["broken"]["folds"]["0"]["status"] == "failed"
    assert "medseg: error: " in (workdir / manifest["trials"]["broken"]["folds"]["0"]["log"]).read_text()


def test_bad_sweeps_are_refused_before_anything_is_written(tiny_dataset, tmp_path):
    from medseg_jax.sweep.runner import run_sweep

    cases = {
        "tiny_sweep.py: trial a: its changes: unknown config key 'train.stepz'": {"a": {"train.stepz": 3}},
        "trial b: config key 'data.prefetch_batches': 0 must be at least 1": {"a": {},
                                                                               "b": {"data.prefetch_batches": 0}},
        "trial name 'a b'": {"a b": {}},
    }
    for message, trials in cases.items():
        with pytest.raises(MedsegError, match=message):
            run_sweep(str(_write_sweep(tmp_path / "files", trials)), tmp_path / "out",
                      overrides=_sweep_overrides(tiny_dataset))
        assert not (tmp_path / "out").exists()
    with pytest.raises(MedsegError, match="--folds: fold 2 but config key 'data.num_folds' is 2"):
        run_sweep(str(_write_sweep(tmp_path / "files")), tmp_path / "out", folds="0,2",
                  overrides=_sweep_overrides(tiny_dataset))
    with pytest.raises(MedsegError, match="no file nope.py in experiments/sweeps/"):
        run_sweep("nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_submitit_code_path_gives_the_local_results(local_sweep, tiny_dataset, tmp_path):
    """Fold 0 of both trials as a submitit job array (submitit's LocalExecutor: the code path of --executor slurm)."""
    from medseg_jax.sweep import results
    from medseg_jax.sweep.runner import run_sweep

    workdir = tmp_path / "sweep"
    run_sweep(str(local_sweep.parent / "tiny_sweep.py"), workdir, folds="0", executor="submitit-local",
              max_parallel=2, overrides=_sweep_overrides(tiny_dataset))
    results.results(workdir)
    manifest = json.loads((workdir / "sweep.json").read_text())
    assert all(f["status"] == "done" for t in manifest["trials"].values() for f in t["folds"].values())
    assert all(f["job"] for t in manifest["trials"].values() for f in t["folds"].values())
    fold_0 = [r for r in _per_case(local_sweep) if r["fold"] == "0"]
    assert _per_case(workdir) == fold_0  # bit-identical training, the same scores


@pytest.mark.slow
def test_a_killed_sweep_continues_where_it_stopped(local_sweep, tiny_dataset, tmp_path):
    """kill -9 of `medseg sweep` during its third run: re-running it leaves the finished runs untouched, resumes the
    interrupted one from its checkpoint and ends with the uninterrupted sweep's results."""
    workdir = tmp_path / "sweep"
    command = [sys.executable, "-m", "medseg_jax.cli", "sweep", str(local_sweep.parent / "tiny_sweep.py"),
               "--workdir", str(workdir), *_sweep_overrides(tiny_dataset)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    third = workdir / "trials" / "dice" / "fold_0" / "checkpoints" / "latest"  # runs go trial by trial, fold by fold
    deadline = time.time() + 600
    while time.time() < deadline and not (third.is_dir() and any(p.name.isdigit() for p in third.iterdir())):
        assert process.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted((workdir / "trials" / "dice_ce").glob("fold_*/train_summary.json"))
    assert len(finished) == 2
    before = {p: p.stat().st_mtime_ns for p in finished}
    assert not (workdir / "trials" / "dice" / "fold_0" / "train_summary.json").exists()
    time.sleep(1.0)  # the killed run's worker dies with the sweep (PR_SET_PDEATHSIG)
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == before
    log = (workdir / "logs" / "dice_fold0.log").read_text()
    assert "resumed from step" in log
    assert _per_case(workdir) == _per_case(local_sweep)


# --- best configuration ----------------------------------------------------------------------------------------------

def _one_hot(labels: np.ndarray, classes: int = 2) -> np.ndarray:
    return np.eye(classes, dtype=np.float16)[labels]


def _cube(shape, low, high) -> np.ndarray:
    mask = np.zeros(shape, np.int16)
    mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = 1
    return mask


def test_find_best_picks_the_better_trial_and_keeps_postprocessing_only_where_it_helps():
    from medseg_jax.sweep import best

    shape = (24, 24, 24)
    references = {f"c{i}": _cube(shape, (4 + i, 4, 4), (14 + i, 14, 14)) for i in range(4)}
    # "close" misses one slab of each object; "far" is shifted by 5 voxels: the better trial is "close", and
    # averaging it with "far" is worse than it alone
    predictions = {"close": {c: np.where(np.arange(shape[2]) < 13, r, 0) for c, r in references.items()},
                   "far": {c: np.roll(r, 5, axis=1) for c, r in references.items()}}

    def load(case):
        return references[case], {t: _one_hot(predictions[t][case]) for t in predictions}

    scores = best.score_candidates(sorted(references), load, ["close", "far"], [1], max_members=2)
    ranked = sorted(scores, key=lambda m: (-best.foreground_mean(scores[m]), len(m), m))
    assert ranked[0] == ("close",) and set(scores) == {("close",), ("far",), ("close", "far")}
    assert best.foreground_mean(scores[("close",)]) > best.foreground_mean(scores[("close", "far")])

    # spurious specks beside the object: removing them raises Dice, so the rule is kept
    specks = {c: r.copy() for c, r in references.items()}
    for labels in specks.values():
        labels[20, 20, 20] = labels[1, 20, 2] = 1
    rules, report = best.choose_postprocessing(sorted(specks), lambda c: (references[c], specks[c]), [1])
    assert rules["foreground_largest_component"] or rules["classes"].get("1")
    assert report["after"] > report["before"]
    # an organ in two pieces predicted exactly: keeping only the largest piece would lower Dice, so nothing is kept
    two_pieces = {c: np.maximum(r, _cube(shape, (18, 18, 18), (22, 22, 22))) for c, r in references.items()}
    rules, report = best.choose_postprocessing(sorted(two_pieces), lambda c: (two_pieces[c], two_pieces[c]), [1])
    assert rules == {"foreground_largest_component": False, "classes": {}}
    assert report["after"] == report["before"] == 1.0


def test_find_best_writes_an_inference_plan_that_predict_runs(local_sweep, tiny_dataset, tmp_path):
    from medseg_jax.cli import main
    from medseg_jax.sweep import best

    plan = best.find_best(local_sweep)
    assert (local_sweep / "inference_plan.json").is_file()
    assert set(plan["members"]) <= set(TRIALS) and len(plan["runs"]) == 2 * len(plan["members"])
    dice = {tuple(c["members"]): c["dice"] for c in plan["cross_validation"]["candidates"]}
    assert dice[tuple(plan["members"])] == max(dice.values())
    assert main(["predict", "--run", str(local_sweep / "inference_plan.json"), "--input",
                 str(tiny_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 0
    outputs = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert outputs == sorted(p.name for p in (tiny_dataset / "imagesTs").glob("*.nii.gz"))


def test_slurm_settings_reach_the_sbatch_script(tmp_path, monkeypatch):
    """--executor slurm builds submitit's SLURM executor from the flags and the sweep file (a stand-in srun on PATH:
    there is no cluster here); without SLURM the flag is refused in one line."""
    from medseg_jax.sweep.executors import make_executor

    with pytest.raises(MedsegError, match='--executor slurm: Could not detect "srun"'):
        make_executor("slurm", tmp_path / "no_slurm", 2, {})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = make_executor("slurm", tmp_path / "submitit", 3, {"slurm_partition": "gpu", "gpus_per_node": 1,
                                                                 "timeout_min": 600, "slurm_account": "lab"})
    parameters = executor.executor._executor.parameters
    assert parameters["array_parallelism"] == 3
    script = executor.executor._executor._make_submission_file_text("python -m medseg_jax.sweep.worker", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=600", "#SBATCH --account=lab"):
        assert line in script, script


@pytest.mark.parametrize("name", ["demo_ablation", "msd_liver_architectures", "us_2d_vs_3d"])
def test_the_shipped_sweeps_build_every_trial(name):
    from medseg_jax.parallel.mesh import make_mesh_layout
    from medseg_jax.sweep.runner import find_sweep_file, load_sweep, trial_configs
    from medseg_jax.train.experiment import build_experiment

    path = find_sweep_file(name)  # found by name, as `medseg sweep NAME` does
    sweep = load_sweep(path)
    configs = trial_configs(sweep, path, [])
    assert set(configs) == set(sweep.trials) and sweep.baseline in configs
    assert len({json.dumps(c.to_dict(), sort_keys=True, default=str) for c in configs.values()}) == len(configs)
    if name == "us_2d_vs_3d":  # one sweep, two dimensions: each trial builds its own network and step
        for trial, dims in (("2d", 2), ("3d", 3)):
            config = configs[trial]
            experiment = build_experiment(config, 4, 1, make_mesh_layout(None, spatial_dims=dims))
            assert experiment.batch_shapes["image"][1:-1] == experiment.augment.input_size
            assert len(experiment.augment.input_size) == dims


def test_a_damaged_manifest_is_one_line(tmp_path):
    from medseg_jax.sweep import results

    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(MedsegError, match=r"sweep.json: cannot read the sweep manifest"):
        results.results(tmp_path)
    (tmp_path / "sweep.json").write_text("[]")
    with pytest.raises(MedsegError, match=r"sweep.json: not a sweep manifest"):
        results.results(tmp_path)
    assert not (tmp_path / "results").exists()
