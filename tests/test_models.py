"""dks_jax.models: parameter counts, MACs, branch shapes, heads order, export, BatchNorm, jit.

Big models are only built abstractly (``nnx.eval_shape``) and traced (``jax.eval_shape``); a few
small CIFAR models are compiled and run at batch 2-4. The full compile-and-run sweep over every
CIFAR-sized model is marked slow.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dks_jax import models
from dks_jax.models import cifar_resnet, layers, summary

F32, BF16 = jnp.float32, jnp.bfloat16
IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HUGE = ("cifar_resnet1202", "wrn28_10")
SMALL_CIFAR = tuple(n for n in models.names() if n not in IMAGENET + HUGE)


@functools.cache
def abstract(name, num_classes=10, aux="paper", branches=None, dtype=F32, **overrides):
    """An abstract model (ShapeDtypeStruct leaves): nothing allocated, nothing compiled."""
    return nnx.eval_shape(
        lambda: models.create(
            name, num_classes, aux=aux, branches=branches, dtype=dtype, rngs=nnx.Rngs(0),
            **overrides,
        )
    )


def n_params(model) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def image_size(name):
    return models.spec(name).image_size


def trace_forward(model, batch, *, size, train=False, rngs_seed=None):
    """Logits, main and branch feature maps of ``model`` traced under ``jax.jit`` (shapes only)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x, key):
        m = nnx.merge(graphdef, state)
        rngs = nnx.Rngs(dropout=key) if rngs_seed is not None else None
        logits = m(x, train=train, rngs=rngs)
        main, taps = m.features(x)
        feats = [b.features(taps[t]) for t, b in zip(m.taps, m.branches, strict=True)]
        return logits, main, feats

    x = jax.ShapeDtypeStruct((batch, size, size, 3), F32)
    return jax.eval_shape(f, state, x, jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Parameter counts and multiply-adds.


@pytest.mark.parametrize(
    "name,classes,expected",
    [
        ("resnet18", 1000, 11_689_512),
        ("resnet34", 1000, 21_797_672),
        ("resnet50", 1000, 25_557_032),
        ("resnet101", 1000, 44_549_160),
        ("resnet152", 1000, 60_192_808),
        ("cifar_resnet32", 10, 464_154),
        ("wrn28_10", 10, 36_479_194),
        # 16-channel stem for the plain DenseNets, 2k = 24 for BC (Huang et al. 2017).
        ("densenet40_k12", 10, 1_019_722),
        ("densenet100_k12", 10, 6_979_642),
        ("densenet_bc100_k12", 10, 769_162),
    ],
)
def test_param_counts_plain_backbones(name, classes, expected):
    assert n_params(abstract(name, classes, aux="none")) == expected


@pytest.mark.parametrize(
    "name,classes,expected",
    [("resnet18", 1000, 53_483_512), ("cifar_resnet32", 100, 2_147_644),
     ("wrn28_10", 100, 164_146_364)],
)
def test_param_counts_with_paper_branches(name, classes, expected):
    assert n_params(abstract(name, classes, aux="paper")) == expected


def test_complexity_resnet18_macs_and_split():
    c = models.complexity("resnet18", 1000, image_size=224)
    # Conv + fc multiply-adds, counted as the papers do: ResNet-18 1.81 G, with branches 3.92 G.
    assert c["main"] == {"params": 11_689_512, "macs": 1_814_073_344}
    assert c["total"]["macs"] == 3_922_198_528
    assert [b["name"] for b in c["branches"]] == ["C2", "C3"]
    assert c["total"]["params"] == c["main"]["params"] + sum(b["params"] for b in c["branches"])
    assert c["total"]["params"] == 53_483_512
    # ResNet-50: torchvision documents 4.09 GFLOPS (multiply-adds).
    assert models.complexity("resnet50", 1000, aux="none")["main"]["macs"] == pytest.approx(
        4.09e9, rel=2e-3
    )


def test_summary_tables_are_computed():
    backbones = summary.backbone_table(("resnet18",))
    assert "11,689,512" in backbones
    branches = summary.branch_table(("cifar_resnet32",), ablations=True)
    assert "2,147,644" in branches
    for aux in ("paper", "simple", "ap_2fc", "ap_conv_2fc", "narrow", "shallow"):
        assert f"| cifar_resnet32 | {aux} |" in branches


# ---------------------------------------------------------------------------------------------
# Heads: number, order, branch selection, spatial sizes.


# The deepest CIFAR nets take 5-20 s each to trace on 2 cores: `make test-all`.
HEAVY = ("cifar_resnet1202", "densenet100_k12", "densenet_bc100_k12")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in models.names()])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_every_model_traces_under_jit(name, dtype):
    """Forward under jax.jit for every registry name in fp32 and bf16 (traced, not compiled), and
    every branch ends on the main path's spatial size (8x8 from 32x32, 7x7 from 224x224)."""
    everything = "C1C2C3C4" if name == "resnet18" else None
    model = abstract(name, 10, branches=everything, dtype=dtype)
    size = image_size(name)
    logits, main, feats = trace_forward(model, 2, train=True, size=size)
    assert len(logits) == model.num_heads == len(models.spec(name).aux["paper"]) + 1
    assert all(z.shape == (2, 10) and z.dtype == F32 for z in logits)
    assert main.dtype == dtype
    final = 7 if size == 224 else 8
    assert main.shape[1:3] == (final, final)
    for f in feats:
        assert f.shape[1:3] == main.shape[1:3]
    assert all(p.dtype == F32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet8", "densenet40_k12", "mobilenet_cifar",
                                  "wrn16_8", pytest.param("densenet_bc100_k12", marks=pytest.mark.slow)])
