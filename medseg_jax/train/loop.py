"""The training loop: feeds the experiment's jitted step, logs, validates and checkpoints.

Everything numerical happens in the step (`train/step.py`), built with the rest of the setup by
`train/experiment.build_experiment`. Training data come from a prepared store (`data/training_store.py`: made by
`medseg prepare` or here from `data.dataset`) streamed by the grain loader (`data/loader.py`). The batch of step s and
the augmentation key of step s are pure functions of (seed, s), and the loader's iterator state is checkpointed with
the train state, so a run resumed from its latest checkpoint continues bit for bit as if it had never stopped (on CPU,
same device count). At the end, validation cases are predicted in their source files' geometry (through the store's
manifest) into RUN/validation/.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, runs, viz
from medseg_jax.data import loader
from medseg_jax.data.splits import train_val_cases
from medseg_jax.data.training_store import open_training_store
from medseg_jax.errors import MedsegError
from medseg_jax.experiments import schema
from medseg_jax.metrics.overlap import nanmean
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.divergence import DivergenceGuard
from medseg_jax.train.experiment import (
    apply_dataset_regions,
    build_experiment,
    is_pretraining,
    run_keys,
    transferred_params,
)
from medseg_jax.train.metrics_log import MetricsLog
from medseg_jax.train.validation import evaluate_cases, export_validation, load_val_cases

log = logging.getLogger(__name__)


def check_run_dir(run: runs.RunDir, resume: bool) -> bool:
    """Whether training continues from a checkpoint. `--resume` of a run stopped before its first checkpoint (it has
    its config.json) starts it again from step 0; a fresh start refuses a run directory that holds a run."""
    if resume and not run.has_checkpoint():
        if not run.config_path.is_file():
            raise MedsegError(f"{run.path}: --resume given but this is not a run directory (no config.json, no "
                              "checkpoint); start a run there with --config")
        log.info("%s has no checkpoint yet (stopped before the first one): starting it again from step 0", run.path)
        return False
    planned = ("store", "config.json", "model_plan.json")  # what `medseg plan` leaves for training to start from
    # (hidden names are our temporaries and locks, e.g. those of a store preparation killed before training began)
    if not resume and run.path.exists() and any(p.name not in planned and not p.name.startswith(".")
                                                for p in run.path.iterdir()):
        advice = ("pass --resume to continue it" if run.has_checkpoint() else
                  "it stopped before its first checkpoint: pass --resume to start it again from step 0")
        raise MedsegError(f"{run.path}: work directory is not empty; {advice}, or choose another --workdir")
    if jax.process_count() > 1:  # every process has looked at the directory before any writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("medseg: run directory checked")
    return resume


def train(config: ml_collections.ConfigDict, workdir: str | Path, resume: bool = False,
          stop_at_step: int | None = None, profile_steps: int = 0) -> dict:
    """Trains the experiment `config` in `workdir`; returns the training summary.

    `stop_at_step` stops early after saving a checkpoint, as an interruption would (tests use it for resume).
    `profile_steps` > 0 records a jax profiler trace of that many steps after the first (compiling) one into
    RUN/profile/ (TensorBoard's profile plugin, or Perfetto: RUN/profile/**/perfetto_trace.json.gz).
    """
    if profile_steps < 0:
        raise MedsegError(f"--profile {profile_steps}: must be a number of steps, at least 1")
    schema.check(config)
    run = runs.RunDir(workdir)
    # One writer per run directory (process 0 of a multi-host run holds the lock for all of them).
    lock = fileio.exclusive(run.path, "being trained") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(config, run, resume, stop_at_step, profile_steps)


class StepTimes:
    """Where a step's wall time goes, summed between log records: waiting for the batch (`data_wait`), handing the
    step to the device (`dispatch`; the step itself runs asynchronously) and waiting for the device when metrics are
    read (`host_sync`, which holds the device time the host did not hide)."""

    KEYS = ("data_wait", "dispatch", "host_sync")

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals = dict.fromkeys(self.KEYS, 0.0)
        self.steps, self.since = 0, time.perf_counter()

    def add(self, key: str, seconds: float):
        self.totals[key] += seconds

    def record(self) -> dict:
        """Seconds per step of each part and of the wall clock since the last record."""
        steps = max(self.steps, 1)
        result = {f"time_{key}": round(value / steps, 5) for key, value in self.totals.items()}
        result["time_step_wall"] = round((time.perf_counter() - self.since) / steps, 5)
        return result


def recorded_store_version(config: ml_collections.ConfigDict, run: runs.RunDir, resume: bool) -> int:
    """The store version a run trains on: a resumed run keeps the one it started on, whatever was added to the store
    since; a new one takes `data.store_version` (0: the newest)."""
    asked = int(config.data.get("store_version", 0) or 0)
    recorded = run.store_version() if resume else None
    if recorded is None:
        return asked
    if asked and asked != recorded:
        raise MedsegError(f"config key 'data.store_version': {asked}, but {run.path} trains on version {recorded} of "
                          "its store; resume it without the override, or start a new run")
    return recorded


def _train(config: ml_collections.ConfigDict, run: runs.RunDir, resume: bool, stop_at_step: int | None,
           profile_steps: int = 0) -> dict:
    resume = check_run_dir(run, resume)
    started = time.time()
    layout = mesh_lib.make_mesh_layout(config.get("mesh"), spatial_dims=len(config.train.patch_size))
    # checked before any data is touched
    mesh_lib.check_batch_divisible(config.train.batch_size, layout)
    mesh_lib.check_batch_divisible(config.infer.batch_size, layout, key="infer.batch_size")
    store = open_training_store(config.data, run.path, recorded_store_version(config, run, resume))
    plan = store.plan
    apply_dataset_regions(config, plan)  # a region-labelled dataset trains on its regions
    pretraining = is_pretraining(config)
    if pretraining:  # masked image modelling learns from every image; nothing to validate a segmentation on
        train_ids, val_ids, folds = list(store.case_ids), [], None
    elif not store.labelled:
        raise MedsegError(f"{store.root}: this store holds images without labels (prepared with --unlabelled): "
                          "pretrain on it with `medseg pretrain`, and train on a labelled store")
    else:
        train_ids, val_ids, folds = train_val_cases(config.data, store.case_ids)
    val_cases = load_val_cases(store, val_ids)
    num_classes = len(plan["labels"])
    experiment = build_experiment(config, num_classes, len(plan["normalization"]), layout)
    init_key, step_key = run_keys(config.seed)
    state = experiment.init_state(init_key)

    total_steps = config.train.steps
    shapes, shardings = experiment.batch_shapes, experiment.batch_shardings
    # Each process reads only the samples its devices hold (all of them when the batch is not split over processes).
    rows = mesh_lib.local_rows(shardings["image"], shapes["image"])
    # (pretraining samples patches anywhere: its store may hold no labels to centre them on)
    oversample = 0.0 if pretraining else config.data.oversample_foreground
    sampler = loader.PatchSampler(store, train_ids, experiment.augment.input_size, config.train.batch_size,
                                  oversample, config.seed, rows)
    if jax.process_count() > 1:
        log.info("process %d of %d: %d local devices, reads batch rows %s", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), rows)
    # The config first: a run directory that holds anything holds its config.json (a kill from here on leaves a run
    # that `--resume` continues or starts again).
    run.path.mkdir(parents=True, exist_ok=True)
    if not resume and jax.process_index() == 0:  # (again, for a run started over)
        run.save_config(config)
        run.save_plans(plan)
        if folds is not None:  # the folds this run's fold was drawn from, as nnU-Net keeps splits_final.json
            fileio.write_json(run.splits_path, folds)
        # which cases: the store may get new versions (`medseg dataset add`) while this run trains or after it
        fileio.write_json(run.data_version_path, {"store": str(store.root.absolute()), "version": store.version,
                                                  "cases": len(store.case_ids)})
    start_step = 0
    latest, best = run.checkpoint_managers(writer=True)
    data_restorable = False
    if resume:
        start_step = latest.latest_step()
        # The loader's own state restores when this process count wrote it; otherwise the stream restarts at the
        # checkpoint's step, which gives the same batches (every sample is a function of seed, step and row).
        data_restorable = runs.has_data_state(latest, start_step)
    dataset = loader.make_dataset(sampler, total_steps, workers=config.data.workers, threads=config.data.threads,
                                  prefetch_batches=config.data.prefetch_batches,
                                  start_step=0 if data_restorable else start_step)
    data_iterator = iter(dataset)

    if resume:
        state = runs.restore_into(latest, start_step, state, data_iterator if data_restorable else None)
        if jax.process_index() == 0:
            log.info("resumed from step %d on %s", start_step, mesh_lib.describe_mesh(layout))
    elif config.train.get("init_from"):
        params, report = runs.init_params_from(config.train.init_from, state.params,
                                               only=transferred_params(config))
        state = state.replace(params=params)
        if jax.process_index() == 0:
            log.info("%s", report)
    metrics_log = MetricsLog(run, keep_until_step=start_step if resume else None)

    train_step = experiment.train_step
    forward = experiment.make_forward()
    batches = loader.device_batches(data_iterator, shardings, shapes, rows)

    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    best_dice = max([r["val_dice"] for r in run.read_metrics() if r.get("kind") == "val"] or [float("nan")])
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet read
    window: list[dict] = []  # host metrics of the finite steps since the last log record
    guard = DivergenceGuard(config.train.get("nonfinite", "stop"), config.train.get("max_nonfinite_steps", 10))
    last_loss = float("nan")
    train_seconds = 0.0
    original_dice: dict = {}

    def export_final(case, logits):
        original_dice[case.case_id] = export_validation(store, run, case, logits, experiment.regions,
                                                        save_probabilities=folds is not None)

    progress = tqdm(range(start_step, end_step), initial=start_step, total=total_steps, desc="training",
                    unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)
    step_started = time.time()
    first_step_seconds = None
    times = StepTimes()
    # the trace starts after the first step, so that it shows training rather than compilation
    profile_window = (start_step + 1, start_step + 1 + profile_steps) if profile_steps else None
    profiling = False
    for step in progress:
        if profile_window and step == profile_window[0] and jax.process_index() == 0:
            jax.profiler.start_trace(str(run.path / "profile"), create_perfetto_trace=True)
            profiling = True
        tick = time.perf_counter()
        batch = next(batches)
        times.add("data_wait", time.perf_counter() - tick)
        tick = time.perf_counter()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_step(state, batch, jax.random.fold_in(step_key, step))
        times.add("dispatch", time.perf_counter() - tick)
        times.steps += 1
        if first_step_seconds is None:  # the train step's compilation (or persistent-cache load) and the first batch
            first_step_seconds = round(time.time() - step_started, 2)
            times.reset()  # compilation is not a step's time
        done = step + 1
        if profiling and done == min(profile_window[1], end_step):
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            profiling = False
            log.info("profiler trace of steps %d-%d in %s (TensorBoard: tensorboard --logdir %s; or open "
                     "perfetto_trace.json.gz at ui.perfetto.dev)", profile_window[0] + 1, done, run.path / "profile",
                     run.path / "profile")
        pending.append((done, metrics))
        log_now = done % config.train.log_every == 0 or done == end_step
        validate_now = bool(val_cases) and (done % config.train.val_every == 0 or done == total_steps)
        save_now = done % config.train.checkpoint_every == 0 or done == end_step
        if log_now or validate_now or save_now:  # read the steps' metrics before anything is logged or saved
            tick = time.perf_counter()
            values = [(s, {k: float(mesh_lib.to_host(v)) for k, v in m.items()}) for s, m in pending]
            times.add("host_sync", time.perf_counter() - tick)
            pending = []
            guard.check(values, latest.latest_step(), run.path)
            window += [v for _, v in values if v["finite"]]
        if log_now and window:
            record = {"kind": "train", "step": done,
                      **{k: float(np.mean([v[k] for v in window])) for k in window[0] if k != "finite"}}
            if guard.skipped:
                record["skipped_steps"] = guard.skipped
            if times.steps:
                record.update(times.record())
            times.reset()
            window = []
            last_loss = record["loss"]
            progress.set_postfix(loss=f"{last_loss:.4f}", best_val=f"{best_dice:.3f}")
            metrics_log.write(record)
        if validate_now:
            train_seconds += time.time() - step_started
            final = done == total_steps and jax.process_index() == 0
            result = evaluate_cases(forward, state.params, val_cases, config, num_classes,
                                    on_logits=export_final if final else None, regions=experiment.regions)
            metrics_log.write({"kind": "val", "step": done, **result})
            best_dice = result["val_dice"] if np.isnan(best_dice) else max(best_dice, result["val_dice"])
            runs.save_checkpoint(best, done, state.to_dict(), metrics={"val_dice": result["val_dice"]})
            progress.set_postfix(loss=f"{last_loss:.4f}", best_val=f"{best_dice:.3f}")
            step_started = time.time()
            times.reset()  # validation is not a step's time
        if save_now:
            runs.save_checkpoint(latest, done, state.to_dict(), data_iterator, force=True)
    if profiling:  # (a run stopped before the window ended)
        jax.profiler.stop_trace()
    train_seconds += time.time() - step_started
    progress.close()
    if hasattr(data_iterator, "close"):
        data_iterator.close()
    latest.wait_until_finished()
    best.wait_until_finished()
    metrics_log.close()

    summary = {"steps": int(mesh_lib.to_host(state.step)), "total_steps": total_steps,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "first_step_seconds": first_step_seconds,
               "device": mesh_lib.describe_devices(), "mesh": layout.describe(),
               "processes": jax.process_count(), "best_val_dice": None if np.isnan(best_dice) else best_dice,
               "best_step": best.best_step(), "store": str(store.root), "store_version": store.version,
               "skipped_steps": guard.skipped,
               "task": "pretrain" if pretraining else "segment"}
    if original_dice:
        per_class = {str(c): nanmean([d.get(c, float("nan")) for d in original_dice.values()])
                     for c in range(1, num_classes)}
        summary["final_val_dice_original_grid"] = {"mean": nanmean(per_class.values()), "per_class": per_class,
                                                   "cases": sorted(original_dice)}
    if jax.process_index() == 0:
        viz.training_curve_png(run.read_metrics(), run.curve_path)
        fileio.write_json(run.summary_path, summary)
    return summary
