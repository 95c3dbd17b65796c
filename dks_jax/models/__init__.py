"""Every backbone of the DKS/DHM papers with its auxiliary branches, as Flax NNX modules.

    model = models.create("cifar_resnet32", 100, aux="paper", rngs=nnx.Rngs(0))
    main, c2, c3 = model(images, train=True)          # NHWC in, float32 logits out
    exported = models.export_state(model)             # main path only (Param + BatchStat)
    plain = models.create("cifar_resnet32", 100, aux="none", rngs=nnx.Rngs(1))
    models.load_exported(plain, exported)              # same main logits, no branch cost

``aux``: "paper" (the papers' branches), "none" (plain backbone), or one of the DKS ablation designs
("simple", "ap_2fc", "ap_conv_2fc", "narrow", "shallow") where the model has them; for
``cifar_resnet1202`` "paper" is DKS's shallow-but-wide design and "dhm" the DHM paper's.
``aux_designs(name)`` lists them.
``branches``: which auxiliary classifiers are active, by DKS name ("C2" deepest ... "C4"), e.g.
``("C2", "C3")`` or the string ``"C1C2C3C4"``; None or "" = the design's defaults.
``bn_group_size``: BatchNorm statistics over groups of that many examples (None = whole batch).
Other keyword arguments are family options (e.g. ``dropout=0.3`` for WRNs,
``zero_init_residual=True`` for ResNets, ``shortcut="avgpool"`` for CIFAR ResNets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dks_jax.models import cifar_resnet, densenet, imagenet_resnet, layers, mobilenet, wrn
from dks_jax.models.branches import BranchSpec, StageSpec
from dks_jax.models.network import ModelSpec, Network

__all__ = [
    "BranchSpec",
    "ModelSpec",
    "Network",
    "StageSpec",
    "aux_designs",
    "complexity",
    "create",
    "export_state",
    "head_macs",
    "load_exported",
    "names",
    "spec",
]

_REGISTRY: dict[str, ModelSpec] = {}
for _module in (cifar_resnet, wrn, densenet, mobilenet, imagenet_resnet):
    _REGISTRY.update(_module.MODELS)

BRANCHES = "branches"  # the subtree that export drops


def names() -> tuple[str, ...]:
    """Every registry name."""
    return tuple(_REGISTRY)


def spec(name: str) -> ModelSpec:
    """The registry entry of ``name`` (ValueError listing the names if unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(names())}") from None


def aux_designs(name: str) -> tuple[str, ...]:
    """The ``aux`` values ``name`` accepts."""
    return ("none",) + tuple(spec(name).aux)


def _select(name: str, aux: str, branches) -> tuple[BranchSpec, ...]:
    entry = spec(name)
    if aux == "none":
        if branches:
            raise ValueError(f"branches={branches!r} given with aux='none'")
        return ()
    if aux not in entry.aux:
        raise ValueError(f"{name} has no aux={aux!r}; choose from {aux_designs(name)}")
    available = entry.aux[aux]
    if branches is None or (isinstance(branches, str) and not branches.strip()):
        return tuple(b for b in available if b.default)
    if isinstance(branches, str):
        wanted = re.findall(r"C\d+", branches.upper())
        if not wanted or re.sub(r"C\d+|[\s,;+]", "", branches.upper()):
            raise ValueError(f"cannot read branches={branches!r}; write e.g. 'C1C2C3' or 'C2,C3'")
    else:
        wanted = [str(b).upper() for b in branches]
    heads = {w for w in wanted if w != "C1"}  # C1 is the main classifier, always present
    known = {b.name for b in available}
    if heads - known:
        raise ValueError(
            f"{name} aux={aux!r} has branches {sorted(known)}; unknown {sorted(heads - known)}"
        )
    return tuple(b for b in available if b.name in heads)  # deepest first


def create(
    name: str,
    num_classes: int,
    *,
    aux: str = "paper",
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    branches: str | Sequence[str] | None = None,
    bn_group_size: int | None = None,
    feature_adapters: bool = False,
    alone: str = "",
    **overrides,
) -> Network:
    """Builds registry model ``name`` with ``num_classes`` outputs per head (see module doc).

    ``feature_adapters``: every branch also gets BYOT's adaptation layer (its classifier input ->
    the main path's feature width), and ``model(x, return_features=True)`` returns the features.
    ``alone``: a branch name of design ``aux`` (e.g. ``"C2"``): the network that branch is on its
    own (DKS Table 5), the main path's stem and stages up to the branch's fork followed by the
    branch's stages and classifier, as one single-head network (no other branch).
    """
    entry = spec(name)
    if alone:
        stages = _alone_stages(name, aux, alone)
        if branches:
            raise ValueError(f"branches={branches!r} given with alone={alone!r}")
        family = entry.family(**{**entry.options, **overrides})
        cfg = layers.LayerConfig(dtype=dtype, bn_group_size=bn_group_size)
        return Network(family, stages, (), num_classes, cfg=cfg,
                       rngs=layers.KeySeq(rngs.params()))
    selected = _select(name, aux, branches)
    options = {**entry.options, **overrides}
    try:
        family = entry.family(**options)
    except TypeError as e:
        raise TypeError(f"{name}: bad option in {sorted(overrides)}: {e}") from None
    cfg = layers.LayerConfig(dtype=dtype, bn_group_size=bn_group_size)
    keys = layers.KeySeq(rngs.params())
    return Network(family, entry.stages, selected, num_classes, cfg=cfg, rngs=keys,
                   feature_adapters=feature_adapters)


