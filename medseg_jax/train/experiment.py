"""One experiment setup: an experiment config, the dataset's sizes and a device mesh -> everything a command needs to
train, measure or plan.

`build_experiment(config, num_classes, in_channels, layout)` checks the patch against the network and the mesh, then
builds the network, optimizer, schedule, loss, augmentation, the train state's abstract shapes and shardings, the batch
shapes and shardings and the jitted train step. Training (`train/loop.py`), `medseg memory` (`train/memory.py`) and the
planner (`train/planner.py`) all start here, so a run and its memory figures come from the same program. Nothing is
allocated until `init_state` or the step is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from medseg_jax import augment, runs
from medseg_jax.augment.masking import check_block
from medseg_jax.errors import MedsegError
from medseg_jax.infer.forward import make_forward
from medseg_jax.losses.reconstruction import masked_mse
from medseg_jax.models.registry import build_network, is_encoder_param, output_channels, pretraining_network
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Experiment:
    config: ml_collections.ConfigDict
    num_classes: int  # labels of the dataset, background included
    in_channels: int
    layout: mesh_lib.MeshLayout
    model: nn.Module
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: Callable  # loss_fn(outputs, labels) -> scalar, deep supervision included
    augment: Any  # augment.Pipeline: runs inside the step; its input_size is what the loader reads
    batch_shapes: dict[str, tuple[int, ...]]
    batch_shardings: dict
    state_template: step_lib.TrainState  # ShapeDtypeStructs with the state's shardings
    train_step: Callable  # jitted train_step(state, batch, key) -> (state, metrics), state donated
    masking: tuple | None = None  # (block, ratio) of masked image modelling (`medseg pretrain`), else None

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.config.train.patch_size)

    @property
    def regions(self):
        return self.config.loss.get("regions")

    @property
    def num_outputs(self) -> int:
        return output_channels(self.num_classes, self.regions)

    def init_state(self, key: jax.Array) -> step_lib.TrainState:
        """Freshly initialised params and optimizer state, created directly with their shardings."""
        return step_lib.create_train_state(self.model, self.optimizer, (1, *self.patch_size, self.in_channels), key,
                                           self.layout)

    def abstract_batch(self) -> dict:
        return {"image": jax.ShapeDtypeStruct(self.batch_shapes["image"], jax.numpy.float32,
                                              sharding=self.batch_shardings["image"]),
                "label": jax.ShapeDtypeStruct(self.batch_shapes["label"], jax.numpy.int32,
                                              sharding=self.batch_shardings["label"])}

    def compile_train_step(self):
        """The train step compiled ahead of time on abstract shapes (nothing allocated): for memory analysis."""
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.layout.replicated())
        return self.train_step.lower(self.state_template, self.abstract_batch(), key).compile()

    def proximal_train_step(self, proximal_mu: float) -> Callable:
        """The train step with FedProx's proximal term: `step(state, batch, key, anchor_params)`."""
        return step_lib.make_train_step(self.model, self.optimizer, self.loss_fn, self.augment, self.schedule,
                                        self.layout, self.state_template, self.batch_shapes, self.masking,
                                        proximal_mu=float(proximal_mu))

    def make_forward(self) -> Callable:
        """`forward(params, windows) -> logits` for windows of `infer.batch_size` patches (validation)."""
        window_shape = (int(self.config.infer.batch_size), *self.patch_size, self.in_channels)
        return make_forward(self.model, self.layout, window_shape, self.state_template.params)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init_key, step_key) of a run with `seed`: params from init_key, step s's augmentation from step_key folded
    with s. Training, federated sites and the federated server all derive them here, so that they agree."""
    init_key, step_key = jax.random.split(jax.random.key(seed))
    return init_key, step_key


def is_pretraining(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` is a masked-image-modelling run (`medseg pretrain`) rather than segmentation training."""
    return config.get("task", "segment") == "pretrain"


def finetuning_labels(config: ml_collections.ConfigDict) -> Callable | None:
    """params -> "encoder" | "new" per leaf, when fine-tuning treats the encoder apart (`train.freeze_encoder`,
    `train.encoder_lr_scale` != 1 or `train.encoder_warmup_steps` > 0); otherwise None (one optimizer for all)."""
    train = config.train
    if not (train.get("freeze_encoder", False) or float(train.get("encoder_lr_scale", 1.0)) != 1.0
            or int(train.get("encoder_warmup_steps", 0)) > 0):
        return None
    name = config.model.name

    def labels(params):
        parts = {key: "encoder" if is_encoder_param(name, key) else "new" for key in params}
        return {key: jax.tree.map(lambda _, part=parts[key]: part, value) for key, value in params.items()}

    return labels


