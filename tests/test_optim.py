"""Schedules and step counts derived from epochs at run time."""

import numpy as np
import pytest

from dks_jax import config_base, optim


@pytest.mark.parametrize("epochs,steps_per_epoch,expected", [
    (0.28, 25, 7),  # 0.28 * 25 = 7.000000000000001 in floating point
    (7 / 25, 25, 7),
    (1.0, 781, 781),
    (0.5, 781, 391),  # fractional steps round up
    (200.0, 781, 156200),
    (1e-6, 10, 1),
])
def test_total_steps(epochs, steps_per_epoch, expected):
    c = config_base.base()
    c.num_epochs = epochs
    assert optim.total_steps(c, steps_per_epoch) == expected


def test_step_schedule_follows_epochs_when_batch_changes():
    """The same epochs give the decays at the same fraction of training for any batch size."""
    c = config_base.base()
    c.learning_rate, c.lr_boundaries, c.lr_decay_factor = 0.1, (60.0, 120.0, 180.0), 0.1
    for steps_per_epoch in (781, 390):
        schedule = optim.learning_rate_schedule(c, steps_per_epoch)
        lrs = [float(schedule(int(e * steps_per_epoch))) for e in (0, 59.9, 60, 120, 180)]
        np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.001, 0.0001], rtol=1e-5)


def test_warmup_then_cosine():
    c = config_base.base()
    c.lr_schedule, c.learning_rate, c.warmup_epochs, c.num_epochs = "cosine", 0.4, 1.0, 10.0
    schedule = optim.learning_rate_schedule(c, 100)
    assert float(schedule(0)) == pytest.approx(0.004, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.4, rel=1e-5)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_is_coupled_and_on_every_parameter():
    """SGD(weight_decay) as in PyTorch: decay added to the gradient before the momentum."""
    import jax.numpy as jnp

    c = config_base.base()
    c.lr_schedule, c.learning_rate, c.weight_decay, c.momentum = "constant", 0.1, 0.5, 0.9
    tx, _ = optim.create_optimizer(c, 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    grads = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["b"], -0.1 * 0.5 * np.ones(2))
    c.weight_decay_mask = "kernels"
    tx, _ = optim.create_optimizer(c, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["b"], 0.0)


def test_adamw_decay_is_decoupled():
    """AdamW: with zero gradients the update is the decoupled decay -lr * wd * w alone."""
    import jax.numpy as jnp

    c = config_base.base()
    c.optimizer, c.lr_schedule, c.learning_rate, c.weight_decay = "adamw", "constant", 0.1, 0.5
    tx, _ = optim.create_optimizer(c, 10)
    params = {"w": 2 * jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2 * np.ones((2, 2)), rtol=1e-6)
    # a gradient's first Adam step has size lr, whatever the gradient's scale
    updates, _ = tx.update({"w": 1e-3 * jnp.ones((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * (1 + 0.5 * 2) * np.ones((2, 2)), rtol=1e-3)


def test_unknown_schedule_is_a_clear_error():
    c = config_base.base()
    c.lr_schedule = "linear"
    with pytest.raises(ValueError, match="step, cosine, constant"):
        optim.learning_rate_schedule(c, 10)
