"""A run directory: the resolved config, the preprocessing plan, orbax checkpoints and logs.

    RUN/config.json              the resolved experiment config (enough to reproduce the run)
    RUN/plans.json               preprocessing plan (target spacing, normalisation, labels)
    RUN/checkpoints/latest/      orbax CheckpointManager keeping the most recent state and the data loader's grain
                                 iterator state (for --resume); items "state" and "data"
    RUN/checkpoints/best/        orbax CheckpointManager keeping the state with the best validation Dice (item "state")
    RUN/validation/              the validation cases predicted at the end, in their source files' geometry
    RUN/metrics.jsonl            one JSON object per logged step / validation
    RUN/tensorboard/             TensorBoard events
    RUN/training_curve.png       loss and validation Dice against step
    RUN/train_summary.json       seconds, device, best validation Dice

Training writes it; prediction and fine-tuning read its config, plans and params (`load_params`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from medseg_jax import config as config_lib
from medseg_jax import fileio
from medseg_jax.errors import MedsegError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    plans_path = property(lambda self: self.path / "plans.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")
    curve_path = property(lambda self: self.path / "training_curve.png")
    summary_path = property(lambda self: self.path / "train_summary.json")
    latest_dir = property(lambda self: self.path / "checkpoints" / "latest")
    best_dir = property(lambda self: self.path / "checkpoints" / "best")
    validation_dir = property(lambda self: self.path / "validation")
    splits_path = property(lambda self: self.path / "splits.json")
    data_version_path = property(lambda self: self.path / "data_version.json")

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint was completed: orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames
        it to `<step>` when done, so a folder a kill interrupted does not count."""
        return self.latest_dir.is_dir() and any(p.name.isdigit() for p in self.latest_dir.iterdir())

    # --- config and plan -------------------------------------------------------------------------------------------
    def save_config(self, config: ml_collections.ConfigDict) -> None:
        fileio.write_json(self.config_path, config_lib.to_plain(config))

    def load_config(self) -> ml_collections.ConfigDict:
        return config_lib.from_plain(self._read_json(self.config_path))

    def store_version(self) -> int | None:
        """The version of its store the run trained on (None for a run from before stores had versions)."""
        if not self.data_version_path.is_file():
            return None
        return int(self._read_json(self.data_version_path)["version"])

    def save_plans(self, plans: dict) -> None:
        fileio.write_json(self.plans_path, plans)

    def load_plans(self) -> dict:
        return self._read_json(self.plans_path)

    def _read_json(self, path: Path) -> dict:
        if not path.is_file():
            raise MedsegError(f"{path}: not found; is {self.path} a run directory made by `medseg train`?")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedsegError(f"{path}: not valid JSON ({exc})") from None

    # --- checkpoints -------------------------------------------------------------------------------------------------
    def checkpoint_managers(self, writer: bool = False) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
        """(latest, best). The `writer` (training, which holds the run's lock) also removes the temporary folders of
        a save that a kill interrupted; readers leave them, since they may belong to a save in progress."""
        latest = ocp.CheckpointManager(self.latest_dir.absolute(), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=writer))
        best = ocp.CheckpointManager(self.best_dir.absolute(), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda metrics: metrics["val_dice"], best_mode="max",
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=False,
            cleanup_tmp_directories=writer))
        return latest, best

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state_dict, data_iterator=None,
                    metrics: dict | None = None, force: bool = False) -> None:
    """Saves item "state" (a pytree of arrays) and, when given, item "data" (a grain iterator's state)."""
    import grain

    items = {"state": ocp.args.StandardSave(state_dict)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def has_data_state(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether checkpoint `step` holds this process's loader state (written by the same number of processes)."""
    path = Path(manager.directory) / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return path.is_file()


def restore_into(manager: ocp.CheckpointManager, step: int, template, data_iterator=None):
    """Restores checkpoint `step` with the structure, dtypes and shardings of `template` (a pytree of arrays), and the
    grain iterator `data_iterator` in place when given."""
    import grain

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    # orbax hands back plain containers (tuples for optax's namedtuples): rebuild the template's tree structure.
    leaves = jax.tree.leaves(restored["state"])
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def restore_raw(manager: ocp.CheckpointManager, step: int) -> dict:
    """The saved "state" item as written (nested dicts of arrays) on this process's first device, whatever mesh or
    process count wrote it (prediction and fine-tuning read any run this way)."""
    # The item's own handler reads its tree metadata (StandardCheckpointer().metadata expects a step directory and
    # logs a warning for the item directory it is given here).
    metadata = ocp.StandardCheckpointHandler().metadata(Path(manager.directory) / str(step) / "state")
    tree = getattr(metadata, "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def load_params(path: str | Path, checkpoint: str = "best") -> dict:
    """The params of run directory `path` (its best checkpoint, else its latest) as nested dicts of numpy arrays.

    Restoring without a target gives the saved tree as it was written: prediction and fine-tuning need only the params,
    and no optimizer to rebuild the full state's structure."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise MedsegError(f"{run.path}: run directory not found")
    latest, best = run.checkpoint_managers()
    manager = best if checkpoint == "best" and best.latest_step() is not None else latest
    step = manager.best_step() if manager is best else manager.latest_step()
    if step is None:
        raise MedsegError(f"{run.path}: no checkpoint found; train first with `medseg train --workdir {run.path}`")
    return jax.tree.map(np.asarray, restore_raw(manager, step)["params"])


def init_params_from(path: str | Path, params, only=None):
    """Fine-tuning: `params` (the freshly initialised, sharded tree) with every array whose path and shape also exist
    in run `path`'s params replaced by the trained one; the rest (e.g. a head for another number of classes) keeps its
    initial values. `only(top_level_name) -> bool` limits the copy to some top-level params (a pretrained encoder).
    Returns (params, a one-paragraph report). No array in common is an error."""
    source = load_params(path)
    flat_source = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
    copied, kept = [], []

    def take(key_path, leaf):
        key = jax.tree_util.keystr(key_path)
        value = flat_source.get(key)
        wanted = only is None or only(str(getattr(key_path[0], "key", key_path[0])))
        if wanted and value is not None and tuple(value.shape) == tuple(leaf.shape):
            copied.append(key)
            return jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding)
        kept.append(key)
        return leaf

    merged = jax.tree_util.tree_map_with_path(take, params)
    if not copied:
        raise MedsegError(f"config key 'train.init_from': {path} has no parameter of this model's names and shapes "
                          "(another architecture? use the source run's model section)")
    report = (f"initialised {len(copied)} of {len(copied) + len(kept)} parameter arrays from {path}"
              + (" (its encoder only)" if only is not None else ""))
    if kept:
        shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
        report += f"; {len(kept)} keep their initial values (absent or another shape there): {shown}"
    return merged, report
