import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.infer.sliding_window import gaussian_importance_map, sliding_window_inference, window_starts
from medseg_jax.models.unet import UNet


def test_window_starts_cover_and_overlap():
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(10, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert max(np.diff(starts)) <= 16


def test_gaussian_map_peaks_in_the_centre_and_has_no_zeros():
    weights = gaussian_importance_map((16, 16, 8))
    assert weights.max() == pytest.approx(1.0)
    assert weights[8, 8, 4] == weights.max()
    assert weights.min() > 0


@pytest.mark.parametrize("volume_shape", [(16, 16, 8), (12, 16, 7)])
def test_one_window_equals_a_direct_forward_pass(volume_shape):
    model = UNet(num_classes=3, features=(4, 8))
    patch = (16, 16, 8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *patch, 1)))
    forward = jax.jit(lambda x: model.apply(variables, x))
    volume = np.random.default_rng(0).normal(size=volume_shape + (1,)).astype(np.float32)
    result = sliding_window_inference(forward, volume, patch, 3, overlap=0.5, batch_size=2)
    pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(volume_shape, patch)]
    direct = np.asarray(forward(np.pad(volume, pad + [(0, 0)])[None]))[0]
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pad, volume_shape))
    np.testing.assert_allclose(result, direct[crop], rtol=1e-5, atol=1e-5)


def test_many_windows_average_a_constant_field_exactly():
    """With a predictor that returns the same logits everywhere, any weighting must give them back."""
    constant = np.array([0.5, -1.0], np.float32)
    result = sliding_window_inference(lambda w: np.broadcast_to(constant, w.shape[:-1] + (2,)),
                                      np.zeros((40, 33, 21, 1), np.float32), (16, 16, 8), 2, overlap=0.5)
    np.testing.assert_allclose(result, np.broadcast_to(constant, (40, 33, 21, 2)), rtol=1e-6)
