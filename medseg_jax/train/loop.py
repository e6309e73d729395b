"""The training loop: data, state, the jitted step, logging, validation and checkpoints.

Everything numerical happens in `train/step.py`; this module only feeds it. The batch of step s and the augmentation
key of step s are pure functions of (seed, s), so a run resumed from its latest checkpoint continues bit for bit as if
it had never stopped (on CPU, same device count).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from medseg_jax import augment, fileio, runs, viz
from medseg_jax.data import cases as cases_lib
from medseg_jax.data import preprocess, sampling
from medseg_jax.errors import MedsegError
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.io import layout
from medseg_jax.metrics.overlap import dice_per_class, nanmean
from medseg_jax.models.registry import build_model
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train import step as step_lib


def describe_device() -> str:
    devices = jax.devices()
    kind = devices[0].device_kind if hasattr(devices[0], "device_kind") else devices[0].platform
    return f"{len(devices)}x {devices[0].platform} ({kind})"


def split_cases(training: Sequence[layout.Case], num_val: int):
    if num_val < 0 or num_val >= len(training):
        raise MedsegError(f"config key 'data.val_cases': {num_val} validation cases leaves none of the "
                          f"{len(training)} training cases to train on")
    ordered = sorted(training, key=lambda c: c.case_id)
    return (ordered[:len(ordered) - num_val], ordered[len(ordered) - num_val:]) if num_val else (ordered, [])


def check_patch_size(patch_size: Sequence[int], model) -> None:
    factors = model.total_downsampling()
    if len(patch_size) != len(factors):
        raise MedsegError(f"config key 'train.patch_size': {tuple(patch_size)} needs {len(factors)} axes")
    for axis, (p, f) in enumerate(zip(patch_size, factors)):
        if p % f:
            raise MedsegError(f"config key 'train.patch_size': axis {axis} size {p} does not divide by the U-Net's "
                              f"total downsampling {f}")


def prepare_training_data(config: ml_collections.ConfigDict):
    """Loads, checks, plans and preprocesses the dataset named by `config.data.dataset`."""
    if not config.data.dataset:
        raise MedsegError("config key 'data.dataset' is empty: pass --config.data.dataset=DIR (a dataset folder in "
                          "Decathlon layout, e.g. made by `medseg demo-data`)")
    spec = layout.load_dataset(config.data.dataset)
    labels = sorted(spec.labels)
    if labels != list(range(len(labels))):
        raise MedsegError(f"{spec.root / 'dataset.json'}: label values {labels} are not 0..K-1 (not supported yet)")
    train_cases, val_cases = split_cases(spec.training, config.data.val_cases)
    loaded_train = cases_lib.load_cases(train_cases, labels, desc="loading training cases")
    loaded_val = cases_lib.load_cases(val_cases, labels, desc="loading validation cases")
    plan = preprocess.make_plan(spec.labels, spec.channel_names, spec.modality,
                                [c.image for c in loaded_train], [c.label for c in loaded_train],
                                [c.geometry.spacing for c in loaded_train], config.data)

    def preprocessed(loaded, seed_offset):
        out = []
        for i, case in enumerate(tqdm(loaded, desc="preprocessing", unit="case", leave=False)):
            image, label = preprocess.preprocess_case(case.image, case.geometry.spacing, plan, case.label)
            out.append(sampling.TrainingCase(case.case_id, image, label,
                                             sampling.class_locations(label, seed=seed_offset + i)))
        return out

    return spec, plan, preprocessed(loaded_train, 0), preprocessed(loaded_val, 10_000)


def evaluate_cases(forward_fn, params, cases: Sequence[sampling.TrainingCase], config, num_classes: int) -> dict:
    """Mean Dice per foreground class over `cases` (sliding window on the preprocessed grid)."""
    patch = tuple(config.train.patch_size)

    def predict(windows):
        return forward_fn(params, windows)

    per_class: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    for case in cases:
        logits = sliding_window_inference(predict, case.image, patch, num_classes, overlap=config.infer.overlap,
                                          batch_size=config.infer.batch_size)
        scores = dice_per_class(np.argmax(logits, -1), case.label, range(1, num_classes))
        for c, value in scores.items():
            per_class[c].append(value)
    means = {c: nanmean(v) for c, v in per_class.items()}
    return {"val_dice": nanmean(means.values()), "val_dice_per_class": {str(c): v for c, v in means.items()}}


class MetricsLog:
    """Appends JSON lines and TensorBoard scalars (only process 0 writes)."""

    def __init__(self, run: runs.RunDir, keep_until_step: int | None):
        self.run = run
        self.enabled = jax.process_index() == 0
        self.writer = None
        if not self.enabled:
            return
        records = [r for r in run.read_metrics() if keep_until_step is not None and r["step"] <= keep_until_step]
        # Lines after the restored checkpoint belong to steps that are about to be redone.
        run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(run.tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


def train(config: ml_collections.ConfigDict, workdir: str | Path, resume: bool = False,
          stop_at_step: int | None = None) -> dict:
    """Trains the experiment `config` in `workdir`; returns the training summary.

    `stop_at_step` stops early after saving a checkpoint, as an interruption would (tests use it for resume).
    """
    run = runs.RunDir(workdir)
    if resume and not run.has_checkpoint():
        raise MedsegError(f"{run.path}: --resume given but there is no checkpoint to resume from")
    if not resume and run.path.exists() and any(run.path.iterdir()):
        raise MedsegError(f"{run.path}: work directory is not empty; pass --resume to continue it or choose another")

    started = time.time()
    spec, plan, train_cases, val_cases = prepare_training_data(config)
    num_classes = len(plan["labels"])
    num_channels = len(plan["normalization"])
    patch = tuple(int(p) for p in config.train.patch_size)

    mesh = mesh_lib.make_mesh(config.mesh.data)
    mesh_lib.check_batch_divisible(config.train.batch_size, mesh)
    model = build_model(config.model, num_classes=num_classes)
    check_patch_size(patch, model)
    tx = step_lib.make_optimizer(config.train)
    schedule = step_lib.make_schedule(config.train)
    root_key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(root_key)
    state = step_lib.create_train_state(model, tx, (1, *patch, num_channels), init_key, mesh)

    run.path.mkdir(parents=True, exist_ok=True)
    if not resume:
        run.save_config(config)
        run.save_plans(plan)
    latest, best = run.checkpoint_managers()
    start_step = 0
    if resume:
        start_step = latest.latest_step()
        state = runs.restore_into(latest, start_step, state)
        print(f"resumed from step {start_step}")
    log = MetricsLog(run, keep_until_step=start_step if resume else None)

    augment_fn = augment.make_pipeline(config.augment.preset, patch)
    train_step = step_lib.make_train_step(model, tx, step_lib.make_loss_fn(config.loss), augment_fn, schedule, mesh,
                                          state)
    forward = step_lib.make_forward(model, mesh)
    data_sharding = mesh_lib.batch_sharding(mesh)
    per_process = config.train.batch_size // jax.process_count()
    local_samples = range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

    total_steps = config.train.steps
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    best_dice = max([r["val_dice"] for r in run.read_metrics() if r.get("kind") == "val"] or [float("nan")])
    pending: list[dict] = []
    last_loss = float("nan")
    train_seconds = 0.0
    progress = tqdm(range(start_step, end_step), initial=start_step, total=total_steps, desc="training",
                    unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)
    step_started = time.time()
    for step in progress:
        host_batch = sampling.sample_batch(train_cases, patch, config.train.batch_size, step, config.seed,
                                           config.data.oversample_foreground, sample_indices=local_samples)
        batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in host_batch.items()}
        state, metrics = train_step(state, batch, jax.random.fold_in(step_key, step))
        pending.append(metrics)
        done = step + 1
        if done % config.train.log_every == 0 or done == end_step:
            values = jax.device_get(pending)
            record = {"kind": "train", "step": done,
                      **{k: float(np.mean([v[k] for v in values])) for k in values[0]}}
            pending = []
            last_loss = record["loss"]
            progress.set_postfix(loss=f"{last_loss:.4f}", best_val=f"{best_dice:.3f}")
            log.write(record)
        if val_cases and (done % config.train.val_every == 0 or done == total_steps):
            train_seconds += time.time() - step_started
            result = evaluate_cases(forward, state.params, val_cases, config, num_classes)
            log.write({"kind": "val", "step": done, **result})
            best_dice = result["val_dice"] if np.isnan(best_dice) else max(best_dice, result["val_dice"])
            best.save(done, args=ocp.args.StandardSave(state.to_dict()), metrics={"val_dice": result["val_dice"]})
            progress.set_postfix(loss=f"{last_loss:.4f}", best_val=f"{best_dice:.3f}")
            step_started = time.time()
        if done % config.train.checkpoint_every == 0 or done == end_step:
            latest.save(done, args=ocp.args.StandardSave(state.to_dict()), force=True)
    train_seconds += time.time() - step_started
    progress.close()
    latest.wait_until_finished()
    best.wait_until_finished()
    log.close()

    summary = {"steps": int(jax.device_get(state.step)), "total_steps": total_steps,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "device": describe_device(), "best_val_dice": None if np.isnan(best_dice) else best_dice,
               "best_step": best.best_step()}
    if jax.process_index() == 0:
        viz.training_curve_png(run.read_metrics(), run.curve_path)
        fileio.write_json(run.summary_path, summary)
    return summary
