"""On-device augmentation: determinism per key, label values, identity at zero strength, inverse rotation, noise
statistics, jit + vmap, and use inside training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.augment import intensity, spatial
from medseg_jax.augment.pipeline import augment_config, make_pipeline
from medseg_jax.errors import MedsegError

PATCH = (24, 20, 16)


def smooth_sample(shape, seed=0, num_classes=4):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.int32)
    for k in range(1, num_classes):
        centre = rng.uniform(-0.4, 0.4, 3)
        radius = rng.uniform(0.25, 0.45)
        blob = np.exp(-((grid - centre) ** 2).sum(-1) / (2 * radius ** 2))
        image += k * blob
        label[blob > 0.6] = k
    return jnp.asarray(image[..., None]), jnp.asarray(label)


def run(pipeline, key, image, label):
    return jax.jit(jax.vmap(pipeline))(key[None], image[None], label[None])


def test_same_key_same_output_other_key_differs_under_jit_and_vmap():
    pipeline = make_pipeline(augment_config("nnunet"), PATCH, num_classes=4)
    image, label = smooth_sample(pipeline.input_size)
    batch_i, batch_l = jnp.stack([image] * 3), jnp.stack([label] * 3)
    keys = jax.random.split(jax.random.key(7), 3)
    fn = jax.jit(jax.vmap(pipeline))
    a, b = fn(keys, batch_i, batch_l), fn(keys, batch_i, batch_l)
    assert a[0].shape == (3, *PATCH, 1) and a[1].shape == (3, *PATCH)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # Each sample draws its own parameters: over 3 keys the outputs differ.
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[0][1]))
    single = jax.jit(pipeline)(keys[1], image, label)
    np.testing.assert_allclose(np.asarray(single[0]), np.asarray(a[0][1]), atol=1e-5)


@pytest.mark.parametrize("label_interpolation", ["nearest", "linear"])
def test_labels_only_take_values_present_before(label_interpolation):
    config = augment_config("nnunet")
    config.update(p_rotation=1.0, p_scaling=1.0, p_elastic=1.0, label_interpolation=label_interpolation)
    pipeline = make_pipeline(config, PATCH, num_classes=4)
    image, label = smooth_sample(pipeline.input_size, num_classes=3)  # values 0, 1, 2 only
    keys = jax.random.split(jax.random.key(0), 4)
    _, out = jax.jit(jax.vmap(pipeline))(keys, jnp.stack([image] * 4), jnp.stack([label] * 4))
    assert set(np.unique(np.asarray(out))) <= {0, 1, 2}
    assert len(np.unique(np.asarray(out))) == 3


def test_identity_at_zero_strength_is_the_centre_crop():
    config = augment_config("nnunet")
    config.update(p_rotation=1.0, rotation_degrees=0.0, p_scaling=1.0, scaling=(1.0, 1.0), p_elastic=1.0,
                  elastic_magnitude=0.0, p_mirror=0.0, p_noise=1.0, noise_sigma=(0.0, 0.0), p_blur=0.0,
                  p_brightness=1.0, brightness=(1.0, 1.0), p_contrast=1.0, contrast=(1.0, 1.0), p_low_resolution=1.0,
                  p_low_resolution_per_channel=1.0, low_resolution_zoom=(1.0, 1.0), p_gamma=1.0, p_gamma_inverted=1.0,
                  gamma=(1.0, 1.0))
    pipeline = make_pipeline(config, PATCH)
    image, label = smooth_sample(tuple(p + m for p, m in zip(PATCH, (6, 4, 2))))  # a margin around the patch
    out_image, out_label = run(pipeline, jax.random.key(3), image, label)
    crop_image, crop_label = spatial.center_crop(image, label, PATCH)
    np.testing.assert_array_equal(np.asarray(out_label[0]), np.asarray(crop_label))
    np.testing.assert_allclose(np.asarray(out_image[0]), np.asarray(crop_image), atol=1e-4)
    none = make_pipeline("none", PATCH)
    out_image, out_label = run(none, jax.random.key(3), image[:24, :20, :16], label[:24, :20, :16])
    np.testing.assert_array_equal(np.asarray(out_image[0]), np.asarray(image[:24, :20, :16]))


def test_mirroring_flips_exactly():
    config = augment_config("none")
    config.update(p_mirror=1.0, mirror_axes=(0,))
    pipeline = make_pipeline(config, PATCH)
    image, label = smooth_sample(PATCH)
    out_image, out_label = run(pipeline, jax.random.key(0), image, label)
    np.testing.assert_allclose(np.asarray(out_image[0]), np.asarray(image)[::-1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_label[0]), np.asarray(label)[::-1])


def test_rotating_by_theta_then_minus_theta_returns_a_smooth_image():
    shape = (40, 40, 40)
    image, label = smooth_sample(shape)
    centre = (jnp.asarray(shape, jnp.float32) - 1) / 2
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in shape], indexing="ij"))

    def rotate(x, matrix):
        coords = jnp.einsum("ij,j...->i...", matrix, grid - centre[:, None, None, None]) + centre[:, None, None, None]
        return spatial.resample(x, label, coords, None, "nearest")[0]

    matrix = spatial._rotation_matrix(jnp.asarray(np.deg2rad([20.0, -10.0, 15.0])))
    there = rotate(image, matrix)
    assert float(jnp.abs(there - image).max()) > 0.3  # it did rotate
    back = rotate(there, matrix.T)  # rotation by -theta: the inverse (transpose) matrix
    inner = (slice(10, 30),) * 3
    error = float(jnp.abs(back[inner] - image[inner]).max())
    assert error < 0.03 * float(image.max()), error


def test_noise_statistics_match_the_parameter():
    x = jnp.zeros((32, 32, 32, 1))
    noisy = intensity.gaussian_noise(jax.random.key(0), x, 1.0, (0.2, 0.2))
    assert float(noisy.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(noisy.std()) == pytest.approx(0.2, rel=0.02)
    draws = [float(intensity.gaussian_noise(jax.random.key(i), x[:4, :4, :4], 0.1, (0.0, 0.1)).std() > 0)
             for i in range(400)]
    assert np.mean(draws) == pytest.approx(0.1, abs=0.04)


def test_bg_contrast_draws_below_and_above_one_equally():
    values = np.asarray(intensity.bg_contrast(jax.random.key(0), 0.75, 1.25, shape=(4000,)))
    assert values.min() >= 0.75 and values.max() <= 1.25
    assert np.mean(values < 1) == pytest.approx(0.5, abs=0.03)


def test_unknown_parameter_and_preset_are_config_errors():
    with pytest.raises(MedsegError, match="augment.preset"):
        make_pipeline("fancy", PATCH)
    config = augment_config("nnunet")
    config.unlock()
    config.p_rotate = 0.3
    with pytest.raises(MedsegError, match="augment.p_rotate"):
        make_pipeline(config, PATCH)


@pytest.mark.slow  # minutes on a 2-core CPU: make test-all
def test_training_with_the_nnunet_preset_reads_a_margin(tiny_dataset, tmp_path):
    from medseg_jax.train.loop import train
    from tests.conftest import tiny_config

    config = tiny_config(tiny_dataset, steps=2)
    config.augment = augment_config("nnunet")
    pipeline = make_pipeline(config.augment, config.train.patch_size)
    assert all(i > p for i, p in zip(pipeline.input_size, config.train.patch_size))
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 2


# --- modality artifacts ----------------------------------------------------------------------------------------------

from medseg_jax.augment import artifacts  # noqa: E402


def test_bias_field_and_rician_statistics_match_their_parameters():
    ones = jnp.ones((32, 32, 24, 1))
    biased = artifacts.bias_field(jax.random.key(1), ones, 1.0, (0.2, 0.2), grid=4)
    log_field = np.log(np.asarray(biased))
    assert log_field.std() == pytest.approx(0.2, rel=0.02) and abs(log_field.mean()) < 0.01
    # smooth: neighbouring voxels differ far less than the field's spread
    assert np.abs(np.diff(log_field, axis=0)).mean() < 0.1 * log_field.std() * 3
    zeros = jnp.zeros((32, 32, 32, 1))
    rician = np.asarray(artifacts.rician_noise(jax.random.key(2), zeros, 1.0, (0.1, 0.1)))
    assert rician.min() >= 0 and rician.mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.02)


def test_speckle_keeps_the_mean_and_shadow_darkens_only_behind_reflectors():
    image = jnp.ones((16, 24, 8, 1))
    speckled = np.asarray(artifacts.speckle(jax.random.key(0), image, 1.0, (0.5, 0.5)))
    assert speckled.mean() == pytest.approx(1.0, rel=0.02) and speckled.std() > 0.1
    reflector = image.at[4:8, 10:12, 2:6, 0].set(10.0)  # a small bright structure at depth 10-11
    for reversed_ in (False, True):  # the beam enters at index 0, or at the far end of the depth axis
        shadowed = np.asarray(artifacts.acoustic_shadow(jax.random.key(0), reflector, 1.0, 98.0, (0.5, 0.5),
                                                        depth_axis=1, reversed_=reversed_))
        before, after = (slice(0, 10), slice(13, 24)) if not reversed_ else (slice(13, 24), slice(0, 10))
        np.testing.assert_array_equal(shadowed[:, before], np.asarray(reflector)[:, before])
        np.testing.assert_allclose(shadowed[5:7, after, 3:5], 0.5)
        np.testing.assert_array_equal(shadowed[:2, after], 1.0)


@pytest.mark.parametrize("name", ["gibbs_ringing", "kspace_spike", "motion_ghosting", "calibration_shift",
                                  "low_dose_noise", "attenuation"])
def test_each_artifact_changes_the_image_deterministically(name):
    image, _ = smooth_sample((16, 16, 12))
    fn = {"gibbs_ringing": lambda k, x: artifacts.gibbs_ringing(k, x, 1.0, (0.5, 0.5)),
          "kspace_spike": lambda k, x: artifacts.kspace_spike(k, x, 1.0, (0.1, 0.1)),
          "motion_ghosting": lambda k, x: artifacts.motion_ghosting(k, x, 1.0, (0.5, 0.5), (2, 4)),
          "calibration_shift": lambda k, x: artifacts.calibration_shift(k, x, 1.0, (0.1, 0.1), (1.0, 1.0)),
          "low_dose_noise": lambda k, x: artifacts.low_dose_noise(k, x, 1.0, (0.1, 0.1)),
          "attenuation": lambda k, x: artifacts.attenuation(k, x, 1.0, (1.0, 1.0), 0.0, 1)}[name]
    out = jax.jit(fn)(jax.random.key(5), image)
    again = jax.jit(fn)(jax.random.key(5), image)
    assert out.shape == image.shape and np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    assert float(jnp.abs(out - image).max()) > 1e-3


@pytest.mark.parametrize("preset", ["mri_robust", "ct_robust", "us_robust"])
def test_robust_presets_run_under_jit_and_vmap(preset):
    config = augment_config(preset)
    pipeline = make_pipeline(config, PATCH, num_classes=4)
    image, label = smooth_sample(pipeline.input_size)
    keys = jax.random.split(jax.random.key(0), 2)
    out_image, out_label = jax.jit(jax.vmap(pipeline))(keys, jnp.stack([image] * 2), jnp.stack([label] * 2))
    assert out_image.shape == (2, *PATCH, 1) and np.all(np.isfinite(np.asarray(out_image)))
