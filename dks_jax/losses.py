"""Losses of the deep-supervision family: DS, DSN, DKS, DHM, KD and BYOT self-distillation.

Every function here is pure: arrays in, arrays out, no module state and no config objects, so each
one works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``, e.g. in a notebook::

    grads = jax.grad(lambda z: losses.synergy_loss(z, "bidirectional"))(logits)

Conventions (docs/design.md):

- ``logits`` of a multi-head loss is a tuple (or list) of per-head arrays, all of shape ``[B, K]``:
  index 0 is the main (top-most) classifier, then the auxiliary classifiers from the deepest to the
  shallowest attachment point (the DKS paper's C1, C2, C3[, C4]). Any number of leading batch
  dimensions is allowed (``[..., K]``); "batch mean" then means the mean over all of them, so
  ``jax.vmap`` over examples or over replicas both work.
- ``labels`` are integer class indices of shape ``[B]`` (the logits' shape without ``K``).
- A knowledge-matching pair is ``(teacher, student)`` by head index. The teacher's softmax is a
  constant soft target (``jax.lax.stop_gradient``): no gradient ever flows into the teacher through
  its pair.
- Every scalar loss is a batch mean.
- Dtypes: logits may be any float dtype; softmax-based terms are computed in at least float32
  (bf16 logits are upcast first), so a loss of float32 or bf16 logits is a ``float32[]`` scalar
  (float64 logits give float64).

Bad input that can be detected while tracing (a single head given to a pairwise loss, heads of
different shapes, an unknown strategy or method, weights of the wrong size, a pair index out of
range, ...) raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "METHODS",
    "STRATEGIES",
    "ObjectiveSpec",
    "cross_entropy",
    "deep_supervision_loss",
    "dsn_alpha_scale",
    "dsn_companion_loss",
    "byot_feature_loss",
    "kd_loss",
    "mimicking_mask",
    "objective",
    "pair_set",
    "synergy_loss",
]

STRATEGIES = ("top_down", "bottom_up", "bidirectional")
METHODS = ("baseline", "ds", "dsn", "dks", "dhm", "kd", "byot")
_DIVERGENCES = ("ce", "kl")
_COMPANIONS = ("ce", "squared_hinge")
_SCHEDULE_FORMS = ("linear", "step")
_DSN_NORMS = ("inside", "weight_decay")


# --------------------------------------------------------------------------------------------------
# Input checks (all static: shapes, dtypes and Python values, so they run once while tracing).


def _is_concrete_number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _float(x: jax.Array) -> jax.Array:
    """``x`` in at least float32 (bf16 logits are upcast before softmax)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_heads(logits, fn: str, min_heads: int = 1) -> tuple[jax.Array, ...]:
    if not isinstance(logits, (tuple, list)):
        raise ValueError(
            f"{fn}: logits must be a tuple of per-head [B, K] arrays (index 0 = main classifier), "
            f"got a {type(logits).__name__}"
        )
    heads = tuple(jnp.asarray(z) for z in logits)
    if len(heads) < min_heads:
        raise ValueError(
            f"{fn}: needs at least {min_heads} heads (a pairwise loss needs two or more "
            f"classifiers), got {len(heads)}"
        )
    shapes = [tuple(z.shape) for z in heads]
    if len(set(shapes)) > 1:
        raise ValueError(f"{fn}: heads have different shapes {shapes}; all must be [B, K]")
    if heads and heads[0].ndim < 1:
        raise ValueError(f"{fn}: logits must have a class axis, got shape {shapes[0]}")
    return heads


def _check_labels(labels, logits_shape, fn: str) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"{fn}: labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(logits_shape)} (expected labels of shape {tuple(logits_shape[:-1])})"
        )
    return labels


def _check_temperature(temperature, fn: str) -> None:
    if _is_concrete_number(temperature) and not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")


def _check_weight_shape(shape: tuple[int, ...], num_pairs: int, num_heads: int, fn: str) -> None:
    if len(shape) == 0:
        return
    if len(shape) == 1:
        if shape[0] != num_pairs:
            raise ValueError(f"{fn}: {shape[0]} per-pair weights given for {num_pairs} pairs")
        return
    if len(shape) == 2:
        if shape != (num_heads, num_heads):
            raise ValueError(
                f"{fn}: weight matrix of shape {shape} for {num_heads} heads; expected "
                f"({num_heads}, {num_heads}) indexed [teacher, student]"
            )
        return
    raise ValueError(
        f"{fn}: weights must be a scalar, one per pair, or a heads x heads matrix; "
        f"got shape {shape}"
    )


