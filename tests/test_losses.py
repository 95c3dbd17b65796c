"""dks_jax.losses against NumPy hand computations, gradients, transformations and bad input."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dks_jax import losses

REPO = pathlib.Path(__file__).resolve().parents[1]
B, K = 4, 5
RTOL, ATOL = 1e-5, 1e-6


def make_logits(num_heads, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(scale * rng.normal(size=(B, K)), jnp.float32) for _ in range(num_heads)
    )


LABELS = jnp.array([0, 3, 1, 4], jnp.int32)


# ---------------------------------------------------------------------------------- NumPy references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce(z, y, eps=0.0):
    logp = np_log_softmax(z)
    target = (1 - eps) * np.eye(z.shape[-1])[np.asarray(y)] + eps / z.shape[-1]
    return -(target * logp).sum(-1)


def np_soft(teacher, student, temperature, divergence):
    lp = np_log_softmax(np.asarray(teacher) / temperature)
    lq = np_log_softmax(np.asarray(student) / temperature)
    p = np.exp(lp)
    per_example = -(p * lq).sum(-1) if divergence == "ce" else (p * (lp - lq)).sum(-1)
    return per_example.mean()


def np_synergy(zs, pairs, pair_weights, temperature=1.0, divergence="ce", mask=None):
    total = 0.0
    for (m, n), w in zip(pairs, pair_weights, strict=True):
        if mask is not None and not (mask[m] and mask[n]):
            continue
        total += w * np_soft(zs[m], zs[n], temperature, divergence)
    return temperature**2 * total


def np_squared_hinge(z, y):
    z = np.asarray(z, np.float64)
    z_y = z[np.arange(len(y)), np.asarray(y)][:, None]
    margins = np.maximum(0.0, 1.0 - (z_y - z)) ** 2
    margins[np.arange(len(y)), np.asarray(y)] = 0.0
    return margins.sum(-1)


# ----------------------------------------------------------------------------------- cross_entropy


def test_cross_entropy_hand_value():
    # Two equal logits: -log(1/2); label smoothing does not change a uniform prediction.
    z = jnp.zeros((1, 2))
    np.testing.assert_allclose(losses.cross_entropy(z, jnp.array([0])), [np.log(2)], rtol=RTOL)
    np.testing.assert_allclose(
        losses.cross_entropy(z, jnp.array([1]), label_smoothing=0.3), [np.log(2)], rtol=RTOL
    )


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_cross_entropy_matches_numpy(eps):
    z = make_logits(1)[0]
    got = losses.cross_entropy(z, LABELS, label_smoothing=eps)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, np_ce(z, LABELS, eps), rtol=RTOL, atol=ATOL)


def test_cross_entropy_gradient():
    z = make_logits(1)[0]
    g = jax.grad(lambda z: jnp.mean(losses.cross_entropy(z, LABELS)))(z)
    expected = (np_softmax(z) - np.eye(K)[np.asarray(LABELS)]) / B
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=ATOL)


# -------------------------------------------------------------------------------------- pair_set

PAIRS = {
    (2, "top_down"): ((0, 1),),
    (2, "bottom_up"): ((1, 0),),
    (2, "bidirectional"): ((0, 1), (1, 0)),
    (3, "top_down"): ((0, 1), (0, 2), (1, 2)),
    (3, "bottom_up"): ((1, 0), (2, 0), (2, 1)),
    (3, "bidirectional"): ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)),
    (4, "top_down"): ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)),
    (4, "bottom_up"): ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)),
    (4, "bidirectional"): (
        (0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3),
        (2, 0), (2, 1), (2, 3), (3, 0), (3, 1), (3, 2),
    ),
}  # fmt: skip


@pytest.mark.parametrize(("num_heads", "strategy"), sorted(PAIRS))
def test_pair_set(num_heads, strategy):
    assert losses.pair_set(num_heads, strategy) == PAIRS[(num_heads, strategy)]


# ---------------------------------------------------------------------------------- synergy_loss


def weight_forms(num_heads, pairs):
    """The three weight forms and the per-pair weights each one means."""
    rng = np.random.default_rng(1)
    per_pair = tuple(float(w) for w in rng.uniform(0.2, 2.0, len(pairs)))
    matrix = rng.uniform(0.2, 2.0, (num_heads, num_heads))
    return {
        "scalar": (0.7, [0.7] * len(pairs)),
        "per_pair": (per_pair, list(per_pair)),
        "matrix": (
            tuple(tuple(float(v) for v in row) for row in matrix),
            [matrix[m, n] for m, n in pairs],
        ),
    }


@pytest.mark.parametrize("num_heads", [2, 3, 4])
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
@pytest.mark.parametrize("form", ["scalar", "per_pair", "matrix"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_synergy_matches_numpy(num_heads, strategy, form, temperature):
    zs = make_logits(num_heads)
    pairs = PAIRS[(num_heads, strategy)]
    weights, pair_weights = weight_forms(num_heads, pairs)[form]
    for divergence in ("ce", "kl"):
        got = losses.synergy_loss(zs, strategy, weights, temperature, divergence)
        want = np_synergy(zs, pairs, pair_weights, temperature, divergence)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_synergy_explicit_pairs_and_defaults():
    zs = make_logits(3)
    pairs = [(2, 0), (1, 2)]
    np.testing.assert_allclose(
        losses.synergy_loss(zs, pairs, [0.5, 2.0], temperature=2.0),
        np_synergy(zs, pairs, [0.5, 2.0], 2.0),
        rtol=RTOL,
    )
    # Defaults: bidirectional, beta = 1, T = 1, "ce" -- the paper's DKS.
    np.testing.assert_allclose(
        losses.synergy_loss(zs), np_synergy(zs, PAIRS[(3, "bidirectional")], [1.0] * 6), rtol=RTOL
    )


def test_synergy_hand_value():
    # Teacher uniform over 2 classes, student (0, log 3) -> q = (1/4, 3/4):
    # H(p, q) = -(log(1/4) + log(3/4)) / 2, KL = H(p, q) - log 2.
    zs = (jnp.zeros((1, 2)), jnp.array([[0.0, np.log(3.0)]]))
    h = -(np.log(0.25) + np.log(0.75)) / 2
    np.testing.assert_allclose(losses.synergy_loss(zs, [(0, 1)]), h, rtol=RTOL)
    np.testing.assert_allclose(
        losses.synergy_loss(zs, [(0, 1)], divergence="kl"), h - np.log(2), rtol=1e-4
    )


@pytest.mark.parametrize(("m", "n"), [(0, 1), (1, 0), (2, 0), (1, 2)])
def test_one_pair_gradient(m, n):
    zs = make_logits(3)
    grads = jax.grad(lambda z: losses.synergy_loss(z, [(m, n)]))(zs)
    for h, g in enumerate(grads):
        if h != n:
            np.testing.assert_array_equal(g, np.zeros((B, K)))  # teacher and bystanders: exactly 0
    expected = (np_softmax(zs[n]) - np_softmax(zs[m])) / B
    np.testing.assert_allclose(grads[n], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_ce_and_kl_equal_gradients_different_values(temperature):
    zs = make_logits(3)

    def f(div):
        return lambda z: losses.synergy_loss(z, "bidirectional", 1.0, temperature, div)

    v_ce, g_ce = jax.value_and_grad(f("ce"))(zs)
    v_kl, g_kl = jax.value_and_grad(f("kl"))(zs)
    assert abs(float(v_ce) - float(v_kl)) > 0.1  # differ by the teachers' entropies
    for a, b in zip(g_ce, g_kl, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_when_heads_agree():
    z = make_logits(1)[0]
    assert abs(float(losses.synergy_loss((z, z, z), divergence="kl"))) < 1e-5


def test_head_mask_drops_pairs_touching_masked_heads():
    zs = make_logits(4)
    pairs = PAIRS[(4, "bidirectional")]
    mask = (True, False, True, True)
    got = losses.synergy_loss(zs, "bidirectional", head_mask=jnp.array(mask))
    np.testing.assert_allclose(got, np_synergy(zs, pairs, [1.0] * 12, mask=mask), rtol=RTOL)
    full = losses.synergy_loss(zs, "bidirectional")
    np.testing.assert_allclose(
        losses.synergy_loss(zs, "bidirectional", head_mask=jnp.ones(4, bool)), full, rtol=RTOL
    )
    # Masked head gets no gradient from the synergy term, as teacher or student.
    grads = jax.grad(
        lambda z: losses.synergy_loss(z, "bidirectional", head_mask=jnp.array(mask))
    )(zs)
    np.testing.assert_array_equal(grads[1], np.zeros((B, K)))


# ------------------------------------------------------------------------------- mimicking_mask


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_mimicking_mask_frequency(p):
    keys = jax.random.split(jax.random.key(0), 4000)
    masks = np.asarray(jax.vmap(lambda k: losses.mimicking_mask(k, 4, p))(keys))
    assert masks.shape == (4000, 4) and masks.dtype == bool
    assert masks[:, 0].all()  # the main head always takes part
    freq = masks[:, 1:].mean(0)  # 5 standard errors at n = 4000 is < 0.04
    np.testing.assert_allclose(freq, p, atol=0.04)
    # i.i.d.: the two branches are both in about p^2 of the draws.
    assert abs((masks[:, 1] & masks[:, 2]).mean() - p * p) < 0.04


def test_mimicking_mask_extremes_and_p1_is_dks():
    key = jax.random.key(3)
    assert np.asarray(losses.mimicking_mask(key, 3, 1.0)).tolist() == [True, True, True]
    assert np.asarray(losses.mimicking_mask(key, 3, 0.0)).tolist() == [True, False, False]
    assert np.asarray(losses.mimicking_mask(key, 1, 0.5)).tolist() == [True]
    zs = make_logits(3)
    np.testing.assert_allclose(
        losses.synergy_loss(zs, head_mask=losses.mimicking_mask(key, 3, 1.0)),
        losses.synergy_loss(zs),
        rtol=RTOL,
    )


# --------------------------------------------------------------------------- deep supervision, DSN


@pytest.mark.parametrize("aux_weights", [1.0, 0.3, (0.5, 2.0)])
def test_deep_supervision_matches_numpy(aux_weights):
    zs = make_logits(3)
    alphas = np.broadcast_to(np.asarray(aux_weights, np.float64), (2,))
    want = np_ce(zs[0], LABELS).mean() + sum(
        a * np_ce(z, LABELS).mean() for a, z in zip(alphas, zs[1:], strict=True)
    )
    got = losses.deep_supervision_loss(zs, LABELS, aux_weights)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_deep_supervision_single_head_is_cross_entropy():
    z = make_logits(1)
    np.testing.assert_allclose(
        losses.deep_supervision_loss(z, LABELS), np_ce(z[0], LABELS).mean(), rtol=RTOL
    )


def test_squared_hinge_hand_value():
    # z = (2, 0, 1.5), y = 0: margins 1 - 2 < 0 and 1 - 0.5 = 0.5 -> 0.25.
    zs = (jnp.zeros((1, 3)), jnp.array([[2.0, 0.0, 1.5]]))
    got = losses.dsn_companion_loss(zs, jnp.array([0]), 1.0, 0.0, "squared_hinge")
    np.testing.assert_allclose(got, 0.25, rtol=RTOL)


@pytest.mark.parametrize("companion", ["ce", "squared_hinge"])
@pytest.mark.parametrize("gamma", [0.0, 1.5])
@pytest.mark.parametrize("alphas", [0.5, (0.3, 1.0, 2.0)])
def test_dsn_companion_matches_numpy(companion, gamma, alphas):
    zs = make_logits(4)
    alpha_vec = np.broadcast_to(np.asarray(alphas, np.float64), (3,))
    per_example = (lambda z: np_ce(z, LABELS)) if companion == "ce" else (
        lambda z: np_squared_hinge(z, LABELS)
    )
    want = sum(
        a * max(0.0, per_example(z).mean() - gamma) for a, z in zip(alpha_vec, zs[1:], strict=True)
    )
    got = losses.dsn_companion_loss(zs, LABELS, alphas, gamma, companion)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_dsn_threshold_switches_companion_off():
    zs = make_logits(3)
    gamma = 1e3  # above every head's loss: no value, no gradient
    loss, grads = jax.value_and_grad(lambda z: losses.dsn_companion_loss(z, LABELS, 1.0, gamma))(
        zs
    )
    assert float(loss) == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros((B, K)))
    # Main head is never part of the companion term.
    g0 = jax.grad(lambda z: losses.dsn_companion_loss(z, LABELS, 1.0, 0.0))(zs)[0]
    np.testing.assert_array_equal(g0, np.zeros((B, K)))


def test_dsn_norm_inside_the_hinge_by_hand():
    """DSN Eq. 3: alpha [||w||^2 + l - gamma]_+: the norm counts against the threshold, and the
    hinge switches norm and loss off together."""
    zs = (jnp.zeros((1, 3)), jnp.array([[2.0, 0.0, 1.5]]))  # squared hinge 0.25 (see above)
    hinge = lambda w2, gamma: losses.dsn_companion_loss(
        zs, jnp.array([0]), 1.0, gamma, "squared_hinge", classifier_sq_norms=(w2,))
    np.testing.assert_allclose(hinge(jnp.float32(0.5), 0.0), 0.75, rtol=RTOL)
    np.testing.assert_allclose(hinge(jnp.float32(0.5), 0.6), 0.15, rtol=RTOL)  # 0.75 - 0.6
    assert float(hinge(jnp.float32(0.5), 0.8)) == 0.0  # below the threshold with the norm
    # d/d||w||^2 is alpha while the hinge is on, 0 once off: the norm is inside, not beside it.
    assert float(jax.grad(hinge)(jnp.float32(0.5), 0.6)) == 1.0
    assert float(jax.grad(hinge)(jnp.float32(0.5), 0.8)) == 0.0
    spec = losses.ObjectiveSpec("dsn", NUM_HEADS, dsn_schedule="step", dsn_zero_fraction=0.5,
                                total_steps=100)
    with pytest.raises(ValueError, match="classifier_sq_norms"):
        losses.objective(make_logits(NUM_HEADS), LABELS, spec=spec, step=0, rng=None)
    # The "step" zero-ing: full weight until 50 of 100 steps, then none.
    zs3 = make_logits(NUM_HEADS)
    on = losses.objective(zs3, LABELS, spec=spec, step=49, rng=None, classifier_sq_norms=NORMS)
    off = losses.objective(zs3, LABELS, spec=spec, step=50, rng=None, classifier_sq_norms=NORMS)
    ce = [np_ce(z, LABELS).mean() for z in zs3]
    want = sum(float(w) + c for w, c in zip(NORMS, ce[1:], strict=True))
    np.testing.assert_allclose(on[1]["dsn"], want, rtol=RTOL)
    assert float(off[1]["dsn"]) == 0.0


def test_byot_gradients_reach_the_students_only():
    spec = SPECS["byot"]
    zs = make_logits(NUM_HEADS)

    def loss(zs, feats):
        return losses.objective(zs, LABELS, spec=spec, step=0, rng=None, features=feats)[0]

    gz, gf = jax.grad(loss, argnums=(0, 1))(zs, FEATS)
    # The deepest classifier's logits get only its own CE gradient (softmax - onehot), its
    # feature none: it is the teacher of the distillation and hint terms.
    np.testing.assert_allclose(gz[0], (np_softmax(zs[0]) - np.eye(K)[np.asarray(LABELS)]) / B,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gf[0], np.zeros_like(FEATS[0]))
    np.testing.assert_allclose(gf[1], 0.03 * 2 * (np.asarray(FEATS[1]) - np.asarray(FEATS[0])) / B,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs features"):
        losses.objective(zs, LABELS, spec=spec, step=0, rng=None)


def test_dsn_alpha_scale():
    steps = jnp.array([0, 25, 40, 50, 100])
    linear = jax.jit(jax.vmap(lambda s: losses.dsn_alpha_scale(s, 100, 0.5)))(steps)
    np.testing.assert_allclose(linear, [1.0, 0.5, 0.2, 0.0, 0.0], atol=1e-6)
    step_form = jax.vmap(lambda s: losses.dsn_alpha_scale(s, 100, 0.5, "step"))(steps)
    np.testing.assert_allclose(step_form, [1.0, 1.0, 1.0, 0.0, 0.0])
    # zero_fraction = 1: DSN's alpha * (1 - t / N).
    np.testing.assert_allclose(losses.dsn_alpha_scale(30, 120), 0.75, rtol=RTOL)


# ----------------------------------------------------------------------------------------- KD


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_numpy_and_gradient(temperature):
    student, teacher = make_logits(2)
    got = losses.kd_loss(student, teacher, temperature)
    want = temperature**2 * np_soft(teacher, student, temperature, "kl")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    g_s, g_t = jax.grad(lambda s, t: losses.kd_loss(s, t, temperature), argnums=(0, 1))(
        student, teacher
    )
    np.testing.assert_array_equal(g_t, np.zeros((B, K)))
    expected = temperature * (
        np_softmax(np.asarray(student) / temperature) - np_softmax(np.asarray(teacher) / temperature)
    ) / B
    np.testing.assert_allclose(g_s, expected, rtol=1e-4, atol=1e-7)
    assert abs(float(losses.kd_loss(teacher, teacher, temperature))) < 1e-5


# ------------------------------------------------------------------------- jit / vmap / grad


LOSS_FNS = {
    "cross_entropy": lambda zs: jnp.mean(losses.cross_entropy(zs[0], LABELS, 0.1)),
    "synergy_loss": lambda zs: losses.synergy_loss(zs, "bidirectional", 0.5, 2.0, "kl"),
    "synergy_loss_masked": lambda zs: losses.synergy_loss(
        zs, "top_down", head_mask=jnp.array([True, False, True])
    ),
    "deep_supervision_loss": lambda zs: losses.deep_supervision_loss(zs, LABELS, (0.5, 1.0)),
    "dsn_companion_loss": lambda zs: losses.dsn_companion_loss(
        zs, LABELS, (0.5, 1.0), 0.1, "squared_hinge"
    ),
    "kd_loss": lambda zs: losses.kd_loss(zs[1], zs[0], 3.0),
}


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_jit_vmap_grad(name):
    fn = LOSS_FNS[name]
    zs = make_logits(3)
    eager = fn(zs)
    assert eager.shape == ()
    np.testing.assert_allclose(jax.jit(fn)(zs), eager, rtol=RTOL, atol=ATOL)
    grads = jax.grad(fn)(zs)
    assert all(g.shape == (B, K) and np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).sum() > 0 for g in grads)
    jit_grads = jax.jit(jax.grad(fn))(zs)
    for a, b in zip(grads, jit_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # vmap over a leading replica axis: same as calling once per replica.
    other = make_logits(3, seed=7)
    stacked = tuple(jnp.stack([a, b]) for a, b in zip(zs, other, strict=True))
    batched = jax.vmap(fn)(stacked)
    np.testing.assert_allclose(batched, [eager, fn(other)], rtol=RTOL, atol=ATOL)


def test_vmap_over_examples():
    # Under vmap over the batch each call sees one example [K]: the mean of those is the batch loss.
    zs = make_logits(3)
    per_example = jax.vmap(lambda z0, z1, z2: losses.synergy_loss((z0, z1, z2)))(*zs)
    assert per_example.shape == (B,)
    np.testing.assert_allclose(per_example.mean(), losses.synergy_loss(zs), rtol=RTOL)
    ce = jax.vmap(losses.cross_entropy)(zs[0], LABELS)
    np.testing.assert_allclose(ce, losses.cross_entropy(zs[0], LABELS), rtol=RTOL)


def test_mimicking_mask_under_jit():
    mask = jax.jit(losses.mimicking_mask, static_argnums=1)(jax.random.key(0), 3, 0.5)
    assert mask.shape == (3,) and bool(mask[0])


# ------------------------------------------------------------------------------------ bad input

Z3 = make_logits(3)
BAD_INPUTS = {
    "single head": (lambda: losses.synergy_loss(Z3[:1]), "at least 2 heads"),
    "bare array": (lambda: losses.synergy_loss(Z3[0]), "tuple of per-head"),
    "different shapes": (
        lambda: losses.synergy_loss((Z3[0], Z3[1][:, :3])),
        "different shapes",
    ),
    "unknown strategy": (lambda: losses.synergy_loss(Z3, "sideways"), "unknown strategy"),
    "pair_set strategy": (lambda: losses.pair_set(3, "diagonal"), "unknown strategy"),
    "pair_set one head": (lambda: losses.pair_set(1, "top_down"), "at least two heads"),
    "matrix size": (lambda: losses.synergy_loss(Z3, weights=np.ones((2, 2))), "weight matrix"),
    "per-pair length": (lambda: losses.synergy_loss(Z3, "top_down", (1.0, 2.0)), "per-pair"),
    "pair out of range": (lambda: losses.synergy_loss(Z3, [(0, 3)]), "out of range"),
    "negative pair index": (lambda: losses.synergy_loss(Z3, [(-1, 0)]), "out of range"),
    "self pair": (lambda: losses.synergy_loss(Z3, [(1, 1)]), "itself"),
    "malformed pair": (lambda: losses.synergy_loss(Z3, [(0, 1, 2)]), "two head indices"),
    "empty pairs": (lambda: losses.synergy_loss(Z3, []), "non-empty"),
    "divergence": (lambda: losses.synergy_loss(Z3, divergence="js"), "unknown divergence"),
    "temperature": (lambda: losses.synergy_loss(Z3, temperature=0.0), "temperature"),
    "head_mask size": (lambda: losses.synergy_loss(Z3, head_mask=jnp.ones(2, bool)), "head_mask"),
    "float labels": (lambda: losses.cross_entropy(Z3[0], jnp.zeros(B)), "integer"),
    "label shape": (lambda: losses.cross_entropy(Z3[0], jnp.zeros(B + 1, jnp.int32)), "match"),
    "label smoothing": (lambda: losses.cross_entropy(Z3[0], LABELS, 1.5), "label_smoothing"),
    "ds aux weights": (
        lambda: losses.deep_supervision_loss(Z3, LABELS, (1.0, 2.0, 3.0)),
        "auxiliary weights",
    ),
    "ds shapes": (
        lambda: losses.deep_supervision_loss((Z3[0], Z3[1][:2]), LABELS),
        "different shapes",
    ),
    "dsn single head": (
        lambda: losses.dsn_companion_loss(Z3[:1], LABELS, 1.0, 0.0),
        "at least 2 heads",
    ),
    "dsn companion": (
        lambda: losses.dsn_companion_loss(Z3, LABELS, 1.0, 0.0, "hinge"),
        "unknown companion",
    ),
    "dsn gamma": (lambda: losses.dsn_companion_loss(Z3, LABELS, 1.0, -1.0), "gamma"),
    "dsn schedule form": (lambda: losses.dsn_alpha_scale(0, 10, 0.5, "cosine"), "unknown form"),
    "mask p": (lambda: losses.mimicking_mask(jax.random.key(0), 3, 1.5), "p must be"),
    "kd shapes": (lambda: losses.kd_loss(Z3[0], Z3[1][:, :3], 1.0), "differ"),
    "kd temperature": (lambda: losses.kd_loss(Z3[0], Z3[1], -1.0), "temperature"),
    "spec method": (lambda: losses.ObjectiveSpec("dkd", 3), "unknown method"),
    "spec heads": (lambda: losses.ObjectiveSpec("dks", 1), "needs auxiliary heads"),
    "spec alpha": (lambda: losses.ObjectiveSpec("ds", 3, alpha=(1.0,)), "auxiliary weights"),
    "spec beta": (lambda: losses.ObjectiveSpec("dks", 3, beta=((1.0, 1.0),)), "weight matrix"),
    "spec pairs": (lambda: losses.ObjectiveSpec("dks", 3, pairs="all"), "unknown strategy"),
    "spec kd_heads": (lambda: losses.ObjectiveSpec("kd", 2, kd_heads=(2,)), "kd_heads"),
    "objective heads": (
        lambda: losses.objective(
            Z3[:2], LABELS, spec=losses.ObjectiveSpec("ds", 3), step=0, rng=None
        ),
        "num_heads",
    ),
    "objective teacher": (
        lambda: losses.objective(Z3, LABELS, spec=losses.ObjectiveSpec("kd", 3), step=0, rng=None),
        "teacher_logits",
    ),
    "objective dhm rng": (
        lambda: losses.objective(Z3, LABELS, spec=losses.ObjectiveSpec("dhm", 3), step=0, rng=None),
        "rng",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error(case):
    fn, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        fn()


# ------------------------------------------------------------------------------------- objective

NUM_HEADS = 3
SPECS = {
    "baseline": losses.ObjectiveSpec("baseline", NUM_HEADS, label_smoothing=0.1),
    "ds": losses.ObjectiveSpec("ds", NUM_HEADS, alpha=(0.5, 0.25)),
    "dsn": losses.ObjectiveSpec(
        "dsn", NUM_HEADS, alpha=0.5, gamma=0.2, dsn_zero_fraction=0.5, total_steps=100
    ),  # DSN Eq. 3: the classifiers' squared norms (NORMS below) inside the hinge
    "dks": losses.ObjectiveSpec("dks", NUM_HEADS, beta=0.5, pairs="top_down", temperature=2.0),
    "dhm": losses.ObjectiveSpec("dhm", NUM_HEADS, mimic_prob=0.5, steps_per_epoch=5),
    "kd": losses.ObjectiveSpec("kd", NUM_HEADS, kd_heads=(0, 2), kd_weight=0.7, temperature=4.0),
    "byot": losses.ObjectiveSpec("byot", NUM_HEADS, byot_alpha=0.3, byot_lambda=0.03,
                                 temperature=3.0, divergence="kl"),
}
NORMS = (jnp.float32(0.15), jnp.float32(0.6))  # ||w||^2 of the two auxiliary classifiers
FEATS = tuple(jnp.asarray(np.random.default_rng(9 + i).normal(size=(B, 6)), jnp.float32)
              for i in range(NUM_HEADS))  # BYOT: deepest feature, then the adapted ones
EXPECTED_KEYS = {
    "baseline": {"ce/0"},
    "ds": {"ce/0", "ce/1", "ce/2"},
    "dsn": {"ce/0", "dsn"},
    "dks": {"ce/0", "ce/1", "ce/2", "synergy"},
    "dhm": {"ce/0", "ce/1", "ce/2", "synergy"},
    "kd": {"ce/0", "ce/1", "ce/2", "kd/0", "kd/2"},
    "byot": {"ce/0", "ce/1", "ce/2", "distill/1", "distill/2", "hint/1", "hint/2"},
}
objective_jit = jax.jit(losses.objective, static_argnames="spec")


def hand_terms(method, zs, teacher, step):
    """Terms and weights computed with NumPy, from the specs above."""
    ce = [np_ce(z, LABELS).mean() for z in zs]
    if method == "baseline":
        return {"ce/0": (np_ce(zs[0], LABELS, 0.1).mean(), 1.0)}
    if method == "dsn":
        scale = max(0.0, 1.0 - step / 50.0)
        dsn = sum(0.5 * scale * max(0.0, float(w) + c - 0.2)
                  for w, c in zip(NORMS, ce[1:], strict=True))
        return {"ce/0": (ce[0], 1.0), "dsn": (dsn, 1.0)}
    if method == "byot":  # (1 - a) CE, a KL(teacher || student) at T = 3, lambda ||F_h - F_0||^2
        feats = [np.asarray(f, np.float64) for f in FEATS]
        terms = {"ce/0": (ce[0], 1.0)}
        for h in (1, 2):
            terms[f"ce/{h}"] = (ce[h], 0.7)
            terms[f"distill/{h}"] = (np_soft(zs[0], zs[h], 3.0, "kl"), 0.3)
            terms[f"hint/{h}"] = (((feats[h] - feats[0]) ** 2).sum(-1).mean(), 0.03)
        return terms
    alphas = {"ds": (0.5, 0.25)}.get(method, (1.0, 1.0))
    terms = {"ce/0": (ce[0], 1.0), "ce/1": (ce[1], alphas[0]), "ce/2": (ce[2], alphas[1])}
    if method == "dks":
        terms["synergy"] = (np_synergy(zs, PAIRS[(3, "top_down")], [0.5] * 3, 2.0), 1.0)
    if method == "kd":
        for h in (0, 2):
            terms[f"kd/{h}"] = (16.0 * np_soft(teacher, zs[h], 4.0, "kl"), 0.7)
    return terms


@pytest.mark.parametrize("method", losses.METHODS)
def test_objective_every_method(method):
    spec = SPECS[method]
    zs = make_logits(NUM_HEADS)
    teacher = make_logits(1, seed=5)[0]
    rng = jax.random.key(42)
    for step in (0, 30):
        loss, terms = objective_jit(
            zs, LABELS, spec=spec, step=jnp.int32(step), rng=rng, teacher_logits=teacher,
            classifier_sq_norms=NORMS, features=FEATS,
        )
        assert set(terms) == EXPECTED_KEYS[method]
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in terms.values())
        expected = hand_terms(method, zs, teacher, step)
        if method == "dhm":  # mask drawn from rng: check the term against synergy_loss below
            expected["synergy"] = (float(terms["synergy"]), 1.0)
        for key, (value, _) in expected.items():
            np.testing.assert_allclose(terms[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        weighted = sum(w * float(terms[k]) for k, (_, w) in expected.items())
        np.testing.assert_allclose(loss, weighted, rtol=1e-5, err_msg=method)


def test_objective_traces_once_across_steps():
    traces = []

    def step_loss(zs, step, spec):
        traces.append(step)
        return losses.objective(zs, LABELS, spec=spec, step=step, rng=jax.random.key(0),
                                classifier_sq_norms=NORMS)

    jitted = jax.jit(step_loss, static_argnames="spec")
    zs = make_logits(NUM_HEADS)
    keys = set()
    for step in range(4):
        for method in ("dhm", "dsn"):
            keys.add((method, tuple(sorted(jitted(zs, step, SPECS[method])[1]))))
    assert len(traces) == 2  # one trace per spec, none per step
    assert len(keys) == 2


def test_objective_dsn_zeroing():
    spec = SPECS["dsn"]  # alpha reaches 0 at step 50 of 100
    zs = make_logits(NUM_HEADS)
    for step in (50, 99):
        loss, terms = objective_jit(zs, LABELS, spec=spec, step=step, rng=None,
                                    classifier_sq_norms=NORMS)
        assert float(terms["dsn"]) == 0.0
        np.testing.assert_allclose(loss, terms["ce/0"], rtol=RTOL)


def test_objective_dhm_mask_fixed_within_epoch_and_p1_is_dks():
    zs = make_logits(4)
    spec = losses.ObjectiveSpec("dhm", 4, mimic_prob=0.5, steps_per_epoch=3)
    rng = jax.random.key(0)
    synergy = [
        float(objective_jit(zs, LABELS, spec=spec, step=s, rng=rng)[1]["synergy"])
        for s in range(30)
    ]
    for epoch in range(10):
        assert synergy[3 * epoch] == synergy[3 * epoch + 1] == synergy[3 * epoch + 2]
    assert len(set(synergy)) > 1  # redrawn across epochs
    # Each value is the synergy loss under that epoch's mask.
    mask = losses.mimicking_mask(jax.random.fold_in(rng, 4), 4, 0.5)
    np.testing.assert_allclose(
        synergy[12], losses.synergy_loss(zs, head_mask=mask), rtol=RTOL, atol=ATOL
    )
    # p = 1: every branch in every epoch = plain DKS.
    dhm1 = losses.ObjectiveSpec("dhm", 4, mimic_prob=1.0, steps_per_epoch=3)
    dks = losses.ObjectiveSpec("dks", 4)
    for step in (0, 7):
        a = objective_jit(zs, LABELS, spec=dhm1, step=step, rng=rng)
        b = objective_jit(zs, LABELS, spec=dks, step=step, rng=rng)
        np.testing.assert_allclose(a[0], b[0], rtol=RTOL)


def test_objective_kd_without_aux_ce_and_single_head():
    zs = make_logits(3)
    teacher = make_logits(1, seed=5)[0]
    spec = losses.ObjectiveSpec("kd", 3, alpha=0.0)
    _, terms = losses.objective(zs, LABELS, spec=spec, step=0, rng=None, teacher_logits=teacher)
    assert set(terms) == {"ce/0", "kd/0"}
    spec1 = losses.ObjectiveSpec("kd", 1)
    loss, terms = losses.objective(
        zs[:1], LABELS, spec=spec1, step=0, rng=None, teacher_logits=teacher
    )
    assert set(terms) == {"ce/0", "kd/0"}
    np.testing.assert_allclose(loss, terms["ce/0"] + terms["kd/0"], rtol=RTOL)


def test_objective_grad_and_spec_hashable():
    spec = losses.ObjectiveSpec("dks", 3, beta=[[0, 1, 1], [1, 0, 1], [1, 1, 0]], alpha=[1, 1])
    assert spec.beta == ((0, 1, 1), (1, 0, 1), (1, 1, 0)) and spec.alpha == (1, 1)
    assert hash(spec) == hash(losses.ObjectiveSpec("dks", 3, beta=spec.beta, alpha=(1, 1)))
    zs = make_logits(3)
    grads = jax.jit(
        jax.grad(lambda z, s: losses.objective(z, LABELS, spec=spec, step=s, rng=None)[0])
    )(zs, 3)
    assert all(np.isfinite(g).all() for g in grads)
    # The DS part's gradient plus the synergy part's gradient.
    ds = jax.grad(lambda z: losses.deep_supervision_loss(z, LABELS))(zs)
    syn = jax.grad(lambda z: losses.synergy_loss(z, weights=spec.beta))(zs)
    for g, a, b in zip(grads, ds, syn, strict=True):
        np.testing.assert_allclose(g, a + b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------- the example


def test_notebook_example_runs():
    script = REPO / "examples" / "notebook_synergy_grad.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one plain CPU device, as in a notebook
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    loss = float(re.search(r"synergy loss: ([0-9.]+)", text).group(1))
    assert loss > 0
    for h in range(3):
        assert f"d loss / d logits[{h}]" in text
    assert "each gradient row sums to 0: True" in text
    assert "one pair (0 -> 1) matches (softmax(z1) - softmax(z0)) / B: True" in text
