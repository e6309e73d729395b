"""`medseg sweep SWEEP --workdir DIR`: every trial x fold of a sweep file as an ordinary run directory.

    DIR/sweep.json                  the manifest: sweep file, base, baseline, folds, overrides; per trial its changes
                                    and per fold its status (pending | running | done | failed), run directory, log,
                                    job id and seconds
    DIR/splits.json                 the folds every trial uses (nnU-Net's splits_final.json format)
    DIR/stores/<n>/                 one prepared store per distinct data config (when the base names data.dataset)
    DIR/trials/<trial>/fold_<k>/    run directories (`medseg predict --run` works on each)
    DIR/logs/<trial>_fold<k>.log    each run's output
    DIR/xla_cache/                  XLA's persistent compilation cache, shared by the runs (folds of a trial compile
                                    their train step once)

Everything is checked before anything is written: the sweep file, every trial's config (unknown keys, values), and
that run directories left by an earlier call hold the same config. Re-running the same command skips finished runs and
resumes interrupted ones from their latest checkpoint; a failed run is reported with the tail of its log and does not
stop the others.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from tqdm.auto import tqdm

from medseg_jax import config as config_lib
from medseg_jax import experiments, fileio, runs
from medseg_jax.data import splits as splits_lib
from medseg_jax.data.prepare import data_config_record, prepare
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.experiments import schema
from medseg_jax.experiments.trials import Sweep, apply_changes
from medseg_jax.sweep.executors import Outcome, Task, make_executor
from medseg_jax.sweep.results import read_manifest

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 12


def find_sweep_file(spec: str) -> Path:
    """A path to a sweep file, or the name of one in experiments/sweeps/ (packaged with medseg_jax)."""
    path = Path(spec)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise MedsegError(f"{path}: sweep file not found")
        return path
    packaged = Path(importlib.resources.files(experiments).joinpath("sweeps", f"{spec}.py"))
    if not packaged.is_file():
        raise MedsegError(f"sweep {spec!r}: no file {spec}.py in experiments/sweeps/ and no such path")
    return packaged


def load_sweep(path: Path) -> Sweep:
    module_spec = importlib.util.spec_from_file_location(f"medseg_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except MedsegError as exc:
        raise MedsegError(f"{path}: {exc}") from None
    except Exception as exc:  # the user's file
        raise MedsegError(f"{path}: cannot load sweep file ({type(exc).__name__}: {exc})") from None
    if not hasattr(module, "get_sweep"):
        raise MedsegError(f"{path}: sweep file has no get_sweep() function")
    try:
        sweep = module.get_sweep()
        if isinstance(sweep, dict):
            sweep = Sweep(**sweep)
    except MedsegError as exc:
        raise MedsegError(f"{path}: {exc}") from None
    except Exception as exc:
        raise MedsegError(f"{path}: get_sweep() failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(sweep, Sweep):
        raise MedsegError(f"{path}: get_sweep() must return medseg_jax.experiments.trials.Sweep")
    return sweep


def base_config(sweep: Sweep, sweep_path: Path) -> ml_collections.ConfigDict:
    """The base experiment: a packaged experiment's name (demo_ct) or a file relative to the sweep file."""
    candidates = [sweep_path.parent / sweep.base, Path(sweep.base),
                  Path(importlib.resources.files(experiments).joinpath(f"{sweep.base}.py"))]
    for candidate in candidates:
        if candidate.suffix == ".py" and candidate.is_file():
            return config_lib.load_config_file(candidate)
    raise MedsegError(f"{sweep_path}: base experiment {sweep.base!r} is neither a file nor a packaged experiment")


def parse_folds(text: str | None, default: Sequence[int]) -> list[int]:
    if not text:
        return list(default)
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MedsegError(f"--folds {text}: expected fold numbers such as 0,1,2,3,4") from None
    if not folds or any(f < 0 for f in folds) or len(set(folds)) != len(folds):
        raise MedsegError(f"--folds {text}: expected distinct fold numbers such as 0,1,2,3,4")
    return folds


def trial_configs(sweep: Sweep, sweep_path: Path, overrides: Sequence[str]) -> dict[str, ml_collections.ConfigDict]:
    """Each trial's config: base, the sweep's changes, the trial's, then the command line's overrides; all checked."""
    base = base_config(sweep, sweep_path)
    configs = {}
    for name, changes in sweep.trials.items():
        try:
            config = apply_changes(apply_changes(base, sweep.changes, "the sweep's changes"), changes, "its changes")
            config = config_lib.apply_overrides(config, overrides)
            schema.check(config)
        except MedsegError as exc:
            raise MedsegError(f"{sweep_path}: trial {name}: {exc}") from None
        configs[name] = config
    return configs