def _aux_weight_vector(weights, num_heads: int, fn: str) -> jax.Array:
    """A scalar or one weight per auxiliary head -> float array ``[num_heads - 1]``."""
    try:
        w = jnp.asarray(weights, dtype=jnp.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fn}: auxiliary weights must be a scalar or a sequence: {e}") from None
    if w.ndim == 0:
        return jnp.full((num_heads - 1,), w)
    if w.shape != (num_heads - 1,):
        raise ValueError(
            f"{fn}: {w.shape} auxiliary weights given for {num_heads - 1} auxiliary heads; "
            "give a scalar or one weight per auxiliary head"
        )
    return w


# --------------------------------------------------------------------------------------------------
# Losses.


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy with integer labels, per example.

    Args:
      logits: ``float[B, K]``, any float dtype (any leading dims ``[..., K]``).
      labels: ``int[B]`` (the logits' leading dims), values in ``[0, K)``.
      label_smoothing: ``eps`` in ``[0, 1]``; the target is ``(1 - eps) * one_hot + eps / K``.

    Returns:
      ``float32[B]`` (float64 for float64 logits): ``-sum_k target_k * log_softmax(logits)_k``.
    """
    logits = jnp.asarray(logits)
    if logits.ndim < 1:
        raise ValueError(f"cross_entropy: logits must have a class axis, got shape {logits.shape}")
    labels = _check_labels(labels, logits.shape, "cross_entropy")
    if _is_concrete_number(label_smoothing) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    log_p = jax.nn.log_softmax(_float(logits), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    if _is_concrete_number(label_smoothing) and label_smoothing == 0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)


def pair_set(num_heads: int, strategy: str) -> tuple[tuple[int, int], ...]:
    """The ``(teacher, student)`` pairs of a knowledge-matching strategy (DKS paper, Fig. 2).

    Args:
      num_heads: number of classifiers (main + auxiliary), at least 2.
      strategy: ``"top_down"`` (deeper teaches shallower: teacher index < student index),
        ``"bottom_up"`` (the reverse) or ``"bidirectional"`` (every ordered pair).

    Returns:
      Tuple of ``(teacher, student)`` index pairs in lexicographic order, e.g. for 3 heads
      ``top_down`` = ``((0, 1), (0, 2), (1, 2))``.
    """
    if not isinstance(num_heads, numbers.Integral) or num_heads < 2:
        raise ValueError(
            f"pair_set: knowledge matching needs at least two heads, got num_heads={num_heads}"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"pair_set: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    keep = {
        "top_down": lambda m, n: m < n,
        "bottom_up": lambda m, n: m > n,
        "bidirectional": lambda m, n: m != n,
    }[strategy]
    return tuple((m, n) for m in range(num_heads) for n in range(num_heads) if keep(m, n))


def _resolve_pairs(pairs, num_heads: int, fn: str) -> tuple[tuple[int, int], ...]:
    """A strategy name or an explicit sequence of pairs -> validated tuple of pairs."""
    if isinstance(pairs, str):
        if pairs not in STRATEGIES:
            raise ValueError(f"{fn}: unknown strategy {pairs!r}; expected one of {STRATEGIES}")
        return pair_set(num_heads, pairs)
    if not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(
            f"{fn}: pairs must be a strategy name {STRATEGIES} or a non-empty sequence of "
            f"(teacher, student) pairs, got {pairs!r}"
        )
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(i, numbers.Integral) for i in pair)
        ):
            raise ValueError(
                f"{fn}: a pair must be two head indices (teacher, student), got {pair!r}"
            )
        m, n = int(pair[0]), int(pair[1])
        if not (0 <= m < num_heads and 0 <= n < num_heads):
            raise ValueError(f"{fn}: pair {(m, n)} out of range for {num_heads} heads")
        if m == n:
            raise ValueError(f"{fn}: pair {(m, n)} matches a head with itself")
        out.append((m, n))
    return tuple(out)


def _soft_target_loss(teacher_log_p: jax.Array, student_log_q: jax.Array, divergence: str):
    """Batch mean of H(p, q) = -sum p log q ("ce") or KL(p || q) ("kl"); p is the teacher."""
    p = jnp.exp(teacher_log_p)
    if divergence == "ce":
        per_example = -jnp.sum(p * student_log_q, axis=-1)
    else:
        per_example = jnp.sum(p * (teacher_log_p - student_log_q), axis=-1)
    return jnp.mean(per_example)


def synergy_loss(
    logits: Sequence[jax.Array],
    pairs: str | Sequence[tuple[int, int]] = "bidirectional",
    weights: Any = 1.0,
    temperature: float = 1.0,
    divergence: str = "ce",
    head_mask: jax.Array | None = None,
) -> jax.Array:
    """DKS synergy loss (DKS paper, eq. 4): dense pairwise knowledge matching between classifiers.

    ``T**2 * mean_b sum_{(m,n) in pairs} beta_mn * H(sg(softmax(z_m / T)), softmax(z_n / T))``
    with ``H(p, q) = -sum_k p_k log q_k`` (the paper's definition) and ``sg`` = stop_gradient: head
    ``m`` teaches head ``n``. The ``T**2`` factor is Hinton's convention (keeps gradient scale
    independent of ``T``); ``T = 1`` is the paper.

    Args:
      logits: tuple of ``num_heads >= 2`` arrays ``float[B, K]`` (heads order of the module
        docstring).
      pairs: a strategy name (see ``pair_set``) or an explicit sequence of ``(teacher, student)``.
      weights: ``beta``: a scalar, one weight per pair (in the order of ``pairs``), or a
        ``[num_heads, num_heads]`` matrix indexed ``[teacher, student]`` (diagonal unused).
      temperature: ``T > 0``, applied to both teacher and student logits.
      divergence: ``"ce"`` (the paper) or ``"kl"``: ``KL(p || q) = H(p, q) - H(p)``. Since ``p`` is
        a constant, both give the same gradients; ``"kl"`` is what the authors' code logs (0 when
        the heads agree).
      head_mask: optional ``bool[num_heads]``; every pair touching a head whose entry is False is
        dropped (DHM's Bernoulli sampling, see ``mimicking_mask``). The remaining pairs are summed,
        not re-normalised. May be traced.

    Returns:
      ``float32[]`` scalar.
    """
    fn = "synergy_loss"
    heads = _check_heads(logits, fn, min_heads=2)
    num_heads = len(heads)
    pair_tuple = _resolve_pairs(pairs, num_heads, fn)
    if divergence not in _DIVERGENCES:
        raise ValueError(f"{fn}: unknown divergence {divergence!r}; expected one of {_DIVERGENCES}")
    _check_temperature(temperature, fn)
    try:
        w = jnp.asarray(weights, dtype=jnp.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fn}: weights must be a scalar, a sequence or a matrix: {e}") from None
    _check_weight_shape(tuple(w.shape), len(pair_tuple), num_heads, fn)
    teachers = np.array([m for m, _ in pair_tuple])
    students = np.array([n for _, n in pair_tuple])
    if w.ndim == 0:
        w = jnp.full((len(pair_tuple),), w)
    elif w.ndim == 2:
        w = w[teachers, students]
    if head_mask is not None:
        mask = jnp.asarray(head_mask)
        if mask.shape != (num_heads,):
            raise ValueError(
                f"{fn}: head_mask of shape {mask.shape} for {num_heads} heads; expected "
                f"({num_heads},)"
            )
        mask = mask.astype(w.dtype)
        w = w * mask[teachers] * mask[students]
    log_p = [jax.nn.log_softmax(_float(z) / temperature, axis=-1) for z in heads]
    total: jax.Array | float = 0.0
    for i, (m, n) in enumerate(pair_tuple):
        teacher = jax.lax.stop_gradient(log_p[m])
        total = total + w[i] * _soft_target_loss(teacher, log_p[n], divergence)
    return jnp.asarray(temperature**2 * total)


def byot_feature_loss(features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """BYOT's hint terms: ``mean_b ||F_h - sg(F_1)||_2^2`` for every shallow head ``h >= 1``.

    ``features[0]`` is the deepest classifier's feature (a constant target: ``stop_gradient``),
    ``features[h]`` the shallow classifier ``h``'s feature after its bottleneck (adaptation) layer,
    all ``float[B, D]``. Returns one batch-mean squared L2 distance per shallow head: a tuple of
    ``num_heads - 1`` scalars ``[]`` in the features' dtype.
    """
    fn = "byot_feature_loss"
    feats = _check_heads(features, fn, min_heads=2)
    target = jax.lax.stop_gradient(feats[0])
    return tuple(jnp.mean(jnp.sum(jnp.square(f - target), axis=-1)) for f in feats[1:])


def deep_supervision_loss(
    logits: Sequence[jax.Array], labels: jax.Array, aux_weights: Any = 1.0
) -> jax.Array:
    """Deep supervision (DKS paper, eq. 3): ``mean_b CE(main) + sum_l alpha_l * mean_b CE(aux_l)``.

    Args:
      logits: tuple of ``num_heads >= 1`` arrays ``float[B, K]``; head 0 is the main classifier.
      labels: ``int[B]``.
      aux_weights: ``alpha``: a scalar or one weight per auxiliary head (``num_heads - 1``).

    Returns:
      ``float32[]`` scalar.
    """
    fn = "deep_supervision_loss"
    heads = _check_heads(logits, fn, min_heads=1)
    _check_labels(labels, heads[0].shape, fn)
    loss = jnp.mean(cross_entropy(heads[0], labels))
    if len(heads) == 1:
        return loss
    alphas = _aux_weight_vector(aux_weights, len(heads), fn)
    for i, z in enumerate(heads[1:]):
        loss = loss + alphas[i] * jnp.mean(cross_entropy(z, labels))
    return loss


def _squared_hinge(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """DSN's multi-class squared hinge (L2-SVM), per example: sum_{k != y} [1 - (z_y - z_k)]_+^2."""
    z = _float(logits)
    z_y = jnp.take_along_axis(z, labels[..., None], axis=-1)
    margins = jnp.maximum(0.0, 1.0 - (z_y - z)) ** 2
    not_y = jnp.arange(z.shape[-1]) != labels[..., None]
    return jnp.sum(jnp.where(not_y, margins, 0.0), axis=-1)


def dsn_companion_loss(
    logits: Sequence[jax.Array],
    labels: jax.Array,
    alphas: Any,
    gamma: float,
    companion: str = "ce",
    classifier_sq_norms: Sequence[jax.Array] | None = None,
) -> jax.Array:
    """DSN's companion objective: ``sum_{m >= 1} alpha_m * max(0, ||w^(m)||^2 + l_m - gamma)``.

    Deeply-Supervised Nets (Lee et al., AISTATS 2015), Eq. 3: the companion term of hidden layer
    ``m`` is ``alpha_m [||w^(m)||^2 + l(W, w^(m)) - gamma]_+``, with ``w^(m)`` the weights of that
    layer's companion classifier, *inside* the hinge: once a companion's regularised loss falls
    below ``gamma`` it stops acting, norm included. ``l_m`` is head ``m``'s batch-mean loss.
    ``classifier_sq_norms=None`` drops the norm from the hinge (the form that leaves ``||w||^2``
    to the optimizer's weight decay: ``ObjectiveSpec(dsn_norm="weight_decay")``).

    Args:
      logits: the full heads tuple, ``num_heads >= 2`` arrays ``float[B, K]``. Head 0 (the main
        classifier, DSN's overall objective) is not part of this term.
      labels: int ``[B]``.
      alphas: a scalar or one weight per auxiliary head (``num_heads - 1``); may be traced, e.g.
        scaled by ``dsn_alpha_scale`` for DSN's "zero-ing".
      gamma: threshold ``>= 0`` (0 = always on).
      companion: ``"ce"`` (softmax cross-entropy) or ``"squared_hinge"``: the L2-SVM loss DSN used,
        ``sum_{k != y} max(0, 1 - (z_y - z_k))**2`` per example.
      classifier_sq_norms: ``||w^(m)||^2`` of each auxiliary head's classifier (``num_heads - 1``
        scalars, in heads order; differentiable), or None.

    Returns:
      ``float32[]`` scalar.
    """
    fn = "dsn_companion_loss"
    heads = _check_heads(logits, fn, min_heads=2)
    labels = _check_labels(labels, heads[0].shape, fn)
    if companion not in _COMPANIONS:
        raise ValueError(f"{fn}: unknown companion {companion!r}; expected one of {_COMPANIONS}")
    if _is_concrete_number(gamma) and gamma < 0:
        raise ValueError(f"{fn}: gamma must be >= 0, got {gamma}")
    alpha_vec = _aux_weight_vector(alphas, len(heads), fn)
    if classifier_sq_norms is not None and len(classifier_sq_norms) != len(heads) - 1:
        raise ValueError(f"{fn}: {len(classifier_sq_norms)} classifier norms for "
                         f"{len(heads) - 1} auxiliary heads")
    per_example = cross_entropy if companion == "ce" else _squared_hinge
    loss: jax.Array | float = 0.0
    for i, z in enumerate(heads[1:]):
        inside = jnp.mean(per_example(z, labels)) - gamma
        if classifier_sq_norms is not None:
            inside = inside + jnp.asarray(classifier_sq_norms[i], jnp.float32)
        loss = loss + alpha_vec[i] * jnp.maximum(0.0, inside)
    return jnp.asarray(loss)


def dsn_alpha_scale(step, total_steps: int, zero_fraction: float = 1.0, form: str = "linear"):
    """DSN's "zero-ing" of the companion weights: the factor multiplying ``alpha_m`` at ``step``.

    DSN lowers ``alpha_m`` during training so that the companion objectives vanish and only the
    overall objective is left; the DKS paper (section 3.1) calls it "a zero-ing strategy to
    dynamically control the value of alpha_l". The papers here name the strategy, not its form,
    so both forms are offered. With ``t_0 = zero_fraction * total_steps``:

    - ``"linear"`` (what ``objective`` uses): ``max(0, 1 - step / t_0)``, a linear decay that
      reaches 0 at ``t_0`` and stays 0 (``zero_fraction = 1``: ``alpha_m * (1 - t / N)``).
    - ``"step"``: 1 before ``t_0``, 0 from ``t_0`` on (companions switched off at once).

    Args:
      step: current step, int scalar (may be traced).
      total_steps: number of training steps (``>= 1``).
      zero_fraction: fraction of training at which the factor reaches 0 (``> 0``).
      form: ``"linear"`` or ``"step"``.

    Returns:
      Float32 scalar in ``[0, 1]``.
    """
    fn = "dsn_alpha_scale"
    if form not in _SCHEDULE_FORMS:
        raise ValueError(f"{fn}: unknown form {form!r}; expected one of {_SCHEDULE_FORMS}")
    if _is_concrete_number(total_steps) and total_steps < 1:
        raise ValueError(f"{fn}: total_steps must be >= 1, got {total_steps}")
    if _is_concrete_number(zero_fraction) and not zero_fraction > 0:
        raise ValueError(f"{fn}: zero_fraction must be > 0, got {zero_fraction}")
    t = jnp.asarray(step, dtype=jnp.float32)
    end = jnp.asarray(zero_fraction * total_steps, dtype=jnp.float32)
    if form == "linear":
        return jnp.clip((end - t) / end, 0.0, 1.0)  # exactly 0 at t = end, also under jit
    return jnp.where(t < end, 1.0, 0.0).astype(jnp.float32)


def mimicking_mask(rng: jax.Array, num_heads: int, p: float = 0.5) -> jax.Array:
    """DHM's Bernoulli sampling of branches (DHM supplement, section D).

    The main head (index 0) always takes part; each auxiliary branch takes part with probability
    ``p``, i.i.d. Pass the result as ``head_mask`` to ``synergy_loss``. DHM draws it once per
    epoch: fold the epoch into the key, ``mimicking_mask(jax.random.fold_in(key, epoch), ...)``
    (``objective`` does this).

    Args:
      rng: a PRNG key (typed or raw ``uint32[2]``).
      num_heads: number of heads, ``>= 1``.
      p: inclusion probability of each auxiliary branch, in ``[0, 1]``.

    Returns:
      bool ``[num_heads]`` with ``mask[0] == True``.
    """
    if not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"mimicking_mask: num_heads must be an int >= 1, got {num_heads}")
    if _is_concrete_number(p) and not 0.0 <= p <= 1.0:
        raise ValueError(f"mimicking_mask: p must be in [0, 1], got {p}")
    aux = jax.random.bernoulli(rng, p, (num_heads - 1,))
    return jnp.concatenate([jnp.ones((1,), dtype=bool), aux])


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton knowledge distillation: ``T**2 * mean_b KL(softmax(t / T) || softmax(s / T))``.

    The teacher is under ``stop_gradient``. KL and the soft-target cross-entropy differ by the
    teacher's entropy, a constant, so the gradients are Hinton's; KL is 0 when the two agree.

    Args:
      student_logits: ``float[B, K]``.
      teacher_logits: ``float[B, K]`` (same shape).
      temperature: ``T > 0``.

    Returns:
      ``float32[]`` scalar.
    """
    fn = "kd_loss"
    student = jnp.asarray(student_logits)
    teacher = jnp.asarray(teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{fn}: student logits {student.shape} and teacher logits {teacher.shape} differ"
        )
    if student.ndim < 1:
        raise ValueError(f"{fn}: logits must have a class axis, got shape {student.shape}")
    _check_temperature(temperature, fn)
    log_p = jax.lax.stop_gradient(jax.nn.log_softmax(_float(teacher) / temperature, axis=-1))
    log_q = jax.nn.log_softmax(_float(student) / temperature, axis=-1)
    return temperature**2 * _soft_target_loss(log_p, log_q, "kl")


# --------------------------------------------------------------------------------------------------
# The composing function.


def _freeze(value):
    """Lists (and arrays) -> tuples, recursively, so the spec stays hashable."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """What ``objective`` computes: plain, hashable values (a static argument under ``jax.jit``).

    Built from the config by the trainer. Lists given for the tuple fields are turned into tuples.

    Attributes:
      method: one of ``METHODS``: baseline | ds | dsn | dks | dhm | kd | byot.
      num_heads: number of classifiers the model returns (main + auxiliary).
      alpha: weight(s) of the auxiliary heads' CE terms (DS, DKS, DHM, BYOT, KD) or of the DSN
        companion terms: a scalar or one per auxiliary head.
      beta: synergy weights (DKS, DHM, BYOT): scalar, one per pair, or heads x heads
        ``[teacher][student]``.
      pairs: strategy name or explicit ``(teacher, student)`` pairs (DKS, DHM).
      temperature: softmax temperature of the synergy and KD terms.
      divergence: ``"ce"`` or ``"kl"`` for the synergy terms.
      label_smoothing: applied to the CE terms (``ce/<head>``).
      gamma: DSN threshold.
      dsn_companion: ``"ce"`` or ``"squared_hinge"``.
      dsn_zero_fraction: fraction of training at which DSN's alphas reach 0.
      dsn_schedule: DSN's zero-ing form, ``"linear"`` decay or ``"step"`` (see
        ``dsn_alpha_scale``).
      dsn_norm: ``"inside"`` (DSN Eq. 3: each companion classifier's ``||w||^2`` inside its hinge;
        ``objective`` then needs ``classifier_sq_norms``) or ``"weight_decay"`` (left to the
        optimizer).
      byot_alpha, byot_lambda: BYOT's ``alpha`` (weight of each shallow head's distillation term;
        its label term gets ``1 - alpha``) and ``lambda`` (weight of each hint term).
      mimic_prob: DHM's Bernoulli ``p`` for each auxiliary branch.
      kd_weight: weight of each KD term.
      kd_heads: heads that receive the teacher's soft targets (KD).
      steps_per_epoch: steps in one epoch (DHM redraws its mask once per epoch).
      total_steps: steps in the whole run (DSN schedule).
    """

    method: str
    num_heads: int
    alpha: float | tuple[float, ...] = 1.0
    beta: Any = 1.0
    pairs: str | tuple[tuple[int, int], ...] = "bidirectional"
    temperature: float = 1.0
    divergence: str = "ce"
    label_smoothing: float = 0.0
    gamma: float = 0.0
    dsn_companion: str = "ce"
    dsn_zero_fraction: float = 1.0
    dsn_schedule: str = "linear"
    dsn_norm: str = "inside"
    byot_alpha: float = 0.3
    byot_lambda: float = 0.03
    mimic_prob: float = 0.5
    kd_weight: float = 1.0
    kd_heads: tuple[int, ...] = (0,)
    steps_per_epoch: int = 1
    total_steps: int = 1

    def __post_init__(self):
        for name in ("alpha", "beta", "pairs", "kd_heads"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        fn = "ObjectiveSpec"
        if self.method not in METHODS:
            raise ValueError(f"{fn}: unknown method {self.method!r}; expected one of {METHODS}")
        if not isinstance(self.num_heads, numbers.Integral) or self.num_heads < 1:
            raise ValueError(f"{fn}: num_heads must be an int >= 1, got {self.num_heads}")
        if self.method in ("dsn", "dks", "dhm", "byot") and self.num_heads < 2:
            raise ValueError(
                f"{fn}: method {self.method!r} needs auxiliary heads, "
                f"got num_heads={self.num_heads}"
            )
        if self.num_heads > 1:
            _aux_weight_vector(self.alpha, self.num_heads, fn)
        if self.method in ("dks", "dhm"):
            pairs = _resolve_pairs(self.pairs, self.num_heads, fn)
            _check_weight_shape(np.shape(self.beta), len(pairs), self.num_heads, fn)
        if self.dsn_schedule not in _SCHEDULE_FORMS:
            raise ValueError(f"{fn}: unknown dsn_schedule {self.dsn_schedule!r}; expected one of "
                             f"{_SCHEDULE_FORMS}")
        if self.dsn_norm not in _DSN_NORMS:
            raise ValueError(f"{fn}: unknown dsn_norm {self.dsn_norm!r}; expected one of "
                             f"{_DSN_NORMS}")
        if not 0.0 <= self.byot_alpha <= 1.0 or self.byot_lambda < 0:
            raise ValueError(f"{fn}: byot_alpha must be in [0, 1] and byot_lambda >= 0, got "
                             f"{self.byot_alpha} and {self.byot_lambda}")
        if not self.temperature > 0:
            raise ValueError(f"{fn}: temperature must be > 0, got {self.temperature}")
        if self.divergence not in _DIVERGENCES:
            raise ValueError(f"{fn}: unknown divergence {self.divergence!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.gamma < 0:
            raise ValueError(f"{fn}: gamma must be >= 0, got {self.gamma}")
        if self.dsn_companion not in _COMPANIONS:
            raise ValueError(f"{fn}: unknown dsn_companion {self.dsn_companion!r}")
        if not self.dsn_zero_fraction > 0:
            raise ValueError(f"{fn}: dsn_zero_fraction must be > 0, got {self.dsn_zero_fraction}")
        if not 0.0 <= self.mimic_prob <= 1.0:
            raise ValueError(f"{fn}: mimic_prob must be in [0, 1], got {self.mimic_prob}")
        if self.method == "kd":
            if not self.kd_heads or any(not 0 <= h < self.num_heads for h in self.kd_heads):
                raise ValueError(
                    f"{fn}: kd_heads {self.kd_heads} must be non-empty head indices in "
                    f"[0, {self.num_heads})"
                )
        if self.steps_per_epoch < 1 or self.total_steps < 1:
            raise ValueError(
                f"{fn}: steps_per_epoch and total_steps must be >= 1, got "
                f"{self.steps_per_epoch} and {self.total_steps}"
            )


def objective(
    logits: Sequence[jax.Array],
    labels: jax.Array,
    *,
    spec: ObjectiveSpec,
    step,
    rng,
    teacher_logits: jax.Array | None = None,
    classifier_sq_norms: Sequence[jax.Array] | None = None,
    features: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of ``spec.method`` and every one of its terms.

    ``loss = sum_k weight_k * terms[k]``, with the terms and weights below (``alpha_l`` the weight
    of auxiliary head ``l``, from ``spec.alpha``). Terms are batch means; the keys depend on
    ``spec`` only, never on ``step``, so they are the same at every step under ``jit``.

    - ``baseline``: ``ce/0`` (weight 1) only.
    - ``ds`` (deep supervision, DKS eq. 3): ``ce/0`` (1) and ``ce/l`` (``alpha_l``) for every
      auxiliary head ``l``.
    - ``dsn`` (DSN Eq. 3): ``ce/0`` (1) and ``dsn`` (1) = ``dsn_companion_loss`` with weights
      ``alpha_l * dsn_alpha_scale(step, total_steps, dsn_zero_fraction, dsn_schedule)`` (DSN's
      zero-ing: alpha decays linearly, or drops at once, to 0 at ``dsn_zero_fraction`` of
      training), threshold ``gamma``, ``dsn_companion`` as the companion loss (without label
      smoothing) and, with ``dsn_norm="inside"``, ``classifier_sq_norms`` inside the hinge.
    - ``dks`` (DKS eq. 4): the ``ds`` terms plus ``synergy`` (1) = ``synergy_loss`` with
      ``spec.pairs``, ``beta``, ``temperature`` and ``divergence``.
    - ``dhm``: as ``dks``, with ``head_mask = mimicking_mask(fold_in(rng, epoch), num_heads,
      mimic_prob)``, ``epoch = step // steps_per_epoch``: the mask is constant within an epoch and
      redrawn each epoch (DHM supplement, section D). Pairs: DHM's mimicking losses run between
      the main branch and the side branches *and* between the side branches: the supplement
      samples branches "when calculating mimicking losses" without restricting them to pairs with
      the main head, and the authors' code (d-li14/DHM, the tie-breaker per papers/README) has
      every head mimic every other head (all ordered pairs). So ``dhm`` uses ``spec.pairs``, whose
      default ``"bidirectional"`` is exactly that, and ``mimic_prob = 1`` gives plain ``dks``.
      Main-to-branch-only pairs, if wanted, are the explicit pairs ``((0, 1), (1, 0), (0, 2),
      (2, 0), ...)``. The authors log KL (``divergence="kl"``): same gradients as the default.
    - ``kd``: ``ce/0`` (1); ``ce/l`` (``alpha_l``) for the auxiliary heads when any ``alpha > 0``;
      ``kd/h`` (``kd_weight``) = ``kd_loss(logits[h], teacher_logits, temperature)`` for each ``h``
      in ``kd_heads``.
    - ``byot`` (Be Your Own Teacher, Zhang et al., ICCV 2019, section 3, "training methods": its
      three loss sources and their sum over the classifiers): ``ce/0`` (1) for the deepest
      classifier, and for every shallow head ``h``: ``ce/h`` (``1 - byot_alpha``), the label
      term; ``distill/h`` (``byot_alpha``) = ``KL(sg(softmax(z_0 / T)) || softmax(z_h / T))``,
      the deepest classifier teaching (``T = temperature``, no ``T**2``; ``divergence="ce"``
      gives the cross-entropy form, same gradients); ``hint/h`` (``byot_lambda``) =
      ``byot_feature_loss``: ``||F_h - sg(F_0)||^2`` between head ``h``'s feature after its
      bottleneck (adaptation) layer and the deepest feature, from ``features``. The authors'
      public code's defaults are ``byot_alpha = 0.3``, ``byot_lambda = 0.03``, ``T = 3``
      (``configs/`` BYOT presets use them). ``alpha``, ``beta`` and ``pairs`` are not used.

    Args:
      logits: tuple of ``spec.num_heads`` arrays ``float[B, K]`` (heads order of the module
        docstring).
      labels: ``int[B]``.
      spec: an ``ObjectiveSpec`` (static under ``jax.jit``).
      step: int scalar, the global step (may be traced).
      rng: a PRNG key; used by ``dhm`` only (may be None otherwise). It must be the *same* key at
        every step of a run (e.g. derived from the seed once): the epoch is folded in here.
      teacher_logits: ``float[B, K]``, required for ``kd`` (ignored by the other methods).
      classifier_sq_norms: ``dsn`` with ``dsn_norm="inside"``: ``||w||^2`` of each auxiliary
        head's classifier (``num_heads - 1`` scalars).
      features: ``byot`` with ``byot_lambda > 0``: ``num_heads`` arrays ``float[B, D]``, the deepest
        feature first, then each shallow head's adapted feature (``model(x,
        return_features=True)`` of a model built with ``feature_adapters=True``).

    Returns:
      ``(loss, terms)``: the ``float32[]`` loss and a flat dict ``str -> float32[]`` of its terms.
    """
    fn = "objective"
    if not isinstance(spec, ObjectiveSpec):
        raise ValueError(f"{fn}: spec must be an ObjectiveSpec, got {type(spec).__name__}")
    heads = _check_heads(logits, fn)
    if len(heads) != spec.num_heads:
        raise ValueError(f"{fn}: got {len(heads)} heads, spec.num_heads is {spec.num_heads}")
    labels = _check_labels(labels, heads[0].shape, fn)
    method, num_heads = spec.method, spec.num_heads
    alphas = _aux_weight_vector(spec.alpha, num_heads, fn) if num_heads > 1 else None
    terms: dict[str, jax.Array] = {}
    weights: dict[str, Any] = {}

    def ce(h):
        return jnp.mean(cross_entropy(heads[h], labels, spec.label_smoothing))

    terms["ce/0"], weights["ce/0"] = ce(0), 1.0
    aux_ce = method in ("ds", "dks", "dhm") or (
        method == "kd" and num_heads > 1 and bool(np.any(np.asarray(spec.alpha) > 0))
    )
    if aux_ce and alphas is not None:  # alphas is None only with one head: no auxiliary CE
        for h in range(1, num_heads):
            terms[f"ce/{h}"], weights[f"ce/{h}"] = ce(h), alphas[h - 1]

    if method == "dsn":
        if spec.dsn_norm == "inside" and classifier_sq_norms is None:
            raise ValueError(f"{fn}: dsn with dsn_norm='inside' needs classifier_sq_norms (the "
                             "auxiliary classifiers' squared weight norms), or use "
                             "dsn_norm='weight_decay'")
        scale = dsn_alpha_scale(step, spec.total_steps, spec.dsn_zero_fraction, spec.dsn_schedule)
        terms["dsn"] = dsn_companion_loss(
            heads, labels, alphas * scale, spec.gamma, spec.dsn_companion,
            classifier_sq_norms if spec.dsn_norm == "inside" else None,
        )
        weights["dsn"] = 1.0
    elif method in ("dks", "dhm"):
        head_mask = None
        if method == "dhm":
            if rng is None:
                raise ValueError(f"{fn}: method 'dhm' needs rng (the run's fixed PRNG key)")
            epoch = jnp.asarray(step) // spec.steps_per_epoch
            head_mask = mimicking_mask(jax.random.fold_in(rng, epoch), num_heads, spec.mimic_prob)
        terms["synergy"] = synergy_loss(
            heads, spec.pairs, spec.beta, spec.temperature, spec.divergence, head_mask
        )
        weights["synergy"] = 1.0
    elif method == "byot":
        if spec.byot_lambda > 0 and features is None:
            raise ValueError(f"{fn}: byot needs features (deepest first, then each shallow head's "
                             "adapted feature), or byot_lambda=0")
        _check_temperature(spec.temperature, fn)
        teacher = jax.lax.stop_gradient(
            jax.nn.log_softmax(_float(heads[0]) / spec.temperature, axis=-1))
        hints = byot_feature_loss(features) if spec.byot_lambda > 0 and features is not None else None
        for h in range(1, num_heads):
            terms[f"ce/{h}"], weights[f"ce/{h}"] = ce(h), 1.0 - spec.byot_alpha
            student = jax.nn.log_softmax(_float(heads[h]) / spec.temperature, axis=-1)
            terms[f"distill/{h}"] = _soft_target_loss(teacher, student, spec.divergence)
            weights[f"distill/{h}"] = spec.byot_alpha
            if hints is not None:
                terms[f"hint/{h}"], weights[f"hint/{h}"] = hints[h - 1], spec.byot_lambda
    elif method == "kd":
        if teacher_logits is None:
            raise ValueError(f"{fn}: method 'kd' needs teacher_logits [B, K]")
        for h in spec.kd_heads:
            terms[f"kd/{h}"] = kd_loss(heads[h], teacher_logits, spec.temperature)
            weights[f"kd/{h}"] = spec.kd_weight

    loss = sum(weights[k] * terms[k] for k in terms)
    return loss, terms
