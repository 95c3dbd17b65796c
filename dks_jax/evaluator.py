"""Evaluation: top-1/top-5 of every head and of the ensemble, and gradient consistency.

In the shape of big_vision's ``evaluators/classification.py``: a pure, jit-able per-batch function
that returns masked sums (:func:`make_eval_step`), and an :class:`Evaluator` that runs it over a data
set's evaluation split and turns the sums into percentages. Evaluation batches are padded to a
fixed size; ``batch["mask"]`` (bool ``[B]``) is False on the padding, which counts nowhere.

:func:`gradient_consistency` (DKS supplement, Proposition 1) is logged with every evaluation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dks_jax import losses, parallel
from dks_jax.seeds import vmap_eval
from dks_jax.steps import head_name


def make_eval_step(graphdef):
    """``(state, batch) -> sums``: correct top-1/top-5 of every head and the ensemble, and the count.

    ``batch``: ``{"image": float[B, H, W, C], "label": int32[B], "mask": bool[B]}``. Returns int
    scalars ``count`` (the unmasked examples), ``top1/C<k>``, ``top5/C<k>`` and, with several heads,
    ``top1/ensemble``, ``top5/ensemble`` (the ensemble: the mean of the heads' softmax).
    """

    def eval_fn(state, batch):
        model = nnx.merge(graphdef, state["params"], state["batch_stats"])
        logits = model(batch["image"], train=False)
        labels, mask = batch["label"], batch["mask"]
        heads = {head_name(i): z for i, z in enumerate(logits)}
        if len(logits) > 1:
            heads["ensemble"] = jnp.log(jnp.mean(jnp.stack([jax.nn.softmax(z) for z in logits]), 0))
        sums = {"count": jnp.sum(mask)}
        for name, z in heads.items():
            top5 = jax.lax.top_k(z, min(5, z.shape[-1]))[1]
            sums[f"top1/{name}"] = jnp.sum((top5[:, 0] == labels) & mask)
            sums[f"top5/{name}"] = jnp.sum(jnp.any(top5 == labels[:, None], -1) & mask)
        return sums

    return eval_fn


def _masked_mean(values, mask):
    if mask is None:
        return jnp.mean(values)
    w = jnp.asarray(mask, jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def _cosine(a, b, axis=None):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=axis)
    norm = jnp.sqrt(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis))
    return dot / jnp.maximum(norm, 1e-30)


def gradient_consistency(graphdef, params, batch_stats, images, labels, mask=None, *,
                         train: bool = False, rng=None) -> dict:
    """Cosine similarity between the main and each auxiliary head's CE gradient at their shared map.

    For auxiliary head ``Ck`` attached at feature map ``z`` (``[B, H, W, C]``, the main path's output
    at the attachment point): ``g1 = d CE(C1) / dz`` (through the rest of the main path) and
    ``gk = d CE(Ck) / dz`` (through the branch), CE the batch-mean softmax cross-entropy with the true
    labels. Returns, for every auxiliary head name ``Ck``:

    - ``grad_cos/Ck``: ``<g1, gk> / (|g1| |gk|)`` over the whole ``[B, H, W, C]`` tensor (the
      gradients of the batch losses, the quantity of Proposition 1);
    - ``grad_cos_example/Ck``: the mean over examples of the per-example cosine.

    Both are in [-1, 1]. ``graphdef`` is static (``jax.jit(gradient_consistency, static_argnums=0)``);
    ``params`` / ``batch_stats`` are the train state's pure dicts; ``images`` ``[B, H, W, C]``,
    ``labels`` int ``[B]``; ``mask`` bool ``[B]`` (an evaluation batch's padding is False): only
    those examples count (the CE is their mean, so padded examples get zero gradient).
    ``train=False`` uses the running BatchNorm statistics (evaluation mode; examples independent);
    ``train=True`` batch statistics (padding included, if any) and dropout from ``rng`` (if the
    model has dropout). A model without auxiliary heads gives ``{}``.
    """
    probe = nnx.merge(graphdef, params, batch_stats)
    if not probe.branches:
        return {}
    names, taps = probe.head_names, probe.taps

    def rngs():
        return nnx.Rngs(dropout=rng) if rng is not None else None

    def run(offsets):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(images, train=train, rngs=rngs(), offsets=offsets)
        return jnp.stack([_masked_mean(losses.cross_entropy(z, labels), mask) for z in logits])

    def tap_shapes():
        model = nnx.merge(graphdef, params, batch_stats)
        return model.features(images, train=train, rngs=rngs())[1]

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(tap_shapes))
    head_losses, vjp = jax.vjp(run, zeros)
    (g_main,) = vjp(jnp.zeros_like(head_losses).at[0].set(1.0))
    out = {}
    for k, tap in enumerate(taps, start=1):
        (g_aux,) = vjp(jnp.zeros_like(head_losses).at[k].set(1.0))
        a, b = g_main[tap], g_aux[tap]
        out[f"grad_cos/{names[k]}"] = _cosine(a, b)
        per_example = _cosine(a, b, axis=tuple(range(1, a.ndim)))
        out[f"grad_cos_example/{names[k]}"] = _masked_mean(per_example, mask)
    return out


class Evaluator:
    """Top-1/top-5 (%) of every head and the ensemble on a data set's evaluation split.

    ``Evaluator(graphdef, dataset, batch_size, seeds=(0, 1))(state)`` returns
    ``{"eval_top1/C1": ..., "eval_top5/ensemble": ..., "eval_count": n, "grad_cos/C2": ...}``;
    with several seeds (a stacked state), each value is the mean over seeds and ``per_seed`` holds
    every seed's own values. Gradient consistency (with ``grad_consistency`` and auxiliary heads)
    is computed on the first evaluation batch.
    """

    def __init__(self, graphdef, dataset, batch_size: int, *, seeds: tuple[int, ...] | None = None,
                 grad_consistency: bool = True, in_flight: parallel.InFlight | None = None):
        self.dataset, self.batch_size, self.seeds = dataset, batch_size, seeds
        self.in_flight = in_flight or parallel.InFlight()
        sums = make_eval_step(graphdef)
        self._sums = vmap_eval(sums) if seeds else sums
        # The running totals are added inside the jitted step: two launches per evaluation batch.
        self._step = jax.jit(lambda state, batch, totals: jax.tree.map(
            jnp.add, totals, self._sums(state, batch)))
        self._consistency = None
        if grad_consistency:
            fn = functools.partial(gradient_consistency, graphdef)
            if seeds:
                fn = jax.vmap(fn, in_axes=(0, 0, None, None, None))
            self._consistency = jax.jit(fn)
            self._probe = next(iter(dataset.eval_iterator(batch_size)))

    def __call__(self, state) -> dict:
        totals = None
        for batch in self.dataset.eval_iterator(self.batch_size):
            if totals is None:
                totals = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                      jax.eval_shape(self._sums, state, batch))
            totals = self._step(state, batch, totals)
            self.in_flight.add(totals, launches=2)  # the batch and the step
        totals = jax.device_get(totals)
        count = np.asarray(totals.pop("count"))
        values = {f"eval_{k}": 100.0 * np.asarray(v, np.float64) / count for k, v in totals.items()}
        result: dict[str, Any] = {k: float(np.mean(v)) for k, v in values.items()}
        result["eval_count"] = int(np.ravel(count)[0])
        if self._consistency is not None:
            p = self._probe
            cos = self._consistency(state["params"], state["batch_stats"], p["image"], p["label"],
                                    p["mask"])
            cos = {k: np.asarray(v, np.float64) for k, v in jax.device_get(cos).items()}
            values.update(cos)  # per seed below, if several
            result.update({k: float(np.mean(v)) for k, v in cos.items()})
        if self.seeds:
            result["per_seed"] = [
                {"seed": s, "eval_count": result["eval_count"],
                 **{k: float(v[i]) for k, v in values.items()}} for i, s in enumerate(self.seeds)]
        return result
