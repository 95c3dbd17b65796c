"""``dks_jax.attach``: auxiliary branches on a model this project did not write."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dks_jax import attach as att
from dks_jax import losses, models
from dks_jax.models import cifar_resnet
from dks_jax.models.branches import BranchSpec, StageSpec

# ---------------------------------------------------------------------------------------------
# A small ViT written the way a user would (plain flax.nnx, nothing from dks_jax).


class Block(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))


class TinyViT(nnx.Module):
    def __init__(self, num_classes, dim=16, *, rngs):
        self.patch = nnx.Conv(3, dim, (4, 4), strides=(4, 4), rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.blocks = nnx.List([Block(dim, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, images):
        x = self.patch(images)  # [B, 4, 4, D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token.get_value(), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


IMAGES = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)


def _vit_taps():
    return {"blocks.0": att.Transformer(cls=True), "blocks.1": "tokens"}


# ---------------------------------------------------------------------------------------------
# (a) a registry ResNet with aux="none" + the paper's branches through attach.


def _paper_taps():
    family = cifar_resnet.CifarResNet()
    # cifar_resnet8's aux="paper": C2 after conv3_x (stage 1), C3 after conv2_x (stage 0);
    # one block per stage, so the taps are the last blocks of those stages.
    return {
        "stages.0.0": att.Family(family, BranchSpec("C3", after=0,
                                                     stages=(StageSpec(1, 32), StageSpec(1, 64)))),
        "stages.1.0": att.Family(family, BranchSpec("C2", after=1, stages=(StageSpec(1, 128),))),
    }


RESNET_EXAMPLE = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)  # any size: global pooling


def test_resnet_main_logits_exact_and_paper_param_count():
    plain = models.create("cifar_resnet8", 10, aux="none", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    want = plain(x, train=False)[0]
    wrapped = att.attach(plain, _paper_taps(), num_classes=10, rngs=nnx.Rngs(1),
                         example=RESNET_EXAMPLE)
    # heads order: the deepest tap (called last) first
    assert wrapped.tap_paths == (("stages", 1, 0), ("stages", 0, 0))
    assert wrapped.head_names == ("C1", "C2", "C3") and wrapped.num_heads == 3
    heads = wrapped(x, train=False)
    assert len(heads) == 3 and all(h.shape == (2, 10) and h.dtype == jnp.float32 for h in heads)
    np.testing.assert_array_equal(np.asarray(heads[0]), np.asarray(want))
    # the user's model is as given outside the wrapper's call
    assert type(plain.stages[1][0]) is cifar_resnet.BasicBlock
    # the paper's branches through attach: the same parameter count as the registry's aux="paper"
    paper = nnx.eval_shape(lambda: models.create("cifar_resnet8", 10, aux="paper",
                                                 rngs=nnx.Rngs(0)))
    main, c2, c3 = 75_290, 186_122, 70_154  # 10 classes
    assert att.param_count(wrapped) == att.param_count(paper) == main + c2 + c3


def _registry_taps(name: str) -> dict:
    """The registry's aux="paper" branches of ``name`` as attach taps (after the last block of the
    stage each forks from)."""
    entry = models.spec(name)
    return {f"stages.{b.after}.{entry.stages[b.after].blocks - 1}": att.Family(entry.family(), b)
            for b in entry.aux["paper"]}


def test_resnet32_paper_taps_give_the_paper_parameter_count():
    """ResNet-32 (CIFAR-100) with aux="none" + the paper's taps through attach: the parameter count
    of the registry's aux="paper" (built abstractly: nothing allocated)."""
    def attached():
        plain = models.create("cifar_resnet32", 100, aux="none", rngs=nnx.Rngs(0))
        return att.attach(plain, _registry_taps("cifar_resnet32"), num_classes=100,
                          rngs=nnx.Rngs(1), example=RESNET_EXAMPLE)

    wrapped = nnx.eval_shape(attached)
    paper = nnx.eval_shape(lambda: models.create("cifar_resnet32", 100, aux="paper",
                                                 rngs=nnx.Rngs(0)))
    assert wrapped.taps == ("stages.1.4", "stages.0.4")
    assert att.param_count(wrapped) == att.param_count(paper) == models.complexity(
        "cifar_resnet32", 100)["total"]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_resnet32"])
