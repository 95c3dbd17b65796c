"""Several seeds of one small model in one program: the train state vmapped over a leading seed axis.

For CIFAR-sized models one accelerator is far from busy with one run; ``config.num_seeds = S`` trains
S independent runs at once by stacking their train states (parameters, BatchNorm statistics,
optimizer state, step) along a new leading axis and ``jax.vmap``-ing the train step over it. Each
seed keeps its own initialisation, data order (its own batches), BatchNorm statistics (over its own
batch) and random numbers, so seed ``k`` of a vmapped run computes what a single run with
``config.seed = k`` computes (``tests/test_sweep.py`` checks it to float tolerance).

Building blocks, all pure (``state.create(..., seeds=...)`` and ``steps.train_step`` use them):

    graphdef, states = state.initial_states(config, num_classes, seeds, tx)   # leaves [S, ...]
    step = jax.jit(vmap_seeded_step(lambda k: steps.make_train_step(graphdef, tx, sched, spec, k),
                                    seeds), donate_argnums=0)
    states, metrics = step(states, stack([batch_seed0, batch_seed1, ...]))   # metrics [S]
    one = unstack(states, 1)                                          # the run of seeds[1]
    sums = jax.jit(vmap_eval(evaluator.make_eval_step(graphdef)))(states, eval_batch)  # shared batch

Shapes: a stacked state's leaves are ``[S, *leaf.shape]``; a stacked batch is
``{"image": [S, B, H, W, C], "label": [S, B]}``, sharded ``P(None, "data")``
(:func:`stacked_batch_sharding`) so every seed's batch is split over the devices as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dks_jax import parallel

__all__ = [
    "stack",
    "stacked_batch_sharding",
    "unstack",
    "vmap_eval",
    "vmap_seeded_step",
    "vmap_step",
]


def vmap_step(step_fn: Callable) -> Callable:
    """``step_fn(state, batch, *shared) -> (state, metrics)`` vmapped over the seed axis.

    ``state`` and ``batch`` carry a leading seed axis; ``shared`` arguments (e.g. a KD teacher's
    state) are the same for every seed. Use this for steps whose random numbers come from the state;
    a step built for one seed (``steps.make_train_step(..., seed)``) wants :func:`vmap_seeded_step`.
    Metrics come back with a leading seed axis.
    """

    def stepped(state, batch, *shared):
        return jax.vmap(lambda s, b: step_fn(s, b, *shared))(state, batch)

    return stepped


def vmap_seeded_step(make_step: Callable[[jax.Array], Callable], seeds: Sequence[int]) -> Callable:
    """Like :func:`vmap_step` for a step factory ``make_step(seed) -> step_fn``.

    ``make_step`` is called inside the vmap with a traced seed, so per-seed random numbers (dropout,
    DHM's branch mask) are drawn from each seed's own key, exactly as ``make_step(seeds[i])`` would.
    ``make_step`` must only use the seed through ``jax.random`` (no Python ``int(seed)``).
    """
    seed_array = jnp.asarray(list(seeds), jnp.int32)

    def stepped(state, batch, *shared):
        return jax.vmap(lambda k, s, b: make_step(k)(s, b, *shared))(seed_array, state, batch)

    return stepped


def vmap_eval(eval_fn: Callable) -> Callable:
    """``eval_fn(state, batch) -> sums`` over a stacked state and one batch shared by every seed."""
    return jax.vmap(eval_fn, in_axes=(0, None))


def stack(trees: Sequence) -> object:
    """Stacks equal-structured pytrees (per-seed states or batches) along a new leading axis."""
    if not trees:
        raise ValueError("stack needs at least one tree.")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(state, i: int):
    """Seed ``i``'s slice of a stacked pytree (a state, a batch or step metrics)."""
    return jax.tree.map(lambda x: x[i], state)


def stacked_batch_sharding(mesh) -> NamedSharding:
    """``[S, B, ...]`` batches: the seed axis whole on every device, the batch axis split over 'data'."""
    return NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
