"""A complete experiment config with nnU-Net-like defaults, for runs the library builds itself (imported models) and as
the base an experiment file may start from (`config = base_config(); config.model = model_config(...)`)."""

from __future__ import annotations

import ml_collections

from medseg_jax.augment.pipeline import augment_config
from medseg_jax.data.fingerprint import default_data_config
from medseg_jax.losses.config import loss_config
from medseg_jax.models.registry import model_config
from medseg_jax.parallel.mesh import mesh_config


def base_config(model: str = "plain_unet") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = default_data_config()
    config.data.val_cases = 2
    config.data.prepare_workers = 1
    config.data.oversample_foreground = 0.33  # nnU-Net: one patch in three centred on foreground
    config.data.workers = 0
    config.data.threads = 2
    config.data.prefetch_batches = 2
    config.model = model_config(model)
    config.loss = loss_config("dice_ce", dice_weight=1.0, ce_weight=1.0, batch_dice=True)  # every other key: default
    config.augment = augment_config("nnunet")
    config.train = ml_collections.ConfigDict(dict(
        steps=250_000, batch_size=2, patch_size=(128, 128, 128), optimizer="sgd", learning_rate=1e-2,
        weight_decay=3e-5, schedule="poly", warmup_steps=0, grad_clip=12.0, log_every=50, val_every=5000,
        checkpoint_every=1000, init_from=""))
    config.infer = ml_collections.ConfigDict(dict(overlap=0.5, batch_size=2))
    config.mesh = mesh_config()
    return config