def transferred_params(config: ml_collections.ConfigDict) -> Callable[[str], bool] | None:
    """Which top-level params `train.init_from` copies (those of matching name and shape among them): the encoder's
    only (`train.init_parts="encoder"`, or "auto" with a source made by `medseg pretrain`: its decoder learned to
    reconstruct images, not to segment), or all (None: "all", or "auto" with a trained or imported source)."""
    parts = config.train.get("init_parts", "auto")  # (a value schema.check refuses never gets here)
    if parts == "all" or not config.train.get("init_from"):
        return None
    if parts == "auto":
        source = runs.RunDir(config.train.init_from)
        if not (source.config_path.is_file() and source.load_config().get("task", "segment") == "pretrain"):
            return None
    name = config.model.name
    return lambda key: is_encoder_param(name, key)


def apply_dataset_regions(config: ml_collections.ConfigDict, plan: dict) -> ml_collections.ConfigDict:
    """`config` (changed in place) learning a region-labelled dataset's regions (its plan's, nnU-Net's format) as
    `loss.regions`, unless the experiment names regions of its own. Every command that builds a step for a store
    calls this first, so the network, loss and saved config agree with the data."""
    if plan.get("regions") and not config.loss.get("regions"):
        with config.unlocked():
            config.loss.regions = tuple(tuple(int(v) for v in region) for region in plan["regions"])
    return config


def check_patch_size(patch_size: Sequence[int], model) -> None:
    factors = model.total_downsampling()
    if len(patch_size) != len(factors):
        raise MedsegError(f"config key 'train.patch_size': {tuple(patch_size)} needs {len(factors)} axes")
    for axis, (p, f) in enumerate(zip(patch_size, factors)):
        if p % f:
            raise MedsegError(f"config key 'train.patch_size': axis {axis} size {p} does not divide by the model's "
                              f"total downsampling {f}")


def build_experiment(config: ml_collections.ConfigDict, num_classes: int, in_channels: int,
                     layout: mesh_lib.MeshLayout) -> Experiment:
    """The experiment `config` for a dataset of `num_classes` labels and `in_channels` channels over `layout`
    (checks: patch against the network's downsampling, batch over `data`, patch over the spatial mesh axes)."""
    patch = tuple(int(p) for p in config.train.patch_size)
    pretraining = is_pretraining(config)
    model = pretraining_network(config, in_channels) if pretraining else build_network(config, num_classes, in_channels)
    check_patch_size(patch, model)
    mesh_lib.check_batch_divisible(config.train.batch_size, layout)
    mesh_lib.check_patch(layout, patch, model)
    optimizer = step_lib.make_optimizer(config.train, finetuning_labels(config))
    schedule = step_lib.make_schedule(config.train)
    augment_fn = augment.make_pipeline(config.augment, patch, num_classes)
    state_template = step_lib.abstract_train_state(model, optimizer, (1, *patch, in_channels), layout)
    # The loader reads the augmentation's input size: a margin around the patch so rotated corners hold real data.
    shapes = step_lib.batch_shapes(int(config.train.batch_size), augment_fn.input_size, in_channels)
    masking = None
    if pretraining:
        masking = (check_block(patch, config.pretrain.mask_block), float(config.pretrain.mask_ratio))
        loss_fn = masked_mse
    else:
        loss_fn = step_lib.make_loss_fn(config.loss)
    train_step = step_lib.make_train_step(model, optimizer, loss_fn, augment_fn, schedule, layout, state_template,
                                          shapes, masking)
    return Experiment(config=config, num_classes=int(num_classes), in_channels=int(in_channels), layout=layout,
                      model=model, optimizer=optimizer, schedule=schedule, loss_fn=loss_fn, augment=augment_fn,
                      batch_shapes=shapes, batch_shardings=step_lib.batch_shardings(layout, shapes),
                      state_template=state_template, train_step=train_step, masking=masking)
