"""Segmentation losses: pure, jit-able functions of (logits, labels) -> scalar, channels-last, float32 math.

`logits` is (N, *spatial, K) float (bfloat16 is computed in float32), `labels` is (N, *spatial) integer in [0, K) (an
ignore label may lie outside). Values equal MONAI's (DiceLoss, DiceCELoss, TverskyLoss, GeneralizedDiceLoss,
FocalLoss up to its reduction, SoftclDiceLoss, BoundaryLoss) for matching options: see
tests/test_losses_monai.py. `build_loss(config.loss)` picks one from the experiment config (see `config.py`).
"""

from medseg_jax.losses.boundary import boundary_loss, capped_signed_distance, dice_boundary_loss, signed_distance_maps
from medseg_jax.losses.ce import binary_cross_entropy_loss, cross_entropy_loss, dice_ce_loss
from medseg_jax.losses.cldice import dice_cldice_loss, soft_cldice_loss, soft_dilate, soft_erode, soft_skeleton
from medseg_jax.losses.deep_supervision import deep_supervision_loss, deep_supervision_weights, downsample_labels
from medseg_jax.losses.dice import (
                                        dice_per_class,
                                        focal_tversky_loss,
                                        generalized_dice_loss,
                                        soft_dice_loss,
                                        tversky_index,
                                        tversky_loss,
)
from medseg_jax.losses.focal import focal_loss
from medseg_jax.losses.regions import region_loss, region_targets
from medseg_jax.losses.registry import LOSS_DEFAULTS, LOSS_NAMES, build_loss, loss_config

__all__ = [
    "LOSS_DEFAULTS", "LOSS_NAMES", "binary_cross_entropy_loss", "boundary_loss", "build_loss",
    "capped_signed_distance", "cross_entropy_loss", "deep_supervision_loss", "deep_supervision_weights",
    "dice_boundary_loss", "dice_ce_loss", "dice_cldice_loss", "dice_per_class", "downsample_labels", "focal_loss",
    "focal_tversky_loss", "generalized_dice_loss", "loss_config", "region_loss", "region_targets",
    "signed_distance_maps", "soft_cldice_loss", "soft_dice_loss", "soft_dilate", "soft_erode", "soft_skeleton",
    "tversky_index", "tversky_loss",
]
