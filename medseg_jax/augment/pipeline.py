"""Augmentation pipelines built from a preset name or the experiment config's `augment` section.

`make_pipeline(preset_or_config, patch_size)` returns a `Pipeline`: `pipeline(key, image, label) -> (image, label)` on
one sample (`image` (X, Y, Z, C) float32, `label` (X, Y, Z) int), pure JAX, run under `jax.vmap` inside the jitted train
step. The input may be larger than `patch_size` — `pipeline.input_size` is what the loader should read (a margin so
rotated corners are not empty) — and the output is `patch_size`. Each sample draws its own parameters from its key: the
same key gives the same output.

Order: one spatial resampling (rotation, scaling, elastic, mirroring), then modality artifacts (`artifacts.py`), then
nnU-Net v2's intensity transforms (noise, blur, brightness, contrast, low resolution, gamma inverted and not).

Presets: `none`; `intensity` (brightness, contrast, noise only: cheap and orientation-preserving, which keeps
left/right context such as liver vs spleen; the CPU demo uses it); `nnunet` (nnU-Net v2's default transforms,
probabilities and ranges); `mri_robust`, `ct_robust`, `us_robust` (`nnunet` plus that modality's artifacts; for
ultrasound no mirroring along the beam). `augment_config(preset)` gives the full ConfigDict of a preset so that every
parameter can be
overridden (`--config.augment.p_rotation=0.5`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import ml_collections

from medseg_jax.augment.artifacts import ArtifactParams, artifact_transform
from medseg_jax.augment.intensity import IntensityParams, intensity_transform
from medseg_jax.augment.spatial import SpatialParams, center_crop, rotated_extent, spatial_transform
from medseg_jax.errors import MedsegError

PRESETS = ("none", "intensity", "nnunet", "mri_robust", "ct_robust", "us_robust")

_NO_SPATIAL = dict(p_rotation=0.0, p_scaling=0.0, p_elastic=0.0, p_mirror=0.0)
_NO_INTENSITY = dict(p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_low_resolution=0.0,
                     p_gamma_inverted=0.0, p_gamma=0.0)
_PRESET_VALUES = {
    "none": {**_NO_SPATIAL, **_NO_INTENSITY},
    "intensity": {**_NO_SPATIAL, **_NO_INTENSITY, "p_noise": 0.1, "p_brightness": 0.15, "p_contrast": 0.15},
    "nnunet": {},  # the dataclass defaults are nnU-Net v2's (artifacts off)
    "mri_robust": {"p_bias_field": 0.3, "p_rician": 0.15, "p_gibbs": 0.1, "p_spike": 0.05, "p_ghosting": 0.1},
    "ct_robust": {"p_calibration": 0.3, "p_low_dose": 0.2},
    "us_robust": {"p_speckle": 0.3, "p_shadow": 0.15, "p_attenuation": 0.3, "mirror_axes": (0, 2)},
}


def augment_config(preset: str = "nnunet") -> ml_collections.ConfigDict:
    """Every parameter of `preset` as a flat ConfigDict (`preset` plus the spatial and intensity fields)."""
    if preset not in PRESETS:
        raise MedsegError(f"config key 'augment.preset': unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    values = {f.name: f.default for f in dataclasses.fields(SpatialParams)}
    values.update({f.name: f.default for f in dataclasses.fields(IntensityParams)})
    values.update({f.name: f.default for f in dataclasses.fields(ArtifactParams)})
    values.update(_PRESET_VALUES[preset])
    return ml_collections.ConfigDict({"preset": preset, **values})


def _params(config) -> tuple[SpatialParams, IntensityParams, ArtifactParams]:
    def build(cls):
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in config:
                value = config[field.name]
                kwargs[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
        return cls(**kwargs)

    return build(SpatialParams), build(IntensityParams), build(ArtifactParams)


class Pipeline:
    def __init__(self, spatial: SpatialParams, intensity: IntensityParams, patch_size: Sequence[int],
                 num_classes: int | None = None, max_margin: float = 1.5, artifacts: ArtifactParams | None = None):
        self.patch_size = tuple(int(p) for p in patch_size)
        # A 2D patch is augmented as the (X, Y, 1) volume it is lifted to, in its plane only (`SpatialParams.planar`)
        self.planar = len(self.patch_size) == 2
        spatial = dataclasses.replace(spatial, planar=True) if self.planar else spatial
        self.spatial, self.intensity = spatial, intensity
        self.artifacts = artifacts or ArtifactParams()
        self.num_classes = num_classes
        self.has_spatial = any(p > 0 for p in (spatial.p_rotation, spatial.p_scaling, spatial.p_elastic,
                                               spatial.p_mirror))
        if spatial.label_interpolation not in ("nearest", "linear"):
            raise MedsegError(f"config key 'augment.label_interpolation': '{spatial.label_interpolation}' is not "
                              "nearest or linear")
        size = self.volume_patch
        if spatial.p_rotation > 0 or spatial.p_scaling > 0:
            extent = rotated_extent(self.volume_patch, spatial.rotation_degrees if spatial.p_rotation > 0 else 0.0,
                                    spatial.scaling[0] if spatial.p_scaling > 0 else 1.0, planar=self.planar)
            # Capped (corners beyond the margin are filled with 0, as outside the volume), and with the patch's
            # parity so the zero-strength transform is an exact centre crop.
            size = tuple(min(e, int(max_margin * p)) for e, p in zip(extent, self.volume_patch))
            size = tuple(s + ((s - p) % 2) for s, p in zip(size, self.volume_patch))
        self.input_size = size[:len(self.patch_size)]  # (2D: the loader reads a slice, z is 1 whatever the zoom)

    @property
    def volume_patch(self) -> tuple[int, ...]:
        """The patch as the volume the transforms work on: a 2D patch lifted to (X, Y, 1)."""
        return (*self.patch_size, 1) if self.planar else self.patch_size

    def __call__(self, key: jax.Array, image: jax.Array, label: jax.Array):
        if self.planar:
            image, label = self._transform(key, image[:, :, None], label[:, :, None])
            return image[:, :, 0], label[:, :, 0]
        return self._transform(key, image, label)

    def _transform(self, key: jax.Array, image: jax.Array, label: jax.Array):
        k_spatial, k_artifacts, k_intensity = jax.random.split(key, 3)
        if self.has_spatial:
            image, label = spatial_transform(k_spatial, image, label, self.volume_patch, self.spatial,
                                             self.num_classes)
        else:
            image, label = center_crop(image, label, self.volume_patch)
        image = artifact_transform(k_artifacts, image, self.artifacts)
        return intensity_transform(k_intensity, image, self.intensity), label


def make_pipeline(preset_or_config, patch_size: Sequence[int], num_classes: int | None = None) -> Pipeline:
    """A pipeline from a preset name or an `augment` ConfigDict (a `preset` key plus any parameter overrides)."""
    if isinstance(preset_or_config, str):
        config = augment_config(preset_or_config)
    else:
        config = augment_config(preset_or_config.get("preset", "nnunet"))
        known = set(config.keys())
        for key, value in preset_or_config.items():
            if key not in known:
                raise MedsegError(f"config key 'augment.{key}': unknown augmentation parameter")
            config[key] = value
    spatial, intensity, artifacts = _params(config)
    return Pipeline(spatial, intensity, patch_size, num_classes, artifacts=artifacts)