def _store_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]


class Manifest:
    """DIR/sweep.json, rewritten atomically at every change."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content = path, content

    def fold(self, trial: str, fold: int) -> dict:
        return self.content["trials"][trial]["folds"][str(fold)]

    def set(self, trial: str, fold: int, **values) -> None:
        self.fold(trial, fold).update(values)
        fileio.write_json(self.path, self.content)


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    found = []
    for key in keys:
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return found


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)"
    text = path.read_text(errors="replace").replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in kept)


def run_sweep(spec: str, workdir: str | Path, *, folds: str | None = None, executor: str = "local",
              max_parallel: int = 1, overrides: Sequence[str] = (), slurm: dict | None = None) -> dict:
    """Runs (or continues) the sweep `spec` in `workdir`; returns the manifest. Raises MedsegError, after every run
    has finished, when some failed."""
    workdir = Path(workdir)
    sweep_path = find_sweep_file(spec)
    sweep = load_sweep(sweep_path)
    configs = trial_configs(sweep, sweep_path, overrides)
    fold_list = parse_folds(folds, sweep.folds)
    # built (and its flags checked) before anything of the sweep is written
    launcher = make_executor(executor, workdir / "submitit", max_parallel, {**sweep.slurm, **(slurm or {})})
    with fileio.exclusive(workdir, "running a sweep"):
        return _run(sweep, sweep_path, configs, fold_list, workdir, executor, launcher, max_parallel,
                    list(overrides))


def _store_paths(configs: dict[str, ml_collections.ConfigDict], workdir: Path) -> dict[str, Path]:
    """The store of each trial: its data.store, or DIR/stores/<key>, one per distinct data config, prepared here."""
    paths = {}
    for name, config in configs.items():
        if config.data.store:
            paths[name] = Path(config.data.store)
        elif not config.data.dataset:
            raise MedsegError(f"trial {name}: config keys 'data.store' and 'data.dataset' are both empty: pass "
                              "--config.data.dataset=DIR or --config.data.store=STORE")
        else:
            paths[name] = workdir / "stores" / _store_key(data_config_record(config.data))
    return paths


def _stores(configs: dict[str, ml_collections.ConfigDict], paths: dict[str, Path]) -> dict[str, Store]:
    opened: dict[Path, Store] = {}
    for name, config in configs.items():
        path = paths[name]
        if path not in opened:
            if not config.data.store:
                if not (path / "manifest.json").is_file():
                    log.info("preparing %s into %s", config.data.dataset, path)
                prepare(config.data.dataset, path, config.data, workers=max(1, int(config.data.prepare_workers)))
            opened[path] = Store(path)
    return {name: opened[paths[name]] for name in configs}


def _folds(configs: dict, stores: dict[str, Store], workdir: Path, fold_list: list[int]) -> None:
    """DIR/splits.json: written once, from the base config's fold keys (data.splits_file, num_folds, split_seed,
    grouping) over the store's cases; every trial and every later call reads it."""
    path = workdir / "splits.json"
    first = next(iter(configs))
    case_ids = stores[first].case_ids
    if path.is_file():
        folds = splits_lib.read_splits(path)
        splits_lib.check_splits(folds, case_ids, str(path))
    else:
        folds = splits_lib.folds_for(configs[first].data, case_ids)
    for name, store in stores.items():
        if sorted(store.case_ids) != sorted(case_ids):
            raise MedsegError(f"trial {name}: its store {store.root} holds other cases than {stores[first].root}; "
                              "every trial of a sweep must see the same cases")
    too_high = [f for f in fold_list if f >= len(folds)]
    if too_high:
        raise MedsegError(f"--folds: fold {too_high[0]} but there are {len(folds)} folds (0 to {len(folds) - 1})")
    if not path.is_file():
        fileio.write_json(path, folds)


