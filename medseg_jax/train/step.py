"""The pure train step (and the gradient it takes), jitted once over the device mesh; the forward pass for inference is
infer/forward.py.

`train_step(state, batch, key) -> (state, metrics)`: `state` holds params, optimizer state and the step counter;
`batch` is {"image": (N, X, Y, Z, C) float32, "label": (N, X, Y, Z) int32} split over the mesh (parallel/mesh.py:
samples over `data`, a spatial axis over `space`, whose activations stay split through the network); `key`
is the run's root key folded with the step, split per sample inside for augmentation. The state's buffers are donated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from medseg_jax import losses
from medseg_jax.augment.masking import mask_batch
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
    def from_dict(cls, d: dict) -> TrainState:
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


def _optimizer(train_config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    if train_config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=train_config.weight_decay)
    if train_config.optimizer == "sgd":  # nnU-Net's default: SGD, Nesterov momentum 0.99
        return optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                           optax.sgd(schedule, momentum=0.99, nesterov=True))
    raise MedsegError(f"config key 'train.optimizer': unknown optimizer '{train_config.optimizer}' "
                      "(known: adamw, sgd)")


def encoder_schedule(train_config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.Schedule:
    """The transferred encoder's learning rate when fine-tuning: `encoder_lr_scale` x the schedule, held at zero for
    the first `encoder_warmup_steps` steps (the new decoder and head warm up on a fixed encoder, so their first, large
    gradients do not wash out what pretraining learned) and ramped in linearly over as many steps again."""
    scale = float(train_config.get("encoder_lr_scale", 1.0))
    warmup = int(train_config.get("encoder_warmup_steps", 0))

    def lr(step):
        ramp = jnp.clip((step - warmup) / warmup, 0.0, 1.0) if warmup else 1.0
        return scale * ramp * schedule(step)

    return lr


def make_optimizer(train_config: ml_collections.ConfigDict, param_labels: Callable | None = None
                   ) -> optax.GradientTransformation:
    """The optimizer of `config.train`. With `param_labels` (params -> the same tree of "encoder" | "new"), the
    encoder follows `encoder_schedule` (or stays fixed with `train.freeze_encoder`) and the rest the schedule; the
    gradient is clipped by its global norm over both."""
    schedule = make_schedule(train_config)
    tx = _optimizer(train_config, schedule)
    if param_labels is not None:
        encoder = (optax.set_to_zero() if train_config.get("freeze_encoder", False)
                   else _optimizer(train_config, encoder_schedule(train_config, schedule)))
        tx = optax.multi_transform({"encoder": encoder, "new": tx}, param_labels)
    if train_config.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), tx)
    return tx


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, sample_shape) -> Callable:
    def init(key):
        params = model.init(key, jnp.zeros(sample_shape, jnp.float32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, sample_shape, key,
                       layout: mesh_lib.MeshLayout) -> TrainState:
    """Initialises params and optimizer state directly with their shardings (replicated, or split with
    mesh.params="sharded")."""
    init = _init_fn(model, tx, sample_shape)
    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init, key), layout))(key)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, sample_shape,
                         layout: mesh_lib.MeshLayout):
    """The train state's shapes, dtypes and shardings, without allocating it (for compiling ahead of time)."""
    abstract = jax.eval_shape(_init_fn(model, tx, sample_shape), jax.random.key(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        state_shardings(abstract, layout))


def state_shardings(state_or_abstract, layout: mesh_lib.MeshLayout):
    return layout.tree_shardings(state_or_abstract)


def make_loss_fn(loss_config: ml_collections.ConfigDict) -> Callable:
    """`loss_fn(outputs, labels)` from `config.loss` (see medseg_jax/losses/registry.py for names and options; a bad
    name or option is a MedsegError naming its key). `outputs` is the logits or, with deep supervision, a list of them,
    full resolution first, weighted as nnU-Net."""
    return functools.partial(losses.deep_supervision_loss, loss_fn=losses.build_loss(loss_config))


def batch_shapes(batch_size: int, input_size, channels: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a train batch: the image and label patches the loader reads (the augmentation's input size)."""
    return {"image": (batch_size, *input_size, channels), "label": (batch_size, *input_size)}


def batch_shardings(layout: mesh_lib.MeshLayout, shapes: dict) -> dict:
    return {"image": layout.array_sharding(shapes["image"]),
            "label": layout.array_sharding(shapes["label"], channels=False)}


# Masked image modelling draws its masks from the step's key folded with this (augmentation splits the key itself).
MASK_STREAM = 0x6D61736B


def _loss_and_grads(model: nn.Module, loss_fn: Callable, augment_fn: Callable | None, params, batch: dict, key,
                    masking: tuple | None = None):
    """Augmentation (one key per sample), the forward pass and the loss's value and gradient; activations pinned to
    the layout active while tracing. With `masking` = (block, ratio) the step is masked image modelling: blocks of the
    augmented image are zeroed and `loss_fn(outputs, (image, mask))` scores their reconstruction (labels unused)."""
    image, label = batch["image"], batch["label"]
    if augment_fn is not None:
        sample_keys = jax.random.split(key, image.shape[0])
        image, label = jax.vmap(augment_fn)(sample_keys, image, label)
    image = mesh_lib.constrain(image)
    label = mesh_lib.constrain(label, channels=False)
    if masking is None:
        inputs, targets = image, label
    else:
        inputs, mask = mask_batch(jax.random.fold_in(key, MASK_STREAM), image, *masking)
        inputs, targets = mesh_lib.constrain(inputs), (image, mesh_lib.constrain(mask))

    def compute_loss(params):
        params = mesh_lib.gather_params(params)  # split params (mesh.params="sharded") are used whole
        return loss_fn(model.apply({"params": params}, inputs, train=True), targets)

    return jax.value_and_grad(compute_loss)(params)


def make_grad_fn(model: nn.Module, loss_fn: Callable, augment_fn: Callable | None, layout: mesh_lib.MeshLayout,
                 params_template, shapes: dict, masking: tuple | None = None):
    """Jitted `grad_fn(params, batch, key) -> (loss, grads)`: what the train step computes before the optimizer, with
    the same shardings (tests compare it across meshes)."""

    def grad_fn(params, batch, key):
        with mesh_lib.activation_layout(layout):
            return _loss_and_grads(model, loss_fn, augment_fn, params, batch, key, masking)

    params_sharding = layout.tree_shardings(params_template)
    return jax.jit(grad_fn, in_shardings=(params_sharding, batch_shardings(layout, shapes), layout.replicated()),
                   out_shardings=(layout.replicated(), params_sharding))


def all_finite(tree) -> jax.Array:
    """True when every element of every array in `tree` is finite."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]).all()


def keep_unless(ok: jax.Array, new, old):
    """`new` where `ok`, else `old`, leaf by leaf (an exact select: a finite step's values pass unchanged)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
                    augment_fn: Callable | None, schedule: optax.Schedule, layout: mesh_lib.MeshLayout, state_template,
                    shapes: dict, masking: tuple | None = None, proximal_mu: float = 0.0):
    """Returns the jitted `train_step(state, batch, key) -> (state, metrics)` for batches of `shapes`
    (`batch_shapes(...)`). The batch arrives split over `data` (and the spatial mesh axes where they divide); after
    augmentation the patch and every U-Net level's activations are pinned to the layout (`mesh_lib.constrain`).

    With `proximal_mu` > 0 (FedProx's local objective: loss + mu/2 |params - anchor|^2) the step takes a fourth
    argument, the anchor params (the round's global model), and adds mu (params - anchor) to the gradient."""

    def train_step(state: TrainState, batch: dict, key: jax.Array, *anchor):
        with mesh_lib.activation_layout(layout):
            loss, grads = _loss_and_grads(model, loss_fn, augment_fn, state.params, batch, key, masking)
            if proximal_mu:
                grads = jax.tree.map(lambda g, p, a: g + proximal_mu * (p - a), grads, state.params, anchor[0])
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # Divergence guard: a step whose loss, gradient norm or new params are not finite changes nothing (params
            # and optimizer state stay as they were), so no state ever holds NaN or inf; the loop reads `finite` and
            # stops or counts the skipped steps (config.train.nonfinite, train/divergence.py).
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
            params = keep_unless(finite, params, state.params)
            opt_state = keep_unless(finite, opt_state, state.opt_state)
            metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "finite": finite}
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    shardings = state_shardings(state_template, layout)
    anchor = (shardings.params,) if proximal_mu else ()
    return jax.jit(train_step, in_shardings=(shardings, batch_shardings(layout, shapes), layout.replicated(), *anchor),
                   out_shardings=(shardings, layout.replicated()), donate_argnums=(0,))
