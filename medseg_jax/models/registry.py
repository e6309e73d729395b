"""Models by name, built from the `model` section of an experiment config."""

from __future__ import annotations

import ml_collections

from medseg_jax.errors import MedsegError
from medseg_jax.models.unet import UNet

_BUILDERS = {"unet": UNet}


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, spatial_dims: int = 3):
    name = model_config.name
    if name not in _BUILDERS:
        raise MedsegError(f"config key 'model.name': unknown model '{name}' (known: {', '.join(sorted(_BUILDERS))})")
    if name == "unet":
        return UNet(
            num_classes=num_classes,
            features=tuple(model_config.features),
            strides=model_config.get("strides"),
            kernel_sizes=model_config.get("kernel_sizes"),
            convs_per_stage=model_config.convs_per_stage,
            norm=model_config.norm,
            activation=model_config.activation,
            deep_supervision=model_config.deep_supervision,
            spatial_dims=spatial_dims,
        )
    raise AssertionError(name)
