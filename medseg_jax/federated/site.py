"""One site of a federated run: its own store, the same experiment setup as `medseg train`, and its local state.

A site trains the global params it is sent for `local_steps` steps of the ordinary jitted train step and sends back
only the new params and a few numbers; its images, labels and optimizer state never leave it. The local state
(optimizer state, step counter) is saved in the site's own folder after each round (`SITE/checkpoints/rounds/<r>`), so
the site continues its schedule, its data stream and its optimizer from round to round, after a restart, and on a
real deployment where the client process does not outlive a round. Batches and augmentation keys are functions of
(seed, step) as in ordinary training, so one site with FedAvg follows ordinary training step for step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from medseg_jax import runs
from medseg_jax.data import loader
from medseg_jax.data.splits import train_val_cases
from medseg_jax.data.training_store import open_training_store
from medseg_jax.errors import MedsegError
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.experiment import apply_dataset_regions, build_experiment, run_keys
from medseg_jax.train.validation import evaluate_cases, load_val_cases


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def flatten(params) -> dict[str, np.ndarray]:
    """{"encoder0/conv0/kernel": array, ...}: the params as the flat, named arrays a Flower ArrayRecord carries."""
    return {_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def nest(flat: dict[str, np.ndarray]) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: the params tree of a run directory (what prediction loads)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def unflatten(flat: dict[str, np.ndarray], template):
    """`flat` put back into the tree of `template` (its shardings and dtypes); a missing or misshaped array is an error
    naming it (a site or server built with another model)."""
    def take(path, leaf):
        key = _name(path)
        if key not in flat:
            raise MedsegError(f"federated params: '{key}' missing (the server and this site build different models)")
        value = np.asarray(flat[key])
        if value.shape != tuple(leaf.shape):
            raise MedsegError(f"federated params: '{key}' has shape {value.shape}, this site's model "
                              f"{tuple(leaf.shape)}")
        return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(take, template)


def site_config(config: ml_collections.ConfigDict, store: str, rounds: int, local_steps: int
                ) -> ml_collections.ConfigDict:
    """The experiment as a site runs it: its store, and a schedule over all the steps it will take."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.store = str(store)
    config.data.dataset = ""
    config.train.steps = int(rounds) * int(local_steps)
    return config