def test_resnet_paper_branches_equal_registry_heads(name):
    """With the registry model's weights loaded, every head equals ``models.create(aux="paper")``'s."""
    paper = models.create(name, 10, aux="paper", rngs=nnx.Rngs(0))
    plain = models.create(name, 10, aux="none", rngs=nnx.Rngs(3))
    wrapped = att.attach(plain, _registry_taps(name), num_classes=10, rngs=nnx.Rngs(1),
                         example=RESNET_EXAMPLE)
    nnx.update(wrapped.model, models.export_state(paper))
    nnx.update(wrapped.branches, nnx.state(paper.branches))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    for got, ref in zip(wrapped(x, train=False), paper(x, train=False), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


# ---------------------------------------------------------------------------------------------
# (b) a user's ViT, token branches, jit + grad of the DKS objective.


@pytest.mark.slow  # about 20 s on 2 cores: `make test-all`
def test_vit_dks_objective_jit_grad():
    vit = TinyViT(10, rngs=nnx.Rngs(0))
    wrapped = att.attach(vit, _vit_taps(), num_classes=10, rngs=nnx.Rngs(1), example=IMAGES)
    assert wrapped.tap_paths == (("blocks", 1), ("blocks", 0))
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    labels = jnp.array([0, 1, 2, 3])

    spec = losses.ObjectiveSpec(method="dks", num_heads=wrapped.num_heads)
    graphdef, params, rest = nnx.split(wrapped, nnx.Param, ...)

    @jax.jit
    def grads(params, rest, x, labels):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(x)
            total, terms = losses.objective(logits, labels, spec=spec, step=0,
                                            rng=jax.random.key(0))
            return total, terms
        return jax.grad(loss, has_aux=True)(params)

    g_total, terms = grads(params, rest, x, labels)
    assert set(terms) == {"ce/0", "ce/1", "ce/2", "synergy"} and bool(jnp.isfinite(terms["synergy"]))
    leaves = jax.tree.leaves(g_total)
    assert leaves and all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
    assert float(optax_norm(g_total["branches"][0])) > 0 and float(optax_norm(g_total["branches"][1])) > 0


@pytest.mark.slow
def test_vit_synergy_gradient_finite():
    """The synergy term's own gradient (the DKS objective minus its CE terms) is finite and reaches
    the branches and the user's blocks."""
    vit = TinyViT(10, rngs=nnx.Rngs(0))
    wrapped = att.attach(vit, _vit_taps(), num_classes=10, rngs=nnx.Rngs(1), example=IMAGES)
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    labels = jnp.array([0, 1, 2, 3])
    spec = losses.ObjectiveSpec(method="dks", num_heads=wrapped.num_heads)
    graphdef, params, rest = nnx.split(wrapped, nnx.Param, ...)

    @jax.jit
    def synergy_grad(params):
        def synergy(params):
            logits = nnx.merge(graphdef, params, rest)(x)
            return losses.objective(logits, labels, spec=spec, step=0,
                                    rng=jax.random.key(0))[1]["synergy"]
        return jax.grad(synergy)(params)

    g = synergy_grad(params)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
    assert float(optax_norm(g["branches"])) > 0
    assert float(optax_norm(g["model"]["blocks"][0])) > 0


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# (c) export drops the branches; a plain checkpoint loads into the main path.


# About 16 s on 2 cores: `make test-all`. In the default suite the trained ViT's export (branches
# dropped, reloaded from its factory) is checked by test_attach_trainer.py.
@pytest.mark.slow
def test_export_equals_plain_state_and_plain_state_loads():
    vit = TinyViT(10, rngs=nnx.Rngs(0))
    want = jax.tree.map(np.asarray, nnx.state(vit))
    graphdef = nnx.graphdef(vit)
    wrapped = att.attach(vit, _vit_taps(), num_classes=10, rngs=nnx.Rngs(1), example=IMAGES)
    wrapped(jnp.ones((2, 16, 16, 3)))
    assert nnx.graphdef(vit) == graphdef  # the user's model is unchanged after calls
    exported = att.export_state(wrapped)
    assert "branches" not in exported
    assert nnx.to_pure_dict(exported).keys() == nnx.to_pure_dict(nnx.state(vit)).keys()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, exported), want)

    other = TinyViT(10, rngs=nnx.Rngs(5))  # "a checkpoint of the plain model"
    att.load_main(wrapped, nnx.state(other))
    x = jnp.ones((2, 16, 16, 3))
    np.testing.assert_array_equal(np.asarray(wrapped(x)[0]), np.asarray(other(x)))
    fresh = TinyViT(10, rngs=nnx.Rngs(7))
    nnx.update(fresh, att.export_state(wrapped))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(other(x)))