def _run(sweep: Sweep, sweep_path: Path, configs: dict, fold_list: list[int], workdir: Path, executor_name: str,
         executor, max_parallel: int, overrides: list[str]) -> dict:
    manifest_path = workdir / "sweep.json"
    previous = read_manifest(manifest_path) if manifest_path.is_file() else {}
    # Every run directory's config is decided, and those of earlier calls compared, before anything is written.
    tasks, wanted = [], {}
    store_paths = _store_paths(configs, workdir)
    splits_path = workdir / "splits.json"
    first = configs[next(iter(configs))]
    if not first.data.get("splits_file") and not splits_path.is_file():
        too_high = [f for f in fold_list if f >= first.data.num_folds]
        if too_high:
            raise MedsegError(f"--folds: fold {too_high[0]} but config key 'data.num_folds' is "
                              f"{first.data.num_folds} (folds 0 to {first.data.num_folds - 1})")
    for name, config in configs.items():
        for fold in fold_list:
            run_config = ml_collections.ConfigDict(config.to_dict())
            run_config.data.store = str(store_paths[name].resolve())
            run_config.data.dataset = ""
            run_config.data.fold = str(fold)
            run_config.data.splits_file = str(splits_path.resolve())
            run = runs.RunDir(workdir / "trials" / name / f"fold_{fold}")
            plain = config_lib.to_plain(run_config)
            if run.config_path.is_file():
                differing = _differences(json.loads(run.config_path.read_text()), plain)
                if differing:
                    raise MedsegError(f"{run.path}: this run was started with another config ({differing[0]}); "
                                      "choose another --workdir for a changed sweep")
            wanted[(name, fold)] = (run, run_config)
            tasks.append(Task(name, fold, run.path, workdir / "logs" / f"{name}_fold{fold}.log",
                              (workdir / "xla_cache").resolve()))
    stores = _stores(configs, store_paths)
    _folds(configs, stores, workdir, fold_list)

    content = {
        "sweep": str(sweep_path.resolve()), "base": sweep.base, "baseline": sweep.baseline,
        "folds": sorted(set(fold_list) | {int(f) for f in previous.get("folds", [])}),
        "overrides": overrides, "executor": executor_name, "splits": splits_path.name,
        "trials": {name: {"changes": config_lib.to_plain(changes),
                          "folds": previous.get("trials", {}).get(name, {}).get("folds", {})}
                   for name, changes in sweep.trials.items()},
    }
    manifest = Manifest(manifest_path, content)
    todo = []
    for task in tasks:
        run, run_config = wanted[(task.trial, task.fold)]
        entry = content["trials"][task.trial]["folds"].setdefault(str(task.fold), {})
        entry.update(run=str(run.path.relative_to(workdir)), log=str(task.log.relative_to(workdir)))
        if run.summary_path.is_file():
            entry["status"] = "done"
            continue
        holder = fileio.live_holder(run.path)
        if holder is not None:  # a job of an earlier call still trains it (a SLURM job, a submitit-local process)
            entry.update(status="running", job=f"pid {holder.get('pid')} on {holder.get('host')}")
            log.info("%s fold %d: still being trained by pid %s on %s; not started again", task.trial, task.fold,
                     holder.get("pid"), holder.get("host"))
            continue
        if not run.config_path.is_file():
            run.path.mkdir(parents=True, exist_ok=True)
            run.save_config(run_config)
        entry["status"] = "resuming" if run.has_checkpoint() else "pending"
        todo.append(task)
    fileio.write_json(manifest_path, content)

    done = sum(1 for t in tasks if manifest.fold(t.trial, t.fold)["status"] == "done")
    log.info("sweep %s: %d trials x %d folds; %d done, %d to run (%s, %d at once)", sweep_path.stem, len(configs),
             len(fold_list), done, len(todo), executor_name, max_parallel)
    failures: list[tuple[Task, Outcome]] = []
    starts: dict[tuple[str, int], float] = {}

    def started(task: Task, job: str) -> None:
        starts[(task.trial, task.fold)] = time.time()
        manifest.set(task.trial, task.fold, status="running", job=job)

    progress = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True, disable=not todo)

    def finished(task: Task, outcome: Outcome) -> None:
        progress.update(1)
        seconds = round(time.time() - starts.get((task.trial, task.fold), time.time()), 1)
        done_now = outcome.ok and runs.RunDir(task.run_dir).summary_path.is_file()
        manifest.set(task.trial, task.fold, status="done" if done_now else "failed", seconds=seconds,
                     **({} if done_now else {"error": outcome.detail or "no training summary written"}))
        if done_now:
            log.info("%s: done in %.0f s", task.name, seconds)
        else:
            failures.append((task, outcome))
            log.warning("%s: failed (%s); log %s:\n%s", task.name, outcome.detail, task.log, log_tail(task.log))

    if todo:
        try:
            executor.run(todo, started, finished)
        finally:
            progress.close()
    busy = [t for t in tasks if manifest.fold(t.trial, t.fold)["status"] == "running"]
    if failures or busy:
        parts = []
        if failures:
            parts.append(f"{len(failures)} of {len(tasks)} runs failed ({failures[0][0].name}: see "
                         f"{failures[0][0].log})")
        if busy:
            parts.append(f"{len(busy)} still running elsewhere ({busy[0].name})")
        raise MedsegError(f"sweep {workdir}: " + "; ".join(parts) + "; the others are done; re-run the same "
                          "command to retry or continue them")
    return manifest.content