def _alone_stages(name: str, aux: str, alone: str) -> tuple:
    """Main stages up to the fork of branch ``alone``, then that branch's stages."""
    entry = spec(name)
    if aux not in entry.aux:
        raise ValueError(f"{name} has no aux={aux!r}; choose from {aux_designs(name)}")
    branch = next((b for b in entry.aux[aux] if b.name == alone.upper()), None)
    if branch is None:
        raise ValueError(f"{name} aux={aux!r} has branches "
                         f"{[b.name for b in entry.aux[aux]]}; no {alone!r}")
    if branch.pool is not None or not isinstance(branch.after, int) or not branch.stages:
        raise ValueError(f"{name} aux={aux!r} branch {branch.name} is not a continuation of the "
                         "main path's stages (it pools, or forks inside a stage): it cannot be "
                         "trained alone as one network")
    return tuple(entry.stages[: branch.after + 1]) + tuple(branch.stages)


def _main_and_branches(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    branch_state = nnx.State({k: v for k, v in state.items() if k == BRANCHES})
    main_state = nnx.State({k: v for k, v in state.items() if k != BRANCHES})
    return main_state, branch_state


def export_state(model: Network) -> nnx.State:
    """The main path's parameters and BatchNorm statistics: the model's state minus its branches.

    Every leaf is a float32 array (parameters are float32 whatever the compute dtype).
    """
    return _main_and_branches(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))[0]


def _paths(state: nnx.State) -> dict[tuple, tuple]:
    return {
        path: tuple(leaf.shape)
        for path, leaf in nnx.to_flat_state(state)
        if hasattr(leaf, "shape")
    }


def load_exported(model: Network, state: nnx.State) -> Network:
    """Loads an :func:`export_state` result into ``model`` (built with ``aux="none"`` or any aux).

    Raises ValueError if the main-path structure or shapes differ.
    """
    have = _paths(export_state(model))
    got = _paths(state)
    if have != got:
        missing = sorted(set(have) - set(got))[:5]
        extra = sorted(set(got) - set(have))[:5]
        changed = [p for p in set(have) & set(got) if have[p] != got[p]][:5]
        raise ValueError(
            f"exported state does not fit this model: missing {missing}, unexpected {extra}, "
            f"shape differs at {changed}"
        )
    nnx.update(model, state)
    return model


def _count(state: nnx.State) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def head_macs(model: Network, image_size: int) -> list[dict]:
    """Per-image multiply-adds per head, split where the head leaves the main path.

    Returns one dict per head, in heads order (C1, C2, ...): ``{"name", "fork", "head"}`` with
    ``fork`` the main path's MACs up to the map the head reads (the stem and the blocks up to the
    branch's fork; for C1 the whole main path up to its last feature map) and ``head`` the MACs of
    the head itself (a branch's stages and classifier; for C1 the main classifier). C1's
    ``fork + head`` is :func:`complexity`'s ``main`` count, and a branch's ``head`` its count there.

    ``model``: a :class:`Network`, concrete or abstract (``nnx.eval_shape``); ``image_size``: the
    square input size. Counted like :func:`complexity` (``layers.count_macs`` under
    ``jax.eval_shape``): nothing is computed.
    """
    graphdef, state = nnx.split(model)

    def count(fn, x):
        with layers.count_macs() as macs:
            out = jax.eval_shape(lambda state, x: fn(nnx.merge(graphdef, state), x), state, x)
        return sum(macs.values()), out

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    fork, last = count(lambda m, x: m.run_main(x, None, None, train=False), images)
    result = [{"name": model.head_names[0], "fork": fork,
               "head": count(lambda m, x: m.classify(x, train=False), last)[0]}]
    for i, tap in enumerate(model.taps):
        fork, tapped = count(lambda m, x, tap=tap: m.run_main(x, None, tap, train=False), images)
        head = count(lambda m, x, i=i: m.branches[i](x, train=False), tapped)[0]
        result.append({"name": model.head_names[i + 1], "fork": fork, "head": head})
    return result


def complexity(
    name: str,
    num_classes: int,
    *,
    image_size: int | None = None,
    aux: str = "paper",
    branches: str | Sequence[str] | None = None,
    **overrides,
) -> dict:
    """Parameters and per-image forward multiply-adds of the main path and of every branch.

    Nothing is materialised or compiled: the model is built with ``nnx.eval_shape`` and the forward
    traced with ``jax.eval_shape``. MACs are counted analytically from the traced shapes of every
    convolution and fully connected layer (see ``layers``); parameters exclude BatchNorm statistics.
    Returns ``{"main": {"params", "macs"}, "branches": [{"name", "params", "macs", "fork_macs"},
    ...], "total": {"params", "macs"}}`` with branches in heads order (deepest first);
    ``fork_macs``: the main path's MACs up to where that branch forks (:func:`head_macs`).
    """
    image_size = image_size or spec(name).image_size
    model = nnx.eval_shape(
        lambda: create(
            name, num_classes, aux=aux, branches=branches, rngs=nnx.Rngs(0), **overrides
        )
    )
    graphdef, state = nnx.split(model)
    params = nnx.state(model, nnx.Param)
    main_params, branch_params = _main_and_branches(params)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with layers.count_macs() as macs:
        jax.eval_shape(forward, state, x)
    forks = head_macs(model, image_size)
    result: dict[str, Any] = {
        "main": {"params": _count(main_params), "macs": macs.get("main", 0)},
        "branches": [
            {
                "name": model.head_names[i + 1],
                "params": _count(branch_params[BRANCHES][i]),
                "macs": macs.get(f"branches/{i}", 0),
                "fork_macs": forks[i + 1]["fork"],
            }
            for i in range(len(model.branches))
        ],
    }
    result["total"] = {
        key: result["main"][key] + sum(b[key] for b in result["branches"])
        for key in ("params", "macs")
    }
    return result
