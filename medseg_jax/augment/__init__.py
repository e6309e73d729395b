"""On-device augmentation: pure JAX functions on one channels-last sample, vmapped inside the train step."""

from medseg_jax.augment.pipeline import make_pipeline

__all__ = ["make_pipeline"]
