import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import losses


def _labels(shape=(2, 8, 8, 4), classes=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, classes, shape))


def test_perfect_prediction_is_the_minimum():
    labels = _labels()
    perfect = 50.0 * jax.nn.one_hot(labels, 3)
    random = jax.random.normal(jax.random.key(0), perfect.shape)
    assert float(losses.dice_ce_loss(perfect, labels)) < 1e-4
    assert float(losses.dice_ce_loss(random, labels)) > 0.5


def test_soft_dice_value_by_hand():
    labels = jnp.array([[[[1, 1, 0, 0]]]])
    logits = jnp.log(jnp.array([[[[[0.5, 0.5], [0.5, 0.5], [1.0, 1e-30], [1.0, 1e-30]]]]]))  # p(1)=0.5,0.5,0,0
    # class 1: intersection 1.0, sum p 1.0, sum g 2 -> dice 2/3
    np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, smooth=0.0), 1 - 2 / 3, rtol=1e-5)


def test_gradients_are_finite():
    labels = _labels()
    logits = jax.random.normal(jax.random.key(1), labels.shape + (3,))
    grads = jax.grad(lambda x: losses.dice_ce_loss(x, labels))(logits)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_deep_supervision_weights_match_nnunet():
    np.testing.assert_allclose(losses.deep_supervision_weights(3), [2 / 3, 1 / 3, 0.0])
    assert losses.deep_supervision_weights(1) == [1.0]


def test_deep_supervision_loss_uses_downsampled_labels():
    labels = _labels((1, 8, 8, 4))
    outputs = [50.0 * jax.nn.one_hot(labels, 3), 50.0 * jax.nn.one_hot(labels[:, ::2, ::2, ::2], 3),
               jnp.zeros((1, 2, 2, 1, 3))]
    assert float(losses.deep_supervision_loss(outputs, labels, losses.dice_ce_loss)) < 1e-4
