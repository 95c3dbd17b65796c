"""Optimizers and learning-rate schedules of the papers (docs/design.md, "The papers' recipes").

Schedules are described in epochs in the config and turned into steps here, at run time, from the
actual number of steps per epoch, so changing the batch size keeps the schedule right.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from dks_jax import errors

SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step.

    ``step``: ``learning_rate`` multiplied by ``lr_decay_factor`` at each epoch of ``lr_boundaries``;
    ``cosine``: cosine decay to 0 over ``num_epochs``; ``constant``. An optional linear warm-up over
    ``warmup_epochs`` precedes any of them.
    """
    base = config.learning_rate
    total = total_steps(config, steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    name = config.lr_schedule
    if name == "step":
        boundaries = {
            int(round(e * steps_per_epoch)): config.lr_decay_factor for e in config.lr_boundaries
        }
        main = optax.piecewise_constant_schedule(base, boundaries)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(base, max(total - warmup, 1))
    elif name == "constant":
        main = optax.constant_schedule(base)
    else:
        raise errors.ConfigError(f"Unknown config.lr_schedule={name!r}; valid: {', '.join(SCHEDULES)}.")
    if warmup <= 0:
        return main
    if name == "step":  # boundaries are absolute epochs: keep them absolute after the warm-up
        return lambda step: jnp.where(step < warmup, base * (step + 1) / warmup, main(step))
    return optax.join_schedules([optax.linear_schedule(base / warmup, base, warmup), main], [warmup])


def total_steps(config, steps_per_epoch: int) -> int:
    """``num_epochs`` (may be fractional) in steps, rounded up, at least 1.

    The product is rounded to 9 decimals first: 0.28 epochs of 25 steps is 7.000000000000001 in
    floating point and must stay 7 steps.
    """
    return max(1, math.ceil(round(config.num_epochs * steps_per_epoch, 9)))


def create_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
    """``config.optimizer``: "sgd" (the papers') or "adamw" (transformers'), and the schedule.

    sgd: momentum (optionally Nesterov) with coupled L2 weight decay: ``weight_decay * w`` is added
    to the gradient before the momentum, as PyTorch's ``SGD(weight_decay=...)`` that the papers
    used. adamw: Adam (b1 0.9, b2 0.999; ``momentum`` unused) with decoupled weight decay
    ``lr * weight_decay * w`` (Loshchilov and Hutter). ``weight_decay_mask="kernels"`` restricts the
    decay to convolution and dense kernels (ndim > 1).
    """
    if config.optimizer not in OPTIMIZERS:
        raise errors.ConfigError(f"Unknown config.optimizer={config.optimizer!r}; valid: {OPTIMIZERS}.")
    schedule = learning_rate_schedule(config, steps_per_epoch)
    mask = None
    if config.weight_decay_mask == "kernels":
        mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    elif config.weight_decay_mask != "all":
        raise errors.ConfigError(
            f"Unknown config.weight_decay_mask={config.weight_decay_mask!r}; valid: all, kernels."
        )
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask), schedule
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
    return tx, schedule
