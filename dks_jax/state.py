"""From a config to a train state: the model, the objective, the optimizer and the initial state.

The one place where this chain is built; the trainer, the vmapped seeds, the analysis tools and the
benchmarks all call :func:`create` (or its parts)::

    setup = state.create(config, num_classes, steps_per_epoch)            # one seed
    setup = state.create(config, num_classes, steps_per_epoch, seeds=[0, 1, 2])  # leaves [S, ...]
    setup.graphdef, setup.state, setup.tx, setup.schedule, setup.spec

The train state is an explicit pytree of plain arrays::

    {"step": int32[], "params": {...}, "batch_stats": {...}, "opt_state": ..., "best_top1": float32[]}

(with several seeds, every leaf gets a leading ``[S]`` axis). ``nnx.split`` runs once here; the step
functions (``steps.py``) merge the model from the state, so they are pure functions of pytrees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dks_jax import attach, errors, export, losses, models, optim, paths

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(config, num_classes: int, *, aux: str | None = None, seed=None) -> nnx.Module:
    """The config's model; ``aux`` overrides ``config.aux`` (and then no branch is trained alone),
    ``seed`` (an int or a PRNG key) ``config.seed``."""
    kwargs = {}
    if config.dropout:
        kwargs["dropout"] = config.dropout
    if config.zero_init_residual:
        kwargs["zero_init_residual"] = True
    alone = config.branch_alone if aux is None else ""
    aux = config.aux if aux is None else aux
    rngs = nnx.Rngs(config.seed if seed is None else seed)
    if attach.is_factory(config.model):  # dks_jax.attach: branches on the factory's model
        taps = {} if aux == "none" else attach.parse_taps(config.taps)
        byot = config.method == "byot" and aux != "none"
        return attach.create(config.model, num_classes, taps=taps, rngs=rngs,
                             image_size=config.image_size, dtype=DTYPES[config.dtype],
                             classifier=config.classifier if byot else "")
    return models.create(
        config.model,
        num_classes,
        aux=aux,
        rngs=rngs,
        feature_adapters=config.method == "byot" and aux != "none",
        alone=alone,
        dtype=DTYPES[config.dtype],
        branches=config.branches or None,
        bn_group_size=config.bn_group_size or None,
        **kwargs,
    )


def objective_spec(config, num_heads: int, steps_per_epoch: int, total_steps: int) -> losses.ObjectiveSpec:
    """``config.method`` and ``config.loss.*`` as the objective's static description."""
    loss = config.loss
    return losses.ObjectiveSpec(
        method=config.method,
        num_heads=num_heads,
        alpha=loss.alpha,
        beta=loss.beta,
        pairs=loss.pairs,
        temperature=loss.temperature,
        divergence=loss.divergence,
        label_smoothing=loss.label_smoothing,
        gamma=loss.gamma,
        dsn_companion=loss.dsn_companion,
        dsn_zero_fraction=loss.dsn_zero_fraction,
        dsn_schedule=loss.dsn_schedule,
        dsn_norm=loss.dsn_norm,
        byot_alpha=loss.byot_alpha,
        byot_lambda=loss.byot_lambda,
        mimic_prob=loss.mimic_prob,
        kd_weight=loss.kd_weight,
        kd_heads=tuple(loss.kd_heads),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def pure(state: nnx.State) -> dict:
    """An ``nnx.State`` as a plain nested dict of arrays."""
    return state.to_pure_dict()


def initial_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, state)`` of a freshly initialised model and optimizer."""
    graphdef, *states = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = (pure(s) for s in states)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "best_top1": jnp.full((), -1.0, jnp.float32),
    }
    return graphdef, state


def initial_states(config, num_classes: int, seeds: Sequence[int], tx) -> tuple[nnx.GraphDef, dict]:
    """Model and optimizer initialised once per seed, in one vmapped program.

    Returns ``(graphdef, states)``: the pytree of :func:`initial_state` with a leading axis of
    ``len(seeds)``; slice ``i`` equals ``initial_state(create_model(config, num_classes,
    seed=seeds[i]), tx)[1]``. ``config.seed`` is ignored in favour of ``seeds``.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("initial_states needs at least one seed.")
    graphdefs = []

    def init_one(key):
        graphdef, state = initial_state(create_model(config, num_classes, seed=key), tx)
        graphdefs.append(graphdef)  # static: the same for every seed
        return state

    # nnx.Rngs(int k) draws from jax.random.key(k): the same keys, batched.
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    states = jax.jit(jax.vmap(init_one))(keys)
    return graphdefs[0], states


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a training program is built from; ``state`` is on the host's default device."""

    graphdef: nnx.GraphDef
    state: dict
    tx: optax.GradientTransformation
    schedule: Callable
    spec: losses.ObjectiveSpec
    num_heads: int
    seeds: tuple[int, ...] | None  # several seeds: the state's leaves carry a leading seed axis

    @property
    def num_params(self) -> int:
        leaves = jax.tree.leaves(self.state["params"])
        lead = len(self.seeds) if self.seeds else 1
        return int(sum(x.size for x in leaves)) // lead


def create(config, num_classes: int, steps_per_epoch: int, *,
           seeds: Sequence[int] | None = None) -> Setup:
    """Model, objective, optimizer and initial state of ``config`` (several ``seeds``: stacked)."""
    total_steps = optim.total_steps(config, steps_per_epoch)
    tx, schedule = optim.create_optimizer(config, steps_per_epoch)
    if seeds:
        graphdef, state = initial_states(config, num_classes, seeds, tx)
    else:
        graphdef, state = initial_state(create_model(config, num_classes), tx)
    one = jax.tree.map(lambda x: x[0], state) if seeds else state
    num_heads = nnx.merge(graphdef, one["params"], one["batch_stats"]).num_heads
    spec = objective_spec(config, num_heads, steps_per_epoch, total_steps)
    return Setup(graphdef, state, tx, schedule, spec, num_heads, tuple(seeds) if seeds else None)


def abstract(config, num_classes: int) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, shapes)``: the train state of ``config`` as ``jax.ShapeDtypeStruct`` leaves,
    built without allocating it (to restore a checkpoint into)."""
    tx, _ = optim.create_optimizer(config, 1)
    graphdefs = []

    def build():
        graphdef, state = initial_state(create_model(config, num_classes), tx)
        graphdefs.append(graphdef)
        return state

    shapes = jax.eval_shape(build)
    return graphdefs[0], shapes


def load_teacher(config, num_classes: int) -> tuple[nnx.GraphDef, dict]:
    """The KD teacher: ``(graphdef, state)`` from an export written by this code, read-only."""
    path = paths.as_path(config.loss.teacher_checkpoint)
    if (path / "export").exists():
        path = path / "export"
    teacher, meta = export.load_exported_model(path, dtype=DTYPES[config.dtype])
    if config.loss.teacher_model and config.loss.teacher_model != meta["model"]:
        raise errors.ConfigError(
            f"config.loss.teacher_model={config.loss.teacher_model!r} but the export at {path} "
            f"holds {meta['model']!r}."
        )
    if meta["num_classes"] != num_classes:
        raise errors.ConfigError(
            f"The teacher at {path} has {meta['num_classes']} classes, the data set {num_classes}."
        )
    graphdef, state = nnx.split(teacher)
    return graphdef, pure(state)