def test_conv_designs_and_modes():
    plain = models.create("cifar_resnet8", 10, aux="none", rngs=nnx.Rngs(0))
    wrapped = att.attach(plain, {"stages.1.0": "simple", "stages.0.0": att.Conv(layers=1, width=8)},
                         num_classes=10, rngs=nnx.Rngs(1),
                         example=jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    heads = wrapped(jnp.ones((2, 32, 32, 3)), train=True)  # BN in train mode: statistics move
    assert [h.shape for h in heads] == [(2, 10)] * 3
    conv_branch = wrapped.branches[1]
    assert float(jnp.abs(conv_branch.convs[0].bn.mean.get_value()).sum()) > 0


# ---------------------------------------------------------------------------------------------
# (d) errors.


def test_errors_name_the_path():
    vit = TinyViT(10, rngs=nnx.Rngs(0))
    kw = dict(num_classes=10, rngs=nnx.Rngs(1), example=IMAGES)
    with pytest.raises(ValueError, match=r"tap 'blockz.0'.*has no 'blockz'.*blocks, cls_token"):
        att.attach(vit, {"blockz.0": "tokens"}, **kw)
    with pytest.raises(ValueError, match=r"tap 'blocks.5'.*no element 5.*indices 0..1"):
        att.attach(vit, {"blocks.5": "tokens"}, **kw)
    with pytest.raises(ValueError, match=r"tap 'blocks.0.attnn'.*norm1"):
        att.attach(vit, {"blocks.0.attnn": "tokens"}, **kw)
    with pytest.raises(ValueError, match=r"tap 'blocks' is a List"):
        att.attach(vit, {"blocks": "tokens"}, **kw)
    with pytest.raises(ValueError, match=r"tap 'head'.*shape \(1, 10\).*\[B, H, W, C\]"):
        att.attach(vit, {"head": "tokens"}, **kw)
    with pytest.raises(ValueError, match=r"tap 'patch'.*\(1, 4, 4, 16\).*tokens \[B, T, D\]"):
        att.attach(vit, {"patch": "tokens"}, **kw)
    with pytest.raises(ValueError, match=r"tap 'blocks.0'.*\(1, 17, 16\).*conv maps"):
        att.attach(vit, {"blocks.0": "simple"}, **kw)
    with pytest.raises(ValueError, match="unknown branch design 'pool'"):
        att.attach(vit, {"blocks.0": "pool"}, **kw)


def test_error_tap_output_not_array():
    class Pair(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.lin(x), x

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.pair = Pair(rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.pair(x)[0])

    with pytest.raises(ValueError, match=r"tap 'pair': its output is a tuple"):
        att.attach(Model(nnx.Rngs(0)), {"pair": "tokens"}, num_classes=3, rngs=nnx.Rngs(1),
                   example=jnp.zeros((1, 4)))
