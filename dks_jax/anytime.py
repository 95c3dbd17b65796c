"""Anytime (early-exit) prediction from the auxiliary heads of a deeply supervised model.

A model here returns a tuple of logits: the main head C1 first, then the auxiliary heads from the
deepest fork to the shallowest (C2, C3, ...; ``docs/design.md``). At inference the shallowest head
is available first, then the deeper ones, and C1 last: :func:`availability_order`. An example
*exits* at the first head, in that order, that is confident enough; C1 answers every example that
is left. Rules (:data:`RULES`): ``"max_softmax"`` (exit when the largest softmax probability is
``>= tau``) and ``"entropy"`` (exit when the softmax entropy, in nats, is ``<= tau``).

    costs = anytime.head_costs(model, image_size=32)            # MACs per image, per head
    logits, labels = anytime.head_logits(model, batches)        # every head on an evaluation set
    result = anytime.curve(logits, labels, costs, "max_softmax", [0.5, 0.9, math.inf])
    exit_early = anytime.EarlyExit(model, rule="max_softmax", tau=0.9)
    out = exit_early(images)        # out.logits [N, K] (the answering head's), out.head [N]

**Cost accounting** (:class:`HeadCosts`, multiply-adds per image). Head ``k`` alone costs the main
path up to the map it reads (its *fork*) plus the head itself (its branch; for C1 the main
classifier). An example that exits at head ``k`` has paid the main path up to ``k``'s fork and
every head it evaluated on the way: ``k`` and all heads available before it (shallower), whether
or not they were confident. C1 therefore costs the whole model, branches included, for the
examples that reach it. The mean over examples of that per-example cost is what a threshold's
point of the curve reports.

**Counting.** A registry :class:`~dks_jax.models.Network` is counted analytically
(``models.head_macs``: the convolutions and fully connected layers, as ``models.complexity`` and
the papers count; normalisation, activations, pooling and additions are not counted). A model
built with ``dks_jax.attach`` may hold layers the analytic counter does not see, so it is counted
by XLA's cost analysis: the program that returns only what is wanted (a tap's map, or some heads'
logits) is lowered with ``jax.jit``, dead-code elimination prunes the rest, and its ``flops / 2``
is taken as MACs. XLA counts a multiply-add as two flops; it also counts the element-wise work
(normalisation, activations, additions) and leaves out the products with a convolution's zero
padding, so its numbers differ from an analytic count of the same network by a few percent
(ResNet-8 on 32 x 32 images: 6% below).

**The early-exit predictor** (:class:`EarlyExit`, registry ``Network`` models) really skips work:
it runs the main path piece by piece (``Network.run_main``), after each fork that head's branch on
the examples still running, takes the confident ones out, and continues with the others only.
Every piece is ``jax.jit``-compiled for a fixed number of rows; the survivors are gathered on the
device (their maps never go through the host, only the logits do, for the decision) and padded to
a *bucket*: the next power of two, at least ``min_bucket`` and at most the batch size. Why buckets:
XLA needs static shapes, and a compilation per survivor count would compile almost every batch;
powers of two bound the compilations to about ``log2(batch)`` per piece and waste less than half
of a piece's rows (the padding rows repeat a real example; in evaluation mode the examples of a
batch are independent, so they change nothing). A fixed batch with a mask would skip nothing.
Its logits equal the full model's for the head that answered each example (to float tolerance: the
pieces are compiled separately).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dks_jax import attach, models

__all__ = [
    "RULES",
    "Curve",
    "EarlyExit",
    "Exits",
    "HeadCosts",
    "Point",
    "availability_order",
    "confidence",
    "curve",
    "default_taus",
    "exit_heads",
    "exits",
    "head_costs",
    "head_logits",
]

RULES = ("max_softmax", "entropy")


# ---------------------------------------------------------------------------------------------
# Order of the heads, rules.


def availability_order(num_heads: int) -> tuple[int, ...]:
    """Head indices in the order they become available at inference: the shallowest auxiliary
    head first, C1 (index 0) last, e.g. ``(2, 1, 0)`` for (C1, C2, C3)."""
    if num_heads < 1:
        raise ValueError(f"a model has at least its main head; got {num_heads} heads")
    return tuple(range(num_heads - 1, 0, -1)) + (0,)


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown exit rule {rule!r}; choose from {', '.join(RULES)}")
    return rule


def _log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {z.shape}")
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def confidence(logits, rule: str) -> np.ndarray:
    """Per example (float64 ``[N]``): the largest softmax probability (``max_softmax``) or the
    softmax entropy in nats (``entropy``) of ``logits`` ``[N, K]``."""
    logp = _log_softmax(logits)
    if _check_rule(rule) == "max_softmax":
        return np.exp(logp.max(axis=-1))
    return -(np.exp(logp) * logp).sum(axis=-1)


def exits(logits, rule: str, tau: float) -> np.ndarray:
    """bool ``[N]``: which examples are confident enough to exit at this head (``max_softmax >=
    tau`` or ``entropy <= tau``)."""
    if math.isnan(tau):
        raise ValueError("tau is NaN")
    c = confidence(logits, rule)
    return c >= tau if rule == "max_softmax" else c <= tau


def default_taus(rule: str) -> tuple[float, ...]:
    """A grid of thresholds from "every example exits at the first head" to "none exits"."""
    if _check_rule(rule) == "max_softmax":
        return (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995,
                0.999, math.inf)
    return (math.inf, 2.0, 1.5, 1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.02, 0.01, 0.001,
            -math.inf)


def _check_logits(logits: Sequence, labels=None) -> tuple[list[np.ndarray], np.ndarray | None]:
    heads = [np.asarray(z) for z in logits]
    if len(heads) < 2:
        raise ValueError(f"early exit needs auxiliary heads; got {len(heads)} head(s): the main "
                         "head alone (a model without branches, or an export) cannot exit early")
    shapes = {z.shape for z in heads}
    if len(shapes) != 1 or heads[0].ndim != 2:
        raise ValueError(f"every head's logits must be [N, K] of one shape; got {sorted(shapes)}")
    if labels is None:
        return heads, None
    labels = np.asarray(labels)
    if labels.shape != (heads[0].shape[0],):
        raise ValueError(f"labels have shape {labels.shape}; the logits have "
                         f"{heads[0].shape[0]} examples")
    return heads, labels


def exit_heads(logits: Sequence, rule: str, tau: float) -> np.ndarray:
    """int ``[N]``: the head (index in heads order, 0 = C1) that answers each example: the first
    head in :func:`availability_order` whose logits pass the rule; C1 answers the rest.

    ``logits``: every head's ``[N, K]``, in heads order (the model's output).
    """
    heads, _ = _check_logits(logits)
    _check_rule(rule)
    answer = np.zeros(heads[0].shape[0], np.int64)
    open_ = np.ones(heads[0].shape[0], bool)
    for h in availability_order(len(heads))[:-1]:
        done = open_ & exits(heads[h], rule, tau)
        answer[done] = h
        open_ &= ~done
    return answer


# ---------------------------------------------------------------------------------------------
# Costs.


@dataclasses.dataclass(frozen=True)
class HeadCosts:
    """Multiply-adds per image of every head (tuples in heads order: C1, C2, ...).

    fork: the main path up to the map the head reads (C1: up to its last feature map).
    head: the head itself (a branch; C1: the main classifier).
    alone: the head computed on its own, ``fork + head`` (C1: the main path, what an export costs).
    exit: an example that exits at this head: the main path up to its fork and every head
      evaluated on the way (this one and all available before it; see the module doc).
      C1's is the whole model's cost.
    full: every head: the whole model (what evaluation and the heads' ensemble cost).
    method: ``"analytic"`` (conv + fc multiply-adds) or ``"xla"`` (XLA's flops / 2).
    """

    names: tuple[str, ...]
    fork: tuple[float, ...]
    head: tuple[float, ...]
    alone: tuple[float, ...]
    exit: tuple[float, ...]
    full: float
    method: str

    @property
    def order(self) -> tuple[int, ...]:
        """:func:`availability_order` of these heads."""
        return availability_order(len(self.names))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cascade(names, fork, head) -> HeadCosts:
    order = availability_order(len(names))
    exit_cost, evaluated = [0.0] * len(names), 0.0
    for h in order:
        evaluated += head[h]
        exit_cost[h] = fork[h] + evaluated
    return HeadCosts(names=tuple(names), fork=tuple(float(f) for f in fork),
                     head=tuple(float(h) for h in head),
                     alone=tuple(float(f + h) for f, h in zip(fork, head, strict=True)),
                     exit=tuple(exit_cost), full=float(fork[0] + sum(head)), method="analytic")


def head_costs(model: nnx.Module, *, image_size: int | None = None, example: Any = None,
               example_kwargs: Mapping[str, Any] | None = None) -> HeadCosts:
    """Per-image multiply-adds of every head of ``model`` (:class:`HeadCosts`).

    A registry ``models.Network`` (concrete or abstract): counted analytically at
    ``image_size`` x ``image_size`` (``models.head_macs``). A ``dks_jax.attach.Attached`` model:
    counted by XLA's cost analysis of its call on ``example`` (the model's input, as
    ``attach.attach`` takes it: an array or ``jax.ShapeDtypeStruct``, or a tuple of positional
    arguments; ``example_kwargs`` its keywords; put the model in evaluation mode,
    ``wrapped.eval()`` or ``{"train": False}``), divided by the example's batch size: each number
    is ``flops / 2`` of a ``jax.jit`` program that returns only what is counted (a tap's map, or
    the logits of some heads), dead code pruned. ``exit`` is then measured directly, as the cost
    of the heads available up to that one together.
    """
    if isinstance(model, models.Network):
        if not image_size:
            raise ValueError("head_costs of a registry Network needs image_size (32 for CIFAR, "
                             "224 for ImageNet)")
        if not model.branches:
            raise ValueError("this model has no auxiliary branches (aux='none' or an export): "
                             "it has no early exits")
        per_head = models.head_macs(model, image_size)
        return _cascade([h["name"] for h in per_head], [h["fork"] for h in per_head],
                        [h["head"] for h in per_head])
    if isinstance(model, attach.Attached):
        if example is None:
            raise ValueError("head_costs of an attach.Attached model needs example= (its input)")
        return _xla_costs(model, example, dict(example_kwargs or {}))
    raise TypeError(f"head_costs takes a registry models.Network or an attach.Attached model, "
                    f"got {type(model).__name__}")


def _xla_costs(wrapped: attach.Attached, example, kwargs) -> HeadCosts:
    args = example if isinstance(example, tuple) else (example,)
    arrays = [a for a in jax.tree.leaves(args) if hasattr(a, "shape") and len(a.shape)]
    if not arrays:
        raise ValueError("example= holds no array with a batch axis")
    batch = int(arrays[0].shape[0])
    graphdef, state = nnx.split(wrapped)

    def macs(select) -> float:
        def fn(state, args):
            return select(nnx.merge(graphdef, state), args)

        lowered = jax.jit(fn).lower(state, args)
        cost: Any = lowered.cost_analysis()
        if not cost or "flops" not in cost:  # some backends only analyse compiled programs
            cost = lowered.compile().cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0]
        return float(cost["flops"]) / 2.0 / batch

    def taps(model, args):
        out, maps = model.features(*args, **kwargs)
        return attach._main(out), [maps[name] for name in model.taps]

    n = wrapped.num_heads
    fork = [macs(lambda m, a: taps(m, a)[0])]
    fork += [macs(lambda m, a, i=i: taps(m, a)[1][i]) for i in range(n - 1)]
    alone = [macs(lambda m, a, h=h: m(*a, **kwargs)[h]) for h in range(n)]
    order = availability_order(n)
    exit_cost = [0.0] * n
    for j, h in enumerate(order):
        wanted = order[: j + 1]
        exit_cost[h] = macs(lambda m, a, w=wanted: _pick(m(*a, **kwargs), w))
    head = [a - f for a, f in zip(alone, fork, strict=True)]
    return HeadCosts(names=tuple(wrapped.head_names), fork=tuple(fork), head=tuple(head),
                     alone=tuple(alone), exit=tuple(exit_cost), full=exit_cost[0], method="xla")


def _pick(heads: tuple, wanted: Sequence[int]) -> tuple:
    return tuple(heads[i] for i in wanted)


# ---------------------------------------------------------------------------------------------
# Accuracy against cost.


@dataclasses.dataclass(frozen=True)
class Point:
    """One operating point: top-1 (%) and mean multiply-adds per image.

    label: ``"tau=0.9"``, ``"C2 alone"``, ``"ensemble"``; tau: the threshold (None for the
    others); exits: the share (%) of examples each head answered, by head name.
    """

    label: str
    tau: float | None
    top1: float
    macs: float
    exits: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Curve:
    """Early exit at every threshold (``points``, in the order of the taus given), every head
    alone (``heads``, heads order), and the ensemble of all heads (mean softmax)."""

    rule: str
    count: int
    points: tuple[Point, ...]
    heads: tuple[Point, ...]
    ensemble: Point

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def curve(logits: Sequence, labels, costs: HeadCosts, rule: str = "max_softmax",
          taus: Iterable[float] | None = None) -> Curve:
    """Accuracy and mean MACs per image of early exit at each ``tau`` (default
    :func:`default_taus`), from every head's logits on an evaluation set.

    ``logits``: per head ``[N, K]`` in heads order (the model's output); ``labels`` int ``[N]``;
    ``costs``: :func:`head_costs` of the same model. An example answered by head ``h`` costs
    ``costs.exit[h]``. With ``max_softmax``, ``tau=0`` sends every example out at the shallowest
    head (its accuracy, its cost) and ``tau=inf`` none (C1's accuracy at the whole model's cost);
    with ``entropy`` the other way round (``inf``, ``-inf``).
    """
    heads, labels = _check_logits(logits, labels)
    assert labels is not None
    _check_rule(rule)
    if len(costs.names) != len(heads):
        raise ValueError(f"costs are for {len(costs.names)} heads, the logits for {len(heads)}")
    n, names = len(labels), costs.names
    correct = [np.argmax(z, axis=-1) == labels for z in heads]

    def share(mask) -> float:
        return 100.0 * float(np.mean(mask)) if n else 0.0

    points = []
    for tau in (default_taus(rule) if taus is None else tuple(taus)):
        answer = exit_heads(heads, rule, float(tau))
        right = np.stack(correct)[answer, np.arange(n)]
        cost = np.asarray(costs.exit, np.float64)[answer]
        points.append(Point(f"tau={tau:g}", float(tau), share(right),
                            float(cost.mean()) if n else 0.0,
                            {names[h]: share(answer == h) for h in range(len(heads))}))
    alone = tuple(Point(f"{names[h]} alone", None, share(correct[h]), costs.alone[h],
                        {names[h]: 100.0}) for h in range(len(heads)))
    probs = np.mean([np.exp(_log_softmax(z)) for z in heads], axis=0)
    ensemble = Point("ensemble", None, share(np.argmax(probs, -1) == labels), costs.full,
                     {name: 100.0 for name in names})
    return Curve(rule=rule, count=n, points=tuple(points), heads=alone, ensemble=ensemble)


def head_logits(model: nnx.Module, batches: Iterable[Mapping[str, Any]]
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """Every head's logits on ``batches`` in evaluation mode: ``([N, K] per head, labels [N])``,
    float32 and int, on the host.

    ``batches``: dicts with ``"image"`` and ``"label"`` and optionally a ``"mask"`` (False on
    padding, which is dropped), as ``data.Dataset.eval_iterator`` yields them (single process).
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=False))
    out: list[list[np.ndarray]] = []
    labels = []
    for batch in batches:
        heads = jax.device_get(forward(state, batch["image"]))
        keep = np.asarray(batch["mask"], bool) if "mask" in batch else slice(None)
        if not out:
            out = [[] for _ in heads]
        for acc, z in zip(out, heads, strict=True):
            acc.append(np.asarray(z, np.float32)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    if not out:
        raise ValueError("no batches: the evaluation set is empty")
    return [np.concatenate(z) for z in out], np.concatenate(labels)


# ---------------------------------------------------------------------------------------------
# The early-exit predictor.


@dataclasses.dataclass(frozen=True)
class Exits:
    """What :class:`EarlyExit` returns for ``N`` images.

    logits: float32 ``[N, K]``, each example's answering head's logits.
    head: int ``[N]``, that head's index in heads order (0 = C1).
    macs: float64 ``[N]``, what each example cost (``HeadCosts.exit`` of its head).
    """

    logits: np.ndarray
    head: np.ndarray
    macs: np.ndarray


def _bucket(n: int, low: int, high: int) -> int:
    return min(high, max(low, 1 << max(n - 1, 0).bit_length()))


class EarlyExit:
    """Early exit that skips the work of the exited examples, for a registry ``models.Network``.

    ``EarlyExit(model, rule="max_softmax", tau=0.9)(images)`` -> :class:`Exits`. ``images``: the
    model's input ``float[N, H, W, 3]`` (normalised as in evaluation), any ``N``, taken in chunks
    of ``batch_size``. Per chunk: the main path runs to the shallowest fork, that branch classifies
    the chunk, the examples whose logits pass the rule are done; the others continue to the next
    fork, and so on; C1 answers the rest. Pieces are compiled per bucket size (module doc), once
    each, on first use. Evaluation mode only (BatchNorm running statistics).

    ``tau`` may also be given per call (no recompilation: the decision is taken on the host).
    ``Exits.macs`` comes from :meth:`costs` at the images' size.
    """

    def __init__(self, model: models.Network, *, rule: str = "max_softmax", tau: float = 0.9,
                 batch_size: int = 256, min_bucket: int = 8):
        if not isinstance(model, models.Network):
            raise TypeError(f"EarlyExit runs a registry models.Network piece by piece; got "
                            f"{type(model).__name__} (for other models use head_costs and "
                            "curve on their logits)")
        if not model.branches:
            raise ValueError("this model has no auxiliary branches (aux='none' or an export): "
                             "it has no early exits")
        if batch_size < 1 or min_bucket < 1:
            raise ValueError(f"batch_size={batch_size} and min_bucket={min_bucket} must be >= 1")
        self.rule, self.tau = _check_rule(rule), float(tau)
        self.batch_size, self.min_bucket = batch_size, min(min_bucket, batch_size)
        self.head_names = model.head_names
        self._costs: dict[int, HeadCosts] = {}
        self._model = model
        graphdef, self._state = nnx.split(model)
        order = availability_order(model.num_heads)
        position = {h: model.taps[h - 1] for h in order[:-1]}
        if any(position[a] > position[b] for a, b in zip(order[:-2], order[1:-1], strict=True)):
            raise ValueError(f"the forks {model.taps} are not deepest first (C2, C3, ...)")
        self._pieces = []  # (head, jitted piece): main path to the head's fork, then the head
        start = None
        for h in order[:-1]:
            stop = position[h]

            def piece(state, x, start=start, stop=stop, branch=h - 1):
                m = nnx.merge(graphdef, state)
                x = m.run_main(x, start, stop, train=False)
                return x, m.branches[branch](x, train=False).astype(jnp.float32)

            self._pieces.append((h, jax.jit(piece)))
            start = stop

        def last(state, x, start=start):
            m = nnx.merge(graphdef, state)
            return m.classify(m.run_main(x, start, None, train=False), train=False)

        self._last = jax.jit(last)

    def costs(self, image_size: int) -> HeadCosts:
        """:func:`head_costs` of the model at ``image_size`` (cached)."""
        if image_size not in self._costs:
            self._costs[image_size] = head_costs(self._model, image_size=image_size)
        return self._costs[image_size]

    def __call__(self, images, tau: float | None = None) -> Exits:
        tau = self.tau if tau is None else float(tau)
        images = np.asarray(images) if not isinstance(images, jax.Array) else images
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        n = images.shape[0]
        k = self._model.num_classes
        logits = np.zeros((n, k), np.float32)
        head = np.zeros(n, np.int64)
        for lo in range(0, n, self.batch_size):
            hi = min(n, lo + self.batch_size)
            self._chunk(images[lo:hi], tau, logits[lo:hi], head[lo:hi])
        cost = np.asarray(self.costs(int(images.shape[1])).exit, np.float64)[head]
        return Exits(logits=logits, head=head, macs=cost)

    def _chunk(self, images, tau, logits_out, head_out) -> None:
        n = images.shape[0]
        alive = np.arange(n)  # rows of the chunk still running, in the order of x's rows
        size = _bucket(n, self.min_bucket, self.batch_size)
        x = jnp.asarray(images)
        if size > n:
            x = jnp.concatenate([x, jnp.repeat(x[:1], size - n, axis=0)])
        for h, piece in self._pieces:
            x, z = piece(self._state, x)
            z = np.asarray(z)[: len(alive)]
            done = exits(z, self.rule, tau)
            logits_out[alive[done]] = z[done]
            head_out[alive[done]] = h
            if not done.any():
                continue  # nobody left: x and its rows stay as they are
            keep = np.flatnonzero(~done)
            if not len(keep):
                return
            alive = alive[keep]
            size = _bucket(len(keep), self.min_bucket, self.batch_size)
            rows = np.concatenate([keep, np.full(size - len(keep), keep[0])])
            x = jnp.take(x, jnp.asarray(rows, jnp.int32), axis=0)  # on the device
        z = np.asarray(self._last(self._state, x))[: len(alive)]
        logits_out[alive] = z
        head_out[alive] = 0