def test_gradients_reach_every_parameter(name):
    """jax.grad traces through every family (max pool, concatenation, dropout, zero padding)."""
    model = abstract(name, 10, **({"dropout": 0.3} if name == "wrn16_8" else {}))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    size = image_size(name)

    def loss(params, rest, x, key):
        m = nnx.merge(graphdef, params, rest)
        return sum(jnp.mean(z) for z in m(x, train=True, rngs=nnx.Rngs(dropout=key)))

    x = jax.ShapeDtypeStruct((2, size, size, 3), F32)
    # argnums (0, 1): the BatchNorm statistics must be traced at grad's level to be updated there.
    grads, _ = jax.eval_shape(jax.grad(loss, argnums=(0, 1)), params, rest, x, jax.random.key(0))
    assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("aux", ["simple", "ap_2fc", "ap_conv_2fc", "narrow", "shallow"])
def test_resnet32_ablation_designs(aux):
    model = abstract("cifar_resnet32", 100, aux=aux)
    assert model.head_names == ("C1", "C2", "C3")
    logits, main, feats = trace_forward(model, 2, size=32)
    assert [z.shape for z in logits] == [(2, 100)] * 3
    if aux in ("narrow", "shallow"):  # block designs: 8x8 at the end, Table 6 widths
        assert [f.shape[1:] for f in feats] == {
            "narrow": [(8, 8, 64), (8, 8, 32)], "shallow": [(8, 8, 128), (8, 8, 64)]
        }[aux]
    else:  # pooling designs (4x4 grids) work on the fork's own feature map
        assert [f.shape[1:] for f in feats] == [(16, 16, 32), (32, 32, 16)]


def test_resnet18_simple_branches_pool_to_4x4():
    model = abstract("resnet18", 1000, aux="simple")
    logits, _, _ = trace_forward(model, 1, size=224)
    assert len(logits) == 3
    # C2: 4x4x256 -> fc, C3: 4x4x128 -> fc (DKS supplement Fig. 6).
    assert model.branches[0].fc.kernel.shape == (4 * 4 * 256, 1000)
    assert model.branches[1].fc.kernel.shape == (4 * 4 * 128, 1000)
    with pytest.raises(ValueError, match="4x4"):
        trace_forward(model, 1, size=160)


@pytest.mark.parametrize(
    "branches,names",
    [
        (None, ("C1", "C2", "C3")),
        ("", ("C1", "C2", "C3")),
        ("C1", ("C1",)),
        ("C1C2", ("C1", "C2")),
        ("C1C3", ("C1", "C3")),
        ("C1C4", ("C1", "C4")),
        ("C1C2C3", ("C1", "C2", "C3")),
        ("C1C2C3C4", ("C1", "C2", "C3", "C4")),
        (("C4", "C2"), ("C1", "C2", "C4")),
    ],
)
def test_resnet18_branch_selection_and_order(branches, names):
    model = abstract("resnet18", 1000, branches=branches)
    assert model.head_names == names
    assert model.num_heads == len(names)
    # Deepest first: fork positions never move deeper along the heads.
    assert list(model.taps) == sorted(model.taps, reverse=True)


