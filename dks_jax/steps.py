"""The pure training step: ``(state, batch[, teacher_state]) -> (state, metrics)``.

``make_train_step`` builds the step of one seed; :func:`train_step` the step of a
:class:`state.Setup` (vmapped over the seed axis when the setup holds several seeds). Both are plain
functions of pytrees, to be ``jax.jit``-ed with ``donate_argnums=0``; the state is replicated over
the mesh and a batch is split over its ``'data'`` axis (``parallel.py``).

Shapes: ``batch = {"image": float[B, H, W, C], "label": int32[B]}`` (with several seeds, a leading
``[S]`` axis on both and on every leaf of the state and of the metrics).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dks_jax import losses, seeds
from dks_jax.state import Setup


def head_name(i: int) -> str:
    """Head ``i`` in the DKS paper's names: C1 is the main classifier, C2... the auxiliaries."""
    return f"C{i + 1}"


def make_train_step(graphdef, tx, schedule, spec: losses.ObjectiveSpec, seed,
                    teacher_graphdef=None) -> Callable:
    """The pure training step ``(state, batch[, teacher_state]) -> (state, metrics)`` of one seed.

    ``seed`` (an int, or a traced int inside a vmap) keys dropout and the objective's random numbers
    (DHM's branch mask). Metrics: ``loss``, ``lr``, ``grad_norm``, ``param_norm``, every
    ``loss/<term>`` of the objective and ``train_top1/C<k>`` per head, all scalars.
    """
    base_key = jax.random.key(seed)
    dropout_base = jax.random.fold_in(base_key, 1)
    objective_key = jax.random.fold_in(base_key, 2)  # constant: objective folds in the epoch

    def step_fn(state, batch, teacher_state=None):
        step = state["step"]
        images, labels = batch["image"], batch["label"]
        teacher_logits = None
        if teacher_graphdef is not None:
            teacher = nnx.merge(teacher_graphdef, teacher_state)
            teacher_logits = jax.lax.stop_gradient(teacher(images, train=False)[0])

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["batch_stats"])
            rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_base, step))
            extra = {}
            if spec.method == "byot":
                logits, extra["features"] = model(images, train=True, rngs=rngs,
                                                  return_features=True)
            else:
                logits = model(images, train=True, rngs=rngs)
            if spec.method == "dsn" and spec.dsn_norm == "inside":  # DSN Eq. 3: ||w||^2 inside
                extra["classifier_sq_norms"] = tuple(
                    jnp.sum(jnp.square(b.fc.kernel.get_value())) for b in model.branches)
            loss, terms = losses.objective(
                logits, labels, spec=spec, step=step, rng=objective_key,
                teacher_logits=teacher_logits, **extra,
            )
            return loss, (terms, logits, nnx.state(model, nnx.BatchStat).to_pure_dict())

        (loss, (terms, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(state, step=step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
        out = {"loss": loss, "lr": schedule(step), "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}
        out.update({f"loss/{k}": v for k, v in terms.items()})
        for i, z in enumerate(logits):
            out[f"train_top1/{head_name(i)}"] = jnp.mean(jnp.argmax(z, -1) == labels)
        return new_state, out

    return step_fn


def train_step(setup: Setup, seed: int, teacher_graphdef=None) -> Callable:
    """The step of ``setup``: :func:`make_train_step` of ``seed``, or, when the setup holds several
    seeds, the vmapped step of every seed (``seed`` then unused)."""
    def make(k):
        return make_train_step(setup.graphdef, setup.tx, setup.schedule, setup.spec, k,
                               teacher_graphdef)

    if setup.seeds:
        return seeds.vmap_seeded_step(make, setup.seeds)
    return make(seed)
