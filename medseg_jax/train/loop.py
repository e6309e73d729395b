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

import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from medseg_jax import fileio, runs, viz
from medseg_jax.data import loader
from medseg_jax.data.splits import split_cases
from medseg_jax.data.training_store import open_training_store
from medseg_jax.errors import MedsegError
from medseg_jax.metrics.overlap import nanmean
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.experiment import build_experiment
from medseg_jax.train.metrics_log import MetricsLog
from medseg_jax.train.validation import evaluate_cases, export_validation, load_val_cases

log = logging.getLogger(__name__)


def check_run_dir(run: runs.RunDir, resume: bool) -> None:
    if resume and not run.has_checkpoint():
        raise MedsegError(f"{run.path}: --resume given but there is no checkpoint to resume from")
    planned = ("store", "config.json", "model_plan.json")  # what `medseg plan` leaves for training to start from
    if not resume and run.path.exists() and any(p.name not in planned for p in run.path.iterdir()):
        raise MedsegError(f"{run.path}: work directory is not empty; pass --resume to continue it or choose another")
    if jax.process_count() > 1:  # every process has looked at the directory before any writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("medseg: run directory checked")


def train(config: ml_collections.ConfigDict, workdir: str | Path, resume: bool = False,
          stop_at_step: int | None = None) -> dict:
    """Trains the experiment `config` in `workdir`; returns the training summary.

    `stop_at_step` stops early after saving a checkpoint, as an interruption would (tests use it for resume).
    """
    run = runs.RunDir(workdir)
    check_run_dir(run, resume)
    started = time.time()
    layout = mesh_lib.make_mesh_layout(config.get("mesh"), spatial_dims=len(config.train.patch_size))
    # checked before any data is touched
    mesh_lib.check_batch_divisible(config.train.batch_size, layout)
    mesh_lib.check_batch_divisible(config.infer.batch_size, layout, key="infer.batch_size")
    store = open_training_store(config.data, run.path)
    plan = store.plan
    train_ids, val_ids = split_cases(store.case_ids, config.data.val_cases)
    val_cases = load_val_cases(store, val_ids)
    num_classes = len(plan["labels"])
    experiment = build_experiment(config, num_classes, len(plan["normalization"]), layout)
    root_key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(root_key)
    state = experiment.init_state(init_key)

    total_steps = config.train.steps
    shapes, shardings = experiment.batch_shapes, experiment.batch_shardings
    # Each process reads only the samples its devices hold (all of them when the batch is not split over processes).
    rows = mesh_lib.local_rows(shardings["image"], shapes["image"])
    sampler = loader.PatchSampler(store, train_ids, experiment.augment.input_size, config.train.batch_size,
                                  config.data.oversample_foreground, config.seed, rows)
    if jax.process_count() > 1:
        log.info("process %d of %d: %d local devices, reads batch rows %s", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), rows)
    start_step = 0
    latest, best = run.checkpoint_managers()
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

    run.path.mkdir(parents=True, exist_ok=True)
    if not resume and jax.process_index() == 0:
        run.save_config(config)
        run.save_plans(plan)
    if resume:
        state = runs.restore_into(latest, start_step, state, data_iterator if data_restorable else None)
        if jax.process_index() == 0:
            log.info("resumed from step %d on %s", start_step, mesh_lib.describe_mesh(layout))
    elif config.train.get("init_from"):
        params, report = runs.init_params_from(config.train.init_from, state.params)
        state = state.replace(params=params)
        if jax.process_index() == 0:
            log.info("%s", report)
    metrics_log = MetricsLog(run, keep_until_step=start_step if resume else None)

    train_step = experiment.train_step
    forward = experiment.make_forward()
    batches = loader.device_batches(data_iterator, shardings, shapes, rows)

    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    best_dice = max([r["val_dice"] for r in run.read_metrics() if r.get("kind") == "val"] or [float("nan")])
    pending: list[dict] = []
    last_loss = float("nan")
    train_seconds = 0.0
    original_dice: dict = {}

    def export_final(case, logits):
        original_dice[case.case_id] = export_validation(store, run, case, logits, experiment.regions)

    progress = tqdm(range(start_step, end_step), initial=start_step, total=total_steps, desc="training",
                    unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)
    step_started = time.time()
    for step in progress:
        state, metrics = train_step(state, next(batches), jax.random.fold_in(step_key, step))
        pending.append(metrics)
        done = step + 1
        if done % config.train.log_every == 0 or done == end_step:
            values = [{k: float(mesh_lib.to_host(v)) for k, v in m.items()} for m in pending]
            record = {"kind": "train", "step": done,
                      **{k: float(np.mean([v[k] for v in values])) for k in values[0]}}
            pending = []
            last_loss = record["loss"]
            progress.set_postfix(loss=f"{last_loss:.4f}", best_val=f"{best_dice:.3f}")
            metrics_log.write(record)
        if val_cases and (done % config.train.val_every == 0 or done == total_steps):
            train_seconds += time.time() - step_started
            final = done == total_steps and jax.process_index() == 0
            result = evaluate_cases(forward, state.params, val_cases, config, num_classes,
                                    on_logits=export_final if final else None, regions=experiment.regions)
            metrics_log.write({"kind": "val", "step": done, **result})
            best_dice = result["val_dice"] if np.isnan(best_dice) else max(best_dice, result["val_dice"])
            runs.save_checkpoint(best, done, state.to_dict(), metrics={"val_dice": result["val_dice"]})
            progress.set_postfix(loss=f"{last_loss:.4f}", best_val=f"{best_dice:.3f}")
            step_started = time.time()
        if done % config.train.checkpoint_every == 0 or done == end_step:
            runs.save_checkpoint(latest, done, state.to_dict(), data_iterator, force=True)
    train_seconds += time.time() - step_started
    progress.close()
    if hasattr(data_iterator, "close"):
        data_iterator.close()
    latest.wait_until_finished()
    best.wait_until_finished()
    metrics_log.close()

    summary = {"steps": int(mesh_lib.to_host(state.step)), "total_steps": total_steps,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "device": mesh_lib.describe_devices(), "mesh": layout.describe(),
               "processes": jax.process_count(), "best_val_dice": None if np.isnan(best_dice) else best_dice,
               "best_step": best.best_step(), "store": str(store.root)}
    if original_dice:
        per_class = {str(c): nanmean([d.get(c, float("nan")) for d in original_dice.values()])
                     for c in range(1, num_classes)}
        summary["final_val_dice_original_grid"] = {"mean": nanmean(per_class.values()), "per_class": per_class,
                                                   "cases": sorted(original_dice)}
    if jax.process_index() == 0:
        viz.training_curve_png(run.read_metrics(), run.curve_path)
        fileio.write_json(run.summary_path, summary)
    return summary
