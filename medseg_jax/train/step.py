"""The pure train and eval steps, jitted once over the device mesh.

`train_step(state, batch, key) -> (state, metrics)`: `state` holds params, optimizer state and the step counter;
`batch` is {"image": (N, X, Y, Z, C) float32, "label": (N, X, Y, Z) int32} sharded over the mesh's `data` axis; `key`
is the run's root key folded with the step, split per sample inside for augmentation. The state's buffers are donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from medseg_jax import losses
from medseg_jax.errors import MedsegError
from medseg_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any

    def to_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"])


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    steps, warmup, lr = train_config.steps, train_config.warmup_steps, train_config.learning_rate
    if train_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.0)
    if train_config.schedule == "poly":  # nnU-Net: lr * (1 - step/steps)^0.9
        decay = optax.polynomial_schedule(lr, 0.0, power=0.9, transition_steps=max(steps - warmup, 1))
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup else decay
    if train_config.schedule == "constant":
        return optax.constant_schedule(lr)
    raise MedsegError(f"config key 'train.schedule': unknown schedule '{train_config.schedule}' "
                      "(known: cosine, poly, constant)")


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = make_schedule(train_config)
    if train_config.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=train_config.weight_decay)
    elif train_config.optimizer == "sgd":  # nnU-Net's default: SGD, Nesterov momentum 0.99
        tx = optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                         optax.sgd(schedule, momentum=0.99, nesterov=True))
    else:
        raise MedsegError(f"config key 'train.optimizer': unknown optimizer '{train_config.optimizer}' "
                          "(known: adamw, sgd)")
    if train_config.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), tx)
    return tx


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, sample_shape, key,
                       mesh: Mesh) -> TrainState:
    """Initialises params and optimizer state directly with their (replicated) shardings."""

    def init(key):
        params = model.init(key, jnp.zeros(sample_shape, jnp.float32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init, key), mesh))(key)


def state_shardings(state_or_abstract, mesh: Mesh):
    return jax.tree.map(lambda _: mesh_lib.replicated(mesh), state_or_abstract)


def make_loss_fn(loss_config: ml_collections.ConfigDict) -> Callable:
    """`loss_fn(outputs, labels)` from `config.loss` (see medseg_jax/losses/config.py for names and options; a bad name
    or option is a MedsegError naming its key). `outputs` is the logits or, with deep supervision, a list of them, full
    resolution first, weighted as nnU-Net."""
    return functools.partial(losses.deep_supervision_loss, loss_fn=losses.build_loss(loss_config))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
                    augment_fn: Callable | None, schedule: optax.Schedule, mesh: Mesh, state_template):
    """Returns the jitted `train_step(state, batch, key) -> (state, metrics)`."""

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        image, label = batch["image"], batch["label"]
        if augment_fn is not None:
            sample_keys = jax.random.split(key, image.shape[0])
            image, label = jax.vmap(augment_fn)(sample_keys, image, label)

        def compute_loss(params):
            outputs = model.apply({"params": params}, image, train=True)
            return loss_fn(outputs, label)

        loss, grads = jax.value_and_grad(compute_loss)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    shardings = state_shardings(state_template, mesh)
    batch = {"image": mesh_lib.batch_sharding(mesh), "label": mesh_lib.batch_sharding(mesh)}
    return jax.jit(train_step, in_shardings=(shardings, batch, mesh_lib.replicated(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def make_forward(model: nn.Module, mesh: Mesh) -> Callable:
    """Jitted `forward(params, images) -> logits` (full resolution only), batch sharded over `data`."""

    def forward(params, images):
        return model.apply({"params": params}, images, train=False)

    return jax.jit(forward, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)),
                   out_shardings=mesh_lib.batch_sharding(mesh))
