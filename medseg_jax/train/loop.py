"""The training loop: data, state, the jitted step, logging, validation and checkpoints.

Everything numerical happens in `train/step.py`; this module only feeds it. Training data come from a prepared store
(`data/store.py`, made by `medseg prepare` or here from `data.dataset`) streamed by the grain loader (`data/loader.py`).
The batch of step s and the augmentation key of step s are pure functions of (seed, s), and the loader's iterator state
is checkpointed with the train state, so a run resumed from its latest checkpoint continues bit for bit as if it had
never stopped (on CPU, same device count). At the end, validation cases are predicted in their source files' geometry
(through the store's manifest) into RUN/validation/.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from medseg_jax import augment, fileio, runs, viz
from medseg_jax.data import loader
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError
from medseg_jax.infer.sliding_window import sliding_window_inference
from medseg_jax.infer.postprocess import num_outputs, to_labels
from medseg_jax.metrics.overlap import dice_per_class, nanmean
from medseg_jax.models.registry import build_model
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train import step as step_lib


def describe_device() -> str:
    devices = jax.devices()
    kind = devices[0].device_kind if hasattr(devices[0], "device_kind") else devices[0].platform
    return f"{len(devices)}x {devices[0].platform} ({kind})"


def describe_layout(layout: mesh_lib.Layout) -> str:
    shape = " x ".join(f"{name}={size}" for name, size in layout.describe().items() if size > 1) or "one device"
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"mesh {shape}{processes}"


def split_cases(case_ids: Sequence[str], num_val: int) -> tuple[list[str], list[str]]:
    """The last `num_val` case ids (sorted) are held out for validation."""
    if num_val < 0 or num_val >= len(case_ids):
        raise MedsegError(f"config key 'data.val_cases': {num_val} validation cases leaves none of the "
                          f"{len(case_ids)} training cases to train on")
    ordered = sorted(case_ids)
    return (ordered[:len(ordered) - num_val], ordered[len(ordered) - num_val:]) if num_val else (ordered, [])


def check_patch_size(patch_size: Sequence[int], model) -> None:
    factors = model.total_downsampling()
    if len(patch_size) != len(factors):
        raise MedsegError(f"config key 'train.patch_size': {tuple(patch_size)} needs {len(factors)} axes")
    for axis, (p, f) in enumerate(zip(patch_size, factors)):
        if p % f:
            raise MedsegError(f"config key 'train.patch_size': axis {axis} size {p} does not divide by the model's "
                              f"total downsampling {f}")


@dataclass
class ValCase:
    case_id: str
    image: np.ndarray  # (X, Y, Z, C) preprocessed
    label: np.ndarray  # (X, Y, Z) preprocessed


def open_training_store(config: ml_collections.ConfigDict, workdir: Path) -> Store:
    """The prepared store named by `data.store`; or, with only `data.dataset` set, `WORKDIR/store` prepared from it
    (resuming an interrupted preparation). Refuses a store prepared with another data config."""
    if config.data.store:
        store = Store(config.data.store)
    elif config.data.dataset:
        from medseg_jax.data.prepare import prepare

        path = Path(workdir) / "store"
        if jax.process_index() == 0:  # one process prepares; the others wait for it and read the result
            if not (path / "manifest.json").is_file():
                print(f"preparing {config.data.dataset} into {path}")
            prepare(config.data.dataset, path, config.data, workers=max(1, int(config.data.prepare_workers)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("medseg: store prepared")
        store = Store(path)
    else:
        raise MedsegError("config keys 'data.store' and 'data.dataset' are both empty: pass "
                          "--config.data.store=STORE (made by `medseg prepare`) or --config.data.dataset=DIR (a "
                          "dataset folder in Decathlon or nnU-Net layout, e.g. made by `medseg demo-data`)")
    from medseg_jax.data.prepare import data_config_record

    prepared = json.loads((store.root / "prepare.json").read_text())["data_config"]
    wanted = data_config_record(config.data)
    differing = [k for k in wanted if wanted[k] != prepared.get(k)]
    if differing:
        key = differing[0]
        raise MedsegError(f"config key 'data.{key}': {wanted[key]!r} but store {store.root} was prepared with "
                          f"{prepared.get(key)!r}; set --config.data.{key} to match or prepare a new store")
    return store


def load_val_cases(store: Store, case_ids: Sequence[str]) -> list[ValCase]:
    return [ValCase(case_id, *store.read_case(case_id)) for case_id in case_ids]


def evaluate_cases(forward_fn, params, cases: Sequence[ValCase], config, num_classes: int,
                   on_logits=None, regions=None) -> dict:
    """Mean Dice per foreground class over `cases` (sliding window on the preprocessed grid); `on_logits(case,
    logits)` is called for each case when given."""
    patch = tuple(config.train.patch_size)

    def predict(windows):
        return forward_fn(params, windows)

    per_class: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    for case in cases:
        logits = sliding_window_inference(predict, case.image, patch, num_outputs(num_classes, regions),
                                          overlap=config.infer.overlap, batch_size=config.infer.batch_size)
        if on_logits is not None:
            on_logits(case, logits)
        scores = dice_per_class(to_labels(logits, regions), case.label, range(1, num_classes))
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


def export_validation(store: Store, run: runs.RunDir, case: ValCase, logits: np.ndarray, regions=None) -> dict:
    """Writes a validation case's prediction in its source file's geometry (through the store's manifest) and scores
    it there against the source label when that file is still readable."""
    from medseg_jax.io import nifti

    prediction = store.map_back(case.case_id, logits, order=1, regions=regions)
    geometry = store.geometry(case.case_id)
    nifti.write_label(run.validation_dir / f"{case.case_id}.nii.gz", prediction, geometry)
    label_path = store.source_path(store.cases[case.case_id]["source"]["label"])
    if label_path is None or not label_path.is_file():
        return {}
    reference, _ = nifti.read_label(label_path)
    return dice_per_class(prediction, reference, range(1, len(store.plan["labels"])))


def train(config: ml_collections.ConfigDict, workdir: str | Path, resume: bool = False,
          stop_at_step: int | None = None) -> dict:
    """Trains the experiment `config` in `workdir`; returns the training summary.

    `stop_at_step` stops early after saving a checkpoint, as an interruption would (tests use it for resume).
    """
    run = runs.RunDir(workdir)
    if resume and not run.has_checkpoint():
        raise MedsegError(f"{run.path}: --resume given but there is no checkpoint to resume from")
    planned = ("store", "config.json", "model_plan.json")  # what `medseg plan` leaves for training to start from
    if not resume and run.path.exists() and any(p.name not in planned for p in run.path.iterdir()):
        raise MedsegError(f"{run.path}: work directory is not empty; pass --resume to continue it or choose another")
    if jax.process_count() > 1:  # every process has looked at the directory before any writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("medseg: run directory checked")

    started = time.time()
    patch = tuple(int(p) for p in config.train.patch_size)
    layout = mesh_lib.make_layout(config.get("mesh"), spatial_dims=len(patch))  # checked before any data is touched
    mesh_lib.check_batch_divisible(config.train.batch_size, layout)
    mesh_lib.check_batch_divisible(config.infer.batch_size, layout, key="infer.batch_size")
    store = open_training_store(config, run.path)
    plan = store.plan
    train_ids, val_ids = split_cases(store.case_ids, config.data.val_cases)
    val_cases = load_val_cases(store, val_ids)
    num_classes = len(plan["labels"])
    num_channels = len(plan["normalization"])
    regions = config.loss.get("regions")  # region-based training: one sigmoid output per region
    model = build_model(config.model, num_classes=num_outputs(num_classes, regions), in_channels=num_channels,
                        patch_size=patch)
    check_patch_size(patch, model)
    mesh_lib.check_patch(layout, patch, model)
    tx = step_lib.make_optimizer(config.train)
    schedule = step_lib.make_schedule(config.train)
    root_key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(root_key)
    state = step_lib.create_train_state(model, tx, (1, *patch, num_channels), init_key, layout)

    total_steps = config.train.steps
    augment_fn = augment.make_pipeline(config.augment, patch, num_classes)
    # The sampler reads the pipeline's input size: a margin around the patch so rotated corners are not empty.
    shapes = step_lib.batch_shapes(config.train.batch_size, augment_fn.input_size, num_channels)
    shardings = step_lib.batch_shardings(layout, shapes)
    # Each process reads only the samples its devices hold (all of them when the batch is not split over processes).
    rows = mesh_lib.local_rows(shardings["image"], shapes["image"])
    sampler = loader.PatchSampler(store, train_ids, augment_fn.input_size, config.train.batch_size,
                                  config.data.oversample_foreground, config.seed, rows)
    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
              f"reads batch rows {rows}", flush=True)
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
            print(f"resumed from step {start_step} on {describe_layout(layout)}")
    elif config.train.get("init_from"):
        params, report = runs.init_params_from(config.train.init_from, state.params)
        state = state.replace(params=params)
        if jax.process_index() == 0:
            print(report)
    log = MetricsLog(run, keep_until_step=start_step if resume else None)

    train_step = step_lib.make_train_step(model, tx, step_lib.make_loss_fn(config.loss), augment_fn, schedule, layout,
                                          state, shapes)
    forward = step_lib.make_forward(model, layout, (config.infer.batch_size, *patch, num_channels), state.params)
    batches = loader.device_batches(data_iterator, shardings, shapes, rows)

    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    best_dice = max([r["val_dice"] for r in run.read_metrics() if r.get("kind") == "val"] or [float("nan")])
    pending: list[dict] = []
    last_loss = float("nan")
    train_seconds = 0.0
    original_dice: dict = {}

    def export_final(case, logits):
        original_dice[case.case_id] = export_validation(store, run, case, logits, regions)

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
            log.write(record)
        if val_cases and (done % config.train.val_every == 0 or done == total_steps):
            train_seconds += time.time() - step_started
            final = done == total_steps and jax.process_index() == 0
            result = evaluate_cases(forward, state.params, val_cases, config, num_classes,
                                    on_logits=export_final if final else None, regions=regions)
            log.write({"kind": "val", "step": done, **result})
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
    log.close()

    summary = {"steps": int(mesh_lib.to_host(state.step)), "total_steps": total_steps,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "device": describe_device(), "mesh": layout.describe(),
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