class Site:
    def __init__(self, name: str, config: ml_collections.ConfigDict, workdir: str | Path):
        self.name = name
        self.config = config
        self.path = Path(workdir)
        self.layout = mesh_lib.make_mesh_layout(config.get("mesh"), spatial_dims=len(config.train.patch_size))
        self.store = open_training_store(config.data, self.path)
        self.train_ids, val_ids, _ = train_val_cases(config.data, self.store.case_ids)
        self.val_cases = load_val_cases(self.store, val_ids)
        self.num_classes = len(self.store.plan["labels"])
        apply_dataset_regions(config, self.store.plan)
        self.experiment = build_experiment(config, self.num_classes, self.store.num_channels, self.layout)
        # The keys of ordinary training: params from init_key (replaced by the global ones every round), the
        # augmentation key of step s = step_key folded with s.
        self.init_key, self.step_key = run_keys(config.seed)
        self.state = self.experiment.init_state(self.init_key)
        self.round = 0  # the round self.state belongs to
        shapes = self.experiment.batch_shapes
        self.rows = mesh_lib.local_rows(self.experiment.batch_shardings["image"], shapes["image"])
        self.sampler = loader.PatchSampler(self.store, self.train_ids, self.experiment.augment.input_size,
                                           config.train.batch_size, config.data.oversample_foreground, config.seed,
                                           self.rows)
        self.forward = None
        self.rounds = ocp.CheckpointManager((self.path / "checkpoints" / "rounds").absolute(),
                                            options=ocp.CheckpointManagerOptions(
                                                max_to_keep=2, create=True, enable_async_checkpointing=False,
                                                cleanup_tmp_directories=True))
        self._proximal_steps: dict[float, object] = {}

    @property
    def num_examples(self) -> int:
        """The site's weight in FedAvg: its number of training cases."""
        return len(self.train_ids)

    def _local_state(self, server_round: int):
        """The local state the site ended round `server_round - 1` with (fresh before round 1); restored from disk
        when this process does not hold it (a restart, or a client process per round)."""
        if self.round == server_round - 1:
            return self.state
        if server_round == 1:
            return self.experiment.init_state(self.init_key)
        if server_round - 1 not in self.rounds.all_steps():
            raise MedsegError(f"site {self.name}: no local state of round {server_round - 1} in "
                              f"{self.rounds.directory} (rounds saved: {sorted(self.rounds.all_steps())}); was this "
                              "site's folder changed, or did it miss a round?")
        return runs.restore_into(self.rounds, server_round - 1, self.state)

    def _step_fn(self, proximal_mu: float):
        if not proximal_mu:
            return lambda state, batch, key, anchor: self.experiment.train_step(state, batch, key)
        if proximal_mu not in self._proximal_steps:
            self._proximal_steps[proximal_mu] = self.experiment.proximal_train_step(proximal_mu)
        return self._proximal_steps[proximal_mu]

    def train_round(self, server_round: int, global_flat: dict[str, np.ndarray], local_steps: int,
                    proximal_mu: float = 0.0) -> tuple[dict[str, np.ndarray], dict]:
        """Round `server_round` (1, 2, ...): `local_steps` steps from the global params; returns the new params and
        {"loss", "num-examples", "skipped-steps"}."""
        state = self._local_state(server_round)
        self.round = -1  # the state's buffers are donated to the steps: until the round ends, only the disk has it
        for stale in [r for r in self.rounds.all_steps() if r >= server_round]:  # a round redone after a restart
            self.rounds.delete(stale)
        global_params = unflatten(global_flat, state.params)
        state = state.replace(params=global_params)
        anchor = jax.tree.map(jnp.copy, global_params) if proximal_mu else None  # the state's buffers are donated
        start = (server_round - 1) * local_steps
        dataset = loader.make_dataset(self.sampler, start + local_steps, workers=self.config.data.workers,
                                      threads=self.config.data.threads,
                                      prefetch_batches=self.config.data.prefetch_batches, start_step=start)
        iterator = iter(dataset)
        batches = loader.device_batches(iterator, self.experiment.batch_shardings, self.experiment.batch_shapes,
                                        self.rows)
        step_fn = self._step_fn(proximal_mu)
        losses, skipped = [], 0
        for step in range(start, start + local_steps):
            state, metrics = step_fn(state, next(batches), jax.random.fold_in(self.step_key, step), anchor)
            values = {k: float(mesh_lib.to_host(v)) for k, v in metrics.items()}
            if not values["finite"]:
                skipped += 1  # the step changed nothing (the divergence guard of train/step.py)
                if skipped > int(self.config.train.get("max_nonfinite_steps", 10)):
                    raise MedsegError(f"site {self.name}: {skipped} non-finite steps in round {server_round}; "
                                      "lower the learning rate")
                continue
            losses.append(values["loss"])
        if hasattr(iterator, "close"):
            iterator.close()
        runs.save_checkpoint(self.rounds, server_round, state.to_dict(), force=True)
        self.rounds.wait_until_finished()
        self.state, self.round = state, server_round
        return flatten(state.params), {"loss": float(np.mean(losses)) if losses else float("nan"),
                                       "num-examples": self.num_examples, "skipped-steps": skipped}

    def evaluate(self, global_flat: dict[str, np.ndarray]) -> dict:
        """Validation Dice of the global params on this site's validation cases."""
        if not self.val_cases:
            return {"num-examples": 0}
        if self.forward is None:
            self.forward = self.experiment.make_forward()
        params = unflatten(global_flat, self.state.params)
        result = evaluate_cases(self.forward, params, self.val_cases, self.config, self.num_classes,
                                regions=self.experiment.regions)
        return {"val_dice": float(result["val_dice"]), "num-examples": len(self.val_cases)}