def test_heads_per_aux_and_defaults():
    assert abstract("cifar_resnet32", aux="none").head_names == ("C1",)
    assert abstract("resnet18", aux="none").num_heads == 1
    assert abstract("cifar_resnet1202").head_names == ("C1", "C2", "C3", "C4")
    assert abstract("wrn16_8").head_names == ("C1", "C2", "C3")
    assert models.aux_designs("cifar_resnet32") == (
        "none", "paper", "simple", "ap_2fc", "ap_conv_2fc", "narrow", "shallow"
    )
    assert models.aux_designs("resnet18") == ("none", "paper", "simple")
    assert models.aux_designs("cifar_resnet1202") == ("none", "paper", "dhm")
    assert models.aux_designs("cifar_resnet8") == ("none", "paper", "simple", "narrow")
    narrow = abstract("cifar_resnet8", aux="narrow")  # the demo's branches: half the paper's widths
    assert narrow.head_names == ("C1", "C2", "C3")
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(narrow) == 150_446 < count(abstract("cifar_resnet8", aux="paper")) == 331_566


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("resnet19", 10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no aux='narrow'"):
        models.create("resnet18", 10, aux="narrow", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown"):
        models.create("cifar_resnet32", 10, branches="C1C4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="aux='none'"):
        models.create("cifar_resnet32", 10, aux="none", branches="C2", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="dropout"):
        models.create("resnet18", 10, dropout=0.3, rngs=nnx.Rngs(0))


def test_dropout_needs_call_time_rngs_and_model_stores_none():
    model = abstract("wrn28_4", 10, dropout=0.3)
    _, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    assert jax.tree.leaves(rest) == []  # no RNG state (or anything else) in the model
    assert trace_forward(model, 2, train=False, size=32)[0][0].shape == (2, 10)
    assert trace_forward(model, 2, train=True, rngs_seed=0, size=32)[0][0].shape == (2, 10)
    with pytest.raises(ValueError, match="rngs"):
        trace_forward(model, 2, train=True, size=32)


def test_dropout_function():
    x = jnp.ones((64, 64))
    y = layers.dropout(x, 0.25, train=True, rngs=nnx.Rngs(dropout=0))
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.03
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert layers.dropout(x, 0.25, train=False, rngs=None) is x


# ---------------------------------------------------------------------------------------------
# Initialisation.


def test_initialisation_follows_torchvision():
    keys = layers.KeySeq(jax.random.key(0))
    conv = layers.Conv(64, 256, 3, rngs=keys)
    assert float(jnp.std(conv.kernel[...])) == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
    fc = layers.Linear(400, 10, rngs=keys)
    bound = 1 / math.sqrt(400)
    assert float(jnp.max(jnp.abs(fc.kernel[...]))) <= bound
    assert float(jnp.max(jnp.abs(fc.bias[...]))) <= bound
    bn = layers.BatchNorm(8)
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5  # PyTorch momentum 0.1, eps 1e-5
    block = cifar_resnet.BasicBlock(
        16, 16, 1, shortcut="subsample", zero_init=True, cfg=layers.LayerConfig(), rngs=keys
    )
    assert not np.any(np.asarray(block.bn2.scale[...]))
    assert np.all(np.asarray(block.bn1.scale[...]) == 1)


def test_same_seed_same_main_path_whatever_the_branches():
    """Branches are built after the main path, so aux does not change the main initialisation."""
    kw = dict(rngs=nnx.Rngs(3))
    with_branches = models.export_state(models.create("cifar_resnet32", 10, **kw))
    plain = models.export_state(models.create("cifar_resnet32", 10, aux="none", rngs=nnx.Rngs(3)))
    for a, b in zip(jax.tree.leaves(with_branches), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("branch", ["C2", "C3"])
def test_branch_alone_is_the_main_path_to_its_fork_then_the_branch(branch):
    """DKS Table 5's separately trained branch: one head, and exactly the parameters of the main
    path's stem and stages up to the fork plus those of the branch."""
    alone = models.create("cifar_resnet32", 100, alone=branch, rngs=nnx.Rngs(0))
    assert alone.num_heads == 1
    c = models.complexity("cifar_resnet32", 100, aux="paper")
    branch_params = next(b["params"] for b in c["branches"] if b["name"] == branch)
    full = models.create("cifar_resnet32", 100, aux="none", rngs=nnx.Rngs(0))
    fork = {"C2": 1, "C3": 0}[branch]  # C2 forks after conv3_x, C3 after conv2_x
    trunk = sum(x.size for x in jax.tree.leaves(nnx.state(full.stem, nnx.Param)))
    trunk += sum(x.size for i in range(fork + 1)
                 for x in jax.tree.leaves(nnx.state(full.stages[i], nnx.Param)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(alone, nnx.Param)))
    assert count == trunk + branch_params
    assert alone(jnp.zeros((2, 32, 32, 3)))[0].shape == (2, 100)
    with pytest.raises(ValueError, match="no 'C4'"):
        models.create("cifar_resnet32", 100, alone="C4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot be trained alone"):
        models.create("cifar_resnet32", 100, aux="simple", alone=branch, rngs=nnx.Rngs(0))


def test_feature_adapters_for_byot():
    """BYOT's adaptation layers live in the branches: the logits and the exported main path are
    those of the model without them; the features come back at the main path's width."""
    plain = models.create("cifar_resnet8", 10, rngs=nnx.Rngs(3))
    byot = models.create("cifar_resnet8", 10, rngs=nnx.Rngs(3), feature_adapters=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    logits, feats = byot(x, return_features=True)
    for a, b in zip(logits, plain(x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert [f.shape for f in feats] == [(2, 64)] * 3  # ResNet-8's 64 channels, 3 heads
    for a, b in zip(jax.tree.leaves(models.export_state(byot)),
                    jax.tree.leaves(models.export_state(plain)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="feature_adapters"):
        plain(x, return_features=True)


# ---------------------------------------------------------------------------------------------
# BatchNorm.


def _numpy_bn(x, group, eps=1e-5):
    """Reference: normalise each group of ``group`` examples with its own (biased) statistics."""
    b = x.shape[0]
    xg = x.reshape(b // group, group, *x.shape[1:]).astype(np.float64)
    mean = xg.mean(axis=(1, 2, 3), keepdims=True)
    var = xg.var(axis=(1, 2, 3), keepdims=True)
    n = group * x.shape[1] * x.shape[2]
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y, mean.reshape(-1, x.shape[-1]).mean(0), (var * n / (n - 1)).reshape(
        -1, x.shape[-1]
    ).mean(0)


def test_batchnorm_group_size_against_numpy():
    rng = np.random.default_rng(0)
    # Different offsets and scales per example, so that groups have different statistics.
    x = (rng.normal(size=(8, 3, 3, 5)) * rng.uniform(0.5, 3, (8, 1, 1, 1))
         + rng.normal(size=(8, 1, 1, 1)) * 4).astype(np.float32)
    results = {}
    for g in (2, 4, None):
        bn = layers.BatchNorm(5, group_size=g)
        y = np.asarray(bn(jnp.asarray(x), train=True))
        ref_y, ref_mean, ref_var = _numpy_bn(x, g or 8)
        np.testing.assert_allclose(y, ref_y, atol=2e-4)
        np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * ref_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * ref_var, rtol=1e-4)
        results[g] = y
    assert np.abs(results[2] - results[None]).max() > 0.1  # grouping really changes the output
    # A group of g examples is normalised exactly as a batch of those g examples alone.
    whole = layers.BatchNorm(5)
    np.testing.assert_allclose(
        np.asarray(whole(jnp.asarray(x[2:4]), train=True)), results[2][2:4], atol=1e-5
    )
    with pytest.raises(ValueError, match="groups of 3"):
        layers.BatchNorm(5, group_size=3)(jnp.asarray(x), train=True)


def _autodiff_bn(x, scale, bias, group, eps=layers.BN_EPSILON):
    """BatchNorm's training output written plainly, for jax.grad to differentiate."""
    xg = x.reshape((x.shape[0] // group, group) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps) * scale + bias).reshape(x.shape)


@pytest.mark.parametrize("group", [None, 2])
def test_batchnorm_gradient_equals_autodiff(group):
    """BatchNorm's hand-written backward pass (through the batch statistics) against jax.grad of
    the plain formula: the input, scale and bias gradients."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (8, 5, 5, 6), F32) * 3 + 1
    w = jax.random.normal(keys[1], x.shape, F32)  # a loss that weighs every output differently
    scale = jax.random.normal(keys[2], (6,), F32)
    bias = jax.random.normal(keys[3], (6,), F32)
    bn = layers.BatchNorm(6, group_size=group)
    graphdef, _, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def ours(x, scale, bias, stats):
        m = nnx.merge(graphdef, nnx.State({"scale": nnx.Param(scale), "bias": nnx.Param(bias)}),
                      stats)
        return jnp.sum(jax.nn.relu(m(x, train=True)) * w)

    def plain(x, scale, bias):
        return jnp.sum(jax.nn.relu(_autodiff_bn(x, scale, bias, group or 8)) * w)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(x, scale, bias, stats)[:3]
    want = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(x, scale, bias)
    for a, b in zip(got, want, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0.1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_batchnorm_train_vs_eval():
    x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, (16, 4, 4, 3)), F32)
    bn = layers.BatchNorm(3)
    y_eval = bn(x, train=False)  # running stats: mean 0, var 1 -> nearly the identity
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(x) / math.sqrt(1 + 1e-5), rtol=1e-6)
    assert np.all(np.asarray(bn.mean[...]) == 0)  # evaluation never moves the statistics
    y = np.asarray(bn(x, train=True))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(bn.mean[...]), 0.1 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-5
    )


def test_bn_group_size_reaches_every_batchnorm():
    model = abstract("densenet40_k12", 10, bn_group_size=4)
    bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.BatchNorm)]
    assert len(bns) > 40 and all(bn.group_size == 4 for bn in bns)


# ---------------------------------------------------------------------------------------------
# Compiled runs of a small model: export round trip, heads order, BN in the model, bf16.


@pytest.fixture(scope="module")
def resnet32():
    return models.create("cifar_resnet32", 10, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(graphdef, state, x, train):
    model = nnx.merge(graphdef, state)
    logits = model(x, train=train)
    return logits, nnx.state(model)


def _images(n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 32, 32, 3), F32)


def test_model_train_step_updates_only_batch_stats_and_eval_differs(resnet32):
    graphdef, state = nnx.split(resnet32)
    x = _images()
    train_logits, new_state = _apply(graphdef, state, x, True)
    params0, stats0 = nnx.state(resnet32, nnx.Param), nnx.state(resnet32, nnx.BatchStat)
    merged = nnx.merge(graphdef, new_state)
    stats1 = nnx.state(merged, nnx.BatchStat)
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1), strict=True)]
    assert all(changed)  # every BatchNorm (main and branches) saw the batch
    for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(nnx.state(merged, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eval_logits, eval_state = _apply(graphdef, new_state, x, False)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(eval_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # eval changes nothing
    assert len(train_logits) == len(eval_logits) == 3
    assert all(z.dtype == F32 and bool(jnp.all(jnp.isfinite(z))) for z in train_logits)
    assert not np.allclose(np.asarray(train_logits[0]), np.asarray(eval_logits[0]))


def test_heads_order_main_then_deepest(resnet32):
    graphdef, state = nnx.split(resnet32)
    x = _images(2)
    base, _ = _apply(graphdef, state, x, False)
    for i in range(2):  # nudging branch i's classifier moves head i + 1 only
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # leave the fixture alone
        model.branches[i].fc.bias[...] = model.branches[i].fc.bias[...] + 10.0
        out, _ = _apply(graphdef, nnx.state(model), x, False)
        moved = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(out, base,
                                                                               strict=True)]
        assert moved == [h == i + 1 for h in range(3)]
    # C2 (index 1) is the deeper fork: after conv3_x, 128 wide; C3 after conv2_x.
    assert resnet32.taps == ((1, 5), (0, 5))
    assert resnet32.branches[0].fc.kernel.shape[0] == 128


def test_export_round_trip(resnet32):
    graphdef, state = nnx.split(resnet32)
    _, trained = _apply(graphdef, state, _images(8, seed=1), True)  # non-trivial BN statistics
    model = nnx.merge(graphdef, trained)
    exported = models.export_state(model)
    assert models.BRANCHES not in exported
    plain = models.create("cifar_resnet32", 10, aux="none", rngs=nnx.Rngs(42))
    assert {p for p, _ in nnx.to_flat_state(nnx.state(plain))} == {
        p for p, _ in nnx.to_flat_state(exported)
    }
    models.load_exported(plain, exported)
    x = _images(3, seed=2)
    full, _ = _apply(graphdef, trained, x, False)
    g_plain, s_plain = nnx.split(plain)
    (main,), _ = _apply(g_plain, s_plain, x, False)
    np.testing.assert_array_equal(np.asarray(main), np.asarray(full[0]))
    with pytest.raises(ValueError, match="does not fit"):
        models.load_exported(models.create("cifar_resnet32", 100, aux="none",
                                           rngs=nnx.Rngs(0)), exported)


def test_bf16_compute_close_to_fp32(resnet32):
    graphdef, state = nnx.split(resnet32)
    bf16 = models.create("cifar_resnet32", 10, dtype=BF16, rngs=nnx.Rngs(0))
    g16, s16 = nnx.split(bf16)
    assert all(p.dtype == F32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x = _images(2, seed=3)
    ref, _ = _apply(graphdef, state, x, True)
    out, _ = _apply(g16, s16, x, True)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == F32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.15 * float(
            jnp.abs(b).max()) + 0.05)


# ---------------------------------------------------------------------------------------------
# Slow: compile and run every CIFAR-sized model in both dtypes.


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_CIFAR)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_every_small_cifar_model_compiles_and_runs(name, dtype):
    model = models.create(name, 10, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits, _ = _apply(graphdef, state, _images(2), True)
    assert len(logits) == model.num_heads
    assert all(z.shape == (2, 10) and z.dtype == F32 for z in logits)
    assert all(bool(jnp.all(jnp.isfinite(z))) for z in logits)


# ---------------------------------------------------------------------------------------------
# layers.materialize: the residual stream stored once on the CPU.


@pytest.fixture
def materialize_switch():
    """Restores ``layers.MATERIALIZE_ON_CPU`` after a test flips it."""
    before = layers.MATERIALIZE_ON_CPU
    yield
    layers.MATERIALIZE_ON_CPU = before


def test_materialize_is_an_exact_identity_that_xla_keeps(materialize_switch):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16), F32) * 1e3
    x = x.at[0, 0, 0, :3].set(jnp.array([0.0, -0.0, 1e-40]))  # zero, signed zero, subnormal
    y = jax.jit(layers.materialize)(x)
    ftz = x.at[0, 0, 0, 2].set(0.0)  # XLA:CPU flushes subnormals in any arithmetic
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ftz))
    assert np.signbit(np.asarray(y)[0, 0, 0, 1])
    g = jax.grad(lambda x: jnp.sum(layers.materialize(x) * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g), np.full(x.shape, 3.0, np.float32))

    def compiled(x):  # a stream of cheap elementwise blocks, read back transposed
        f = lambda x: jnp.transpose(layers.materialize(jax.nn.relu(x + 1.0)), (3, 1, 2, 0))
        return jax.jit(f).lower(x).compile().as_text()

    assert jax.default_backend() == "cpu"
    assert " divide(" in compiled(x)  # the barrier keeps XLA from folding x / 1 away
    layers.MATERIALIZE_ON_CPU = False
    assert " divide(" not in compiled(x)


class _Stream(nnx.Module):
    """Three CIFAR ResNet blocks: a residual stream small enough to compile in seconds."""

    def __init__(self):
        cfg = layers.LayerConfig()
        rngs = layers.KeySeq(jax.random.key(0))
        self.blocks = nnx.List([cifar_resnet.BasicBlock(4, 4, 1, shortcut="subsample",
                                                        zero_init=False, cfg=cfg, rngs=rngs)
                                for _ in range(3)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x, train=True)
        return x


def test_materialize_stops_the_stream_being_recomputed_and_changes_no_result(materialize_switch):
    """Without materialize, XLA:CPU's fusions recompute the ReLUs of earlier blocks; with it,
    fewer ReLUs are computed in fusions, and the loss and every gradient stay equal to float
    tolerance."""
    graphdef, state = nnx.split(_Stream())
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4), F32)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    counts, grads = {}, {}
    for on in (False, True):
        layers.MATERIALIZE_ON_CPU = on
        compiled = jax.jit(jax.value_and_grad(loss)).lower(state).compile()
        fused = compiled.as_text().split("\nENTRY ")[0]  # fused computations precede the entry
        counts[on], grads[on] = fused.count(" maximum("), compiled(state)
    assert counts[True] < counts[False], counts
    leaves = {on: jax.tree.leaves(g) for on, g in grads.items()}
    assert len(leaves[True]) == len(leaves[False]) == 1 + 3 * 10  # loss; kernels, BN leaves
    for a, b in zip(leaves[False], leaves[True], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
