"""Auxiliary branches on any Flax NNX model: ``attach(model, taps, ...)``.

    wrapped = attach(vit, {"blocks.3": "tokens", "blocks.7": "transformer"}, num_classes=100,
                     rngs=nnx.Rngs(0), example=jnp.zeros((1, 224, 224, 3)))
    main, c2, c3 = wrapped(images)             # the user's output, then deepest ... shallowest tap
    export_state(wrapped) == nnx.state(vit)    # the plain model's state: branches dropped

The user's module is stored, unedited, as ``wrapped.model`` (its parameter paths unchanged under
that one attribute) and the branches under ``wrapped.branches``, so a checkpoint of the plain model
loads into ``wrapped.model`` (:func:`load_main`) and :func:`export_state` gives the plain model's
state. ``wrapped(*args, **kwargs)`` takes the user's call arguments and returns the tuple of float32
logits in this project's heads order (``losses``: main first, then the auxiliary heads from the
deepest tap to the shallowest, "deepest" meaning called last in the forward pass).

**Taps** are attribute paths, ``"layer3"``, ``"blocks.6"`` (list / ``nnx.List`` / tuple indices as
numbers) or tuples ``("blocks", 6)``, naming a submodule whose ``__call__`` output (an array
``[B, H, W, C]`` or ``[B, T, D]``) feeds a branch. A tapped submodule must be called once, directly
in the forward pass (not inside ``nnx.scan``/``nnx.remat``/``nnx.vmap``, whose inner trace would leak).

**Branch designs** are data: a name (``"simple"``, ``"conv"``, ``"tokens"``, ``"transformer"``) or a
frozen spec (:class:`Simple`, :class:`Conv`, :class:`Tokens`, :class:`Transformer`, or
:class:`Family` for this project's registry designs built from a backbone family, e.g. the papers'
ResNet branches). Branch shapes come from one run of the user's model on ``example`` under
``jax.eval_shape`` (nothing computed, the model's state untouched).

**How a submodule's output is captured, and why this way.** Flax 0.12's own mechanisms do not fit a
module we may not edit: ``Module.sow`` and ``Module.perturb`` must be called by the module's source;
``nnx.capture(fn, method_outputs=...)`` can record method outputs without source edits, but it
monkey-patches the *classes* of every submodule (all instances of, e.g., ``nnx.Linear`` anywhere in
the process, every public method) for the duration of the call, skips methods a class inherits, and
sows every output of every module. Instead, for the length of the wrapper's call only, each tapped
*instance* is given a subclass of its own class (created once per class and cached) whose
``__call__`` runs the original one and records the output in a context variable; the original class
is restored when the call ends, even on error. Nothing else changes: the object is the same, with
the same attributes, ``isinstance`` holds, the output is returned as is (main logits are bit-equal to
the plain model's), other instances of the class are untouched, and outside the wrapper's call the
user's model (and ``nnx.graphdef`` of it) is exactly as given. Under ``jax.jit`` the swap happens
while tracing only.

**The call convention** is this project's whatever the model's: ``wrapped(x, train=..., rngs=...)``.
``train`` reaches the model as a keyword if its ``__call__`` takes one, else sets its modules'
``deterministic`` / ``use_running_average`` attributes (as ``model.train()`` / ``.eval()`` do); it
also sets the branches' BatchNorm mode (without it: the wrapper's ``use_running_average``, which
``wrapped.train()`` / ``.eval()`` set). ``rngs`` (an ``nnx.Rngs``) reaches the model if its call takes
it, and :class:`Family` branches (dropout). ``offsets={tap name: array}`` adds an array to a tapped
output (before the model and the branch read it) and :meth:`Attached.features` returns the tapped
maps: the trainer's gradient-consistency metric. ``return_features=True`` (with ``classifier=``)
returns BYOT's features too.

**From a config**: :func:`create` builds a factory's model (``config.model = "module:function"``)
with the taps of ``config.taps`` (:func:`parse_taps`); see docs/models.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dks_jax import errors
from dks_jax.models import branches as branches_lib
from dks_jax.models import layers

__all__ = [
    "Attached",
    "Conv",
    "DESIGNS",
    "Family",
    "Simple",
    "Tokens",
    "Transformer",
    "attach",
    "create",
    "export_state",
    "is_factory",
    "load_factory",
    "load_main",
    "parse_path",
    "parse_taps",
]


# ---------------------------------------------------------------------------------------------
# Branch designs (data).


@dataclasses.dataclass(frozen=True)
class Simple:
    """Conv maps ``[B, H, W, C]``: global average pooling + one fully connected layer."""


@dataclasses.dataclass(frozen=True)
class Conv:
    """Conv maps: ``layers`` x (3x3 conv-BN-ReLU, ``width`` channels; None = the tapped map's),
    the first with ``stride``, then global average pooling + fully connected layer."""

    layers: int = 2
    width: int | None = None
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Token sequences ``[B, T, D]``: mean over tokens (``cls=True``: token 0) + LayerNorm + linear."""

    cls: bool = False


@dataclasses.dataclass(frozen=True)
class Transformer:
    """Token sequences: one pre-LN transformer block (self-attention with ``heads`` heads, None = 4
    if they divide D else 1; MLP of ``mlp_ratio`` x D with GELU), then the :class:`Tokens` head."""

    heads: int | None = None
    mlp_ratio: int = 4
    cls: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    """Conv maps: a registry branch design, ``branches.Branch(family, spec)``: the stages of
    ``spec`` built by the backbone ``family``'s own builder (``spec.after``'s stage index only sets
    the default stride), then its classifier. E.g. the papers' CIFAR ResNet C2:
    ``Family(cifar_resnet.CifarResNet(), BranchSpec("C2", after=1, stages=(StageSpec(1, 128),)))``.
    """

    family: Any
    spec: branches_lib.BranchSpec


Design = Simple | Conv | Tokens | Transformer | Family

DESIGNS: dict[str, Design] = {
    "simple": Simple(),
    "conv": Conv(),
    "tokens": Tokens(),
    "tokens_cls": Tokens(cls=True),
    "transformer": Transformer(),
    "transformer_cls": Transformer(cls=True),
}

_RANK = {Simple: 4, Conv: 4, Family: 4, Tokens: 3, Transformer: 3}


def _design(value) -> Design:
    if isinstance(value, str):
        if value not in DESIGNS:
            raise ValueError(f"unknown branch design {value!r}; known: {', '.join(DESIGNS)}")
        return DESIGNS[value]
    if isinstance(value, Simple | Conv | Tokens | Transformer | Family):
        return value
    raise TypeError(
        f"a branch design is a name ({', '.join(DESIGNS)}) or a Simple/Conv/Tokens/Transformer/"
        f"Family spec; got {value!r}"
    )


# ---------------------------------------------------------------------------------------------
# Branch modules. Parameters float32, compute dtype ``dtype``; only nnx.Param / nnx.BatchStat.


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (eps 1e-6), statistics in float32."""

    def __init__(self, features: int, *, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.var(xf, -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + 1e-6)
        return (y * self.scale.get_value() + self.bias.get_value()).astype(self.dtype)


class TokensHead(nnx.Module):
    """``[B, T, D]`` -> mean over T (or token 0) -> LayerNorm -> linear ``[B, K]``."""

    def __init__(self, features: int, num_classes: int, *, class_token: bool, dtype, rngs):
        self.class_token = class_token
        self.norm = LayerNorm(features, dtype=dtype)
        self.fc = layers.Linear(features, num_classes, dtype=dtype, rngs=rngs)
        self.adapter: layers.Linear | None = nnx.data(None)  # BYOT's, set by attach

    def __call__(self, x, *, train: bool = False, rngs=None, return_feature: bool = False):
        x = x[:, 0] if self.class_token else jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
        return _classify(self, self.norm(x), return_feature)


class TransformerBranch(nnx.Module):
    """One pre-LN block (multi-head self-attention, MLP with GELU) then a :class:`TokensHead`."""

    def __init__(self, features: int, num_classes: int, spec: Transformer, *, dtype, rngs):
        heads = spec.heads or (4 if features % 4 == 0 else 1)
        if features % heads:
            raise ValueError(f"transformer branch: {heads} heads do not divide width {features}")
        self.heads, self.dtype = heads, dtype
        self.norm1 = LayerNorm(features, dtype=dtype)
        self.qkv = layers.Linear(features, 3 * features, dtype=dtype, rngs=rngs)
        self.proj = layers.Linear(features, features, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(features, dtype=dtype)
        self.mlp1 = layers.Linear(features, spec.mlp_ratio * features, dtype=dtype, rngs=rngs)
        self.mlp2 = layers.Linear(spec.mlp_ratio * features, features, dtype=dtype, rngs=rngs)
        self.head = TokensHead(features, num_classes, class_token=spec.cls, dtype=dtype, rngs=rngs)

    @property
    def fc(self) -> layers.Linear:
        """The classifier (DSN's squared norm reads its kernel)."""
        return self.head.fc

    def __call__(self, x, *, train: bool = False, rngs=None, return_feature: bool = False):
        b, t, d = x.shape
        x = x.astype(self.dtype)
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads),
                            3, axis=2)
        attn = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # [B, T, H, Dh]
        x = x + self.proj(attn.reshape(b, t, d))
        x = x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))
        return self.head(x, return_feature=return_feature)


class PoolFC(nnx.Module):
    """Conv maps: optional conv-BN-ReLU layers, global average pooling, fully connected layer."""

    def __init__(self, features: int, num_classes: int, spec: Simple | Conv, *, cfg, rngs):
        self.convs: nnx.List[layers.ConvBN] = nnx.List()
        if isinstance(spec, Conv):
            width = spec.width or features
            for i in range(spec.layers):
                self.convs.append(layers.ConvBN(features, width, 3, stride=spec.stride if i == 0 else 1,
                                                cfg=cfg, rngs=rngs))
                features = width
        self.fc = layers.Linear(features, num_classes, dtype=cfg.dtype, rngs=rngs)
        self.adapter: layers.Linear | None = nnx.data(None)  # BYOT's, set by attach

    def __call__(self, x, *, train: bool = False, rngs=None, return_feature: bool = False):
        for conv in self.convs:
            x = conv(x, train=train)
        return _classify(self, layers.global_avg_pool(x), return_feature)


def _classify(branch, feature: jax.Array, return_feature: bool):
    """``branch.fc(feature)``, with ``return_feature`` also ``branch.adapter(feature)`` (BYOT)."""
    if not return_feature:
        return branch.fc(feature)
    if branch.adapter is None:
        raise ValueError("return_features needs attach(..., classifier=<path>) (BYOT's adapters)")
    return branch.fc(feature), branch.adapter(feature)


def _build(design: Design, shape: tuple[int, ...], num_classes: int, cfg, keys) -> nnx.Module:
    features = shape[-1]
    if isinstance(design, Simple | Conv):
        return PoolFC(features, num_classes, design, cfg=cfg, rngs=keys)
    if isinstance(design, Family):
        return branches_lib.Branch(design.family, design.spec, features, num_classes, cfg=cfg,
                                   rngs=keys)
    if isinstance(design, Tokens):
        return TokensHead(features, num_classes, class_token=design.cls, dtype=cfg.dtype, rngs=keys)
    return TransformerBranch(features, num_classes, design, dtype=cfg.dtype, rngs=keys)


# ---------------------------------------------------------------------------------------------
# Paths.

Path = tuple[str | int, ...]


def parse_path(tap: str | Sequence[str | int]) -> Path:
    """``"blocks.6"`` / ``("blocks", 6)`` -> ``("blocks", 6)`` (digit parts become indices)."""
    parts = tap.split(".") if isinstance(tap, str) else list(tap)
    out: list[str | int] = []
    for p in parts:
        if isinstance(p, str) and p.lstrip("-").isdigit():
            out.append(int(p))
        elif isinstance(p, int | str) and p != "":
            out.append(p)
        else:
            raise ValueError(f"bad tap path {tap!r}: empty or non-str/int part {p!r}")
    if not out:
        raise ValueError(f"bad tap path {tap!r}: empty")
    return tuple(out)


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _children(node) -> str:
    if isinstance(node, Sequence | nnx.List) and not isinstance(node, str):
        return f"indices 0..{len(node) - 1}" if len(node) else "no elements"
    names = sorted(k for k in vars(node) if not k.startswith("_"))
    return "attributes " + (", ".join(names) if names else "(none)")


def _resolve(model, path: Path):
    node = model
    for depth, part in enumerate(path):
        here = _name(path[:depth]) or "the model"
        if isinstance(node, Sequence | nnx.List) and not isinstance(node, str):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise ValueError(f"tap {_name(path)!r}: {here} ({type(node).__name__}) has no "
                                 f"element {part!r}; it has {_children(node)}")
            node = node[part]
        elif isinstance(part, str) and not part.startswith("_") and part in vars(node):
            node = getattr(node, part)
        else:
            raise ValueError(f"tap {_name(path)!r}: {here} ({type(node).__name__}) has no "
                             f"{part!r}; it has {_children(node)}")
    if not isinstance(node, nnx.Module) or not callable(node) or isinstance(node, nnx.List):
        raise ValueError(f"tap {_name(path)!r} is a {type(node).__name__}, not a callable "
                         "nnx.Module (tap one of its elements, e.g. the last block of a list)")
    return node


# ---------------------------------------------------------------------------------------------
# Capture.

@dataclasses.dataclass
class _Capture:
    """What one wrapper call records: per tapped module (by ``id``) its calls as ``(order, input,
    output)``, ``order`` counting returns; and the offsets added to tapped outputs."""

    calls: dict[int, list] = dataclasses.field(default_factory=dict)
    offsets: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    returned: int = 0


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "dks_jax_attach_capture", default=None
)
_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` records its first argument and its output, and adds
    an offset to the output when one is given (cached per class)."""
    sub = _TAPPED.get(cls)
    if sub is None:
        original = cls.__call__

        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            capture = _CAPTURE.get()
            if capture is not None and id(self) in capture.calls:
                if id(self) in capture.offsets:
                    out = out + capture.offsets[id(self)].astype(out.dtype)
                capture.returned += 1
                capture.calls[id(self)].append((capture.returned, args[0] if args else None, out))
            return out

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _TAPPED[cls] = sub
    return sub


@contextlib.contextmanager
def _capturing(modules: Sequence[nnx.Module], offsets: Sequence[jax.Array | None] = ()
               ) -> Iterator[_Capture]:
    """While open, every call of ``modules`` is recorded in the yielded :class:`_Capture` (and
    ``offsets[i]``, if given, is added to module ``i``'s output); classes are restored on exit."""
    capture = _Capture(calls={id(m): [] for m in modules})
    if len(capture.calls) != len(modules):
        raise ValueError("two taps name the same submodule instance")
    for m, offset in zip(modules, offsets, strict=False):
        if offset is not None:
            capture.offsets[id(m)] = offset
    originals = [type(m) for m in modules]
    token = _CAPTURE.set(capture)
    try:
        for m, cls in zip(modules, originals, strict=True):
            object.__setattr__(m, "__class__", _tapped_class(cls))
        yield capture
    finally:
        for m, cls in zip(modules, originals, strict=True):
            object.__setattr__(m, "__class__", cls)
        _CAPTURE.reset(token)


def _run(model, paths: Sequence[Path], args, kwargs, offsets: Sequence[jax.Array | None] = ()):
    """The user's forward with the taps captured: ``(output, [(order, input, output)] per path)``."""
    modules = [_resolve(model, p) for p in paths]
    with _capturing(modules, offsets) as capture:
        out = model(*args, **kwargs)
    found = []
    for p, m in zip(paths, modules, strict=True):
        calls = capture.calls[id(m)]
        if len(calls) != 1:
            raise ValueError(f"tap {_name(p)!r} was called {len(calls)} times in the forward pass; "
                             "a tap must be called exactly once")
        found.append(calls[0])
    return out, found


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD
               for p in params)


# ---------------------------------------------------------------------------------------------
# The wrapper.


class Attached(nnx.Module):
    """A user's model (``self.model``, unchanged) + auxiliary branches (``self.branches``).

    ``self(*args, train=None, rngs=None, **kwargs)`` -> tuple of ``num_heads`` float32 logits
    ``[B, K]``: the model's own output, then the branches from the deepest tap to the shallowest
    (``tap_paths`` in that order). See the module doc for how ``train`` and ``rngs`` reach a model
    whose call does not take them, and for ``offsets`` / ``return_features``.
    """

    def __init__(self, model: nnx.Module, paths: Sequence[Path], branch_modules: Sequence[nnx.Module],
                 names: Sequence[str], *, classifier: Path | None = None):
        self.model = model
        self.branches = nnx.List(branch_modules)
        self.tap_paths = tuple(paths)
        self.head_names = ("C1",) + tuple(names)
        self.classifier = classifier
        call = type(model).__call__
        self.passes = tuple(k for k in ("train", "rngs") if _accepts(call, k))
        self.use_running_average = False  # set by .train() / .eval(): the branches' BN mode

    @property
    def num_heads(self) -> int:
        return 1 + len(self.branches)

    @property
    def taps(self) -> tuple[str, ...]:
        """The tap names (``"blocks.6"``), one per branch, deepest first: the keys of ``offsets``
        and of :meth:`features`' maps (as ``Network.taps`` are for registry models)."""
        return tuple(_name(p) for p in self.tap_paths)

    def _forward(self, args, kwargs, train, rngs, offsets=None, classifier=False):
        if train is not None and "train" in self.passes:
            kwargs["train"] = train
        elif train is not None:  # a model without train=: its modules' own mode attributes
            self.model.set_attributes(deterministic=not train, use_running_average=not train,
                                      raise_if_not_found=False)
        if rngs is not None and "rngs" in self.passes:
            kwargs["rngs"] = rngs
        paths = list(self.tap_paths)
        offsets = dict(offsets or {})
        unknown = set(offsets) - set(self.taps)
        if unknown:
            raise ValueError(f"offsets at {sorted(unknown)}: not taps {self.taps}")
        shifts = [offsets.get(name) for name in self.taps]
        if classifier:
            if self.classifier is None:
                raise ValueError("return_features needs attach(..., classifier=<path>) (BYOT)")
            paths.append(self.classifier)
        return _run(self.model, paths, args, kwargs, shifts)

    def features(self, *args, train: bool | None = None, rngs=None, **kwargs):
        """``(output, {tap name: tapped output})``: the user's forward and the maps the branches
        read."""
        out, found = self._forward(args, kwargs, train, rngs)
        return out, {name: x for name, (_, _, x) in zip(self.taps, found, strict=True)}

    def __call__(self, *args, train: bool | None = None, rngs=None,
                 offsets: Mapping[str, jax.Array] | None = None, return_features: bool = False,
                 **kwargs):
        out, found = self._forward(args, kwargs, train, rngs, offsets, return_features)
        branch_train = not self.use_running_average if train is None else bool(train)
        branch_rngs = rngs if isinstance(rngs, nnx.Rngs) else None
        heads, feats = [_main(out)], []
        if return_features:
            feats.append(found.pop()[1])  # the classifier's input: the main feature
            if feats[0].ndim != 2:
                raise ValueError(f"classifier {_name(self.classifier or ())!r} takes "
                                 f"{_describe(feats[0])}; BYOT needs a feature [B, D]")
        for i, (branch, (_, _, x)) in enumerate(zip(self.branches, found, strict=True)):
            with layers.mac_scope(f"branches/{i}"):
                y = branch(x, train=branch_train, rngs=branch_rngs, return_feature=return_features)
            if return_features:
                heads.append(y[0])
                feats.append(y[1])
            else:
                heads.append(y)
        logits = tuple(jnp.asarray(z).astype(jnp.float32) for z in heads)
        if return_features:
            return logits, tuple(f.astype(jnp.float32) for f in feats)
        return logits


def _main(out) -> Any:
    if isinstance(out, tuple | list) and len(out) == 1:  # e.g. a registry model with aux="none"
        out = out[0]
    if not isinstance(out, jax.Array | jax.ShapeDtypeStruct) or len(out.shape) != 2:
        raise TypeError(f"attach: the model must return one logits array [B, K] (or a 1-tuple of "
                        f"it); it returned {_describe(out)} (wrap it in a module that returns the "
                        "logits)")
    return out


def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def attach(
    model: nnx.Module,
    taps: Mapping[str | Sequence[str | int], Any],
    *,
    num_classes: int,
    rngs: nnx.Rngs,
    example: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    dtype=jnp.float32,
    classifier: str | Sequence[str | int] | None = None,
) -> Attached:
    """``model`` with one auxiliary branch per tap (see the module doc).

    taps: ``{path: design}``; path ``"layer3"``, ``"blocks.6"`` or ``("blocks", 6)``; design a name
      in :data:`DESIGNS` or a spec (:class:`Simple`, :class:`Conv`, :class:`Tokens`,
      :class:`Transformer`, :class:`Family`). No taps: the model's own head alone (a baseline).
    example: the model's input (an array or ``jax.ShapeDtypeStruct``), or a tuple of positional
      arguments; ``example_kwargs`` its keyword arguments (e.g. ``{"train": False}``). The model is
      run once on it under ``jax.eval_shape`` to learn the tapped shapes and their order.
    dtype: the branches' compute dtype (parameters are float32).
    classifier: for BYOT's feature hints only: the path of the model's classifier submodule (e.g.
      ``"head"``), whose input ``[B, D]`` is the main feature; every branch then gets an
      adaptation layer from its classifier's input to ``D``, and the call takes
      ``return_features=True``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"attach: model must be an nnx.Module, got {type(model).__name__}")
    paths = [parse_path(t) for t in taps]
    designs = [_design(d) for d in taps.values()]
    if len(set(paths)) != len(paths):
        raise ValueError(f"attach: a tap is given twice: {[_name(p) for p in paths]}")
    head = parse_path(classifier) if classifier is not None else None
    for p in paths + ([head] if head else []):
        _resolve(model, p)  # errors name the path before anything is traced
    args = example if isinstance(example, tuple) else (example,)
    kwargs = dict(example_kwargs or {})
    graphdef, state = nnx.split(model)
    found: list = []

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x

    def forward(state, args):
        out, tapped = _run(nnx.merge(graphdef, state), paths + ([head] if head else []), args,
                           kwargs)
        found.extend((order, spec(x), spec(y)) for order, x, y in tapped)
        return _main(out)

    jax.eval_shape(forward, state, args)
    feature_dim = None
    if head is not None:
        x = found.pop()[1]
        if not isinstance(x, jax.ShapeDtypeStruct) or len(x.shape) != 2:
            raise ValueError(f"classifier {_name(head)!r}: its input is {_describe(x)}; BYOT's "
                             "feature hints need a feature [B, D]")
        feature_dim = int(x.shape[-1])
    for p, d, (_, _, y) in zip(paths, designs, found, strict=True):
        rank = _RANK[type(d)]
        if not isinstance(y, jax.ShapeDtypeStruct) or len(y.shape) not in (3, 4):
            raise ValueError(f"tap {_name(p)!r}: its output is {_describe(y)}; a branch needs an "
                             "array [B, H, W, C] (conv maps) or [B, T, D] (tokens)")
        if len(y.shape) != rank:
            kind = "conv maps [B, H, W, C]" if rank == 4 else "tokens [B, T, D]"
            raise ValueError(f"tap {_name(p)!r}: its output has shape {tuple(y.shape)}; design "
                             f"{d!r} takes {kind}")
    # deepest first: the tap called last in the forward pass gives head C2
    order = sorted(range(len(paths)), key=lambda i: -found[i][0])
    cfg = layers.LayerConfig(dtype=dtype)
    keys = layers.KeySeq(rngs.params())
    modules = [_build(designs[i], tuple(found[i][2].shape), num_classes, cfg, keys) for i in order]
    if feature_dim is not None:  # after every branch: the branches' initialisation stays the same
        for m in modules:
            target: Any = m.head if isinstance(m, TransformerBranch) else m
            target.adapter = layers.Linear(target.fc.in_features, feature_dim, dtype=dtype,
                                           rngs=keys)
    names = [f"C{k + 2}" for k in range(len(order))]
    return Attached(model, [paths[i] for i in order], modules, names, classifier=head)


# ---------------------------------------------------------------------------------------------
# A model from a factory: what the trainer builds for ``config.model = "module:function"``.


def is_factory(name: str) -> bool:
    """Whether a ``config.model`` value names a factory (``"module:function"``,
    ``"path/to/file.py:function"``) rather than a registry model."""
    return ":" in name


def load_factory(name: str) -> Callable[..., nnx.Module]:
    """The function ``name`` points to: ``"package.module:function"`` (imported; the current
    folder is searched first, as ``python -m`` does) or ``"path/to/file.py:function"``."""
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise errors.ConfigError(f"config.model={name!r}: a factory is written "
                                 "'module:function' or 'path/to/file.py:function'.")
    if where.endswith(".py"):
        path = pathlib.Path(where).resolve()
        if not path.is_file():
            raise errors.ConfigError(f"config.model={name!r}: {path} is not a file.")
        key = f"dks_jax_factory_{abs(hash(str(path)))}"  # loaded once: its classes stay the same
        module = sys.modules.get(key)
        if module is None:
            spec = importlib.util.spec_from_file_location(key, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[key]
                raise
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise errors.ConfigError(
                f"config.model={name!r}: cannot import {where!r} ({e}). Run from the folder that "
                f"holds it, add that folder to PYTHONPATH, or write the file's path "
                f"('path/to/file.py:{attr}').") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise errors.ConfigError(f"config.model={name!r}: {where} has no function {attr!r}.")
    return fn


def parse_taps(text: str) -> dict[str, str]:
    """``"blocks.3=tokens_cls, blocks.5=transformer_cls"`` -> ``{"blocks.3": "tokens_cls", ...}``
    (``config.taps``; the designs by name, :data:`DESIGNS`)."""
    taps: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        path, sep, design = (part.strip() for part in item.partition("="))
        if not sep or not path or design not in DESIGNS:
            raise errors.ConfigError(
                f"config.taps={text!r}: each tap is written <path>=<design>, the design one of "
                f"{', '.join(DESIGNS)}; got {item!r}.")
        if path in taps:
            raise errors.ConfigError(f"config.taps={text!r}: {path!r} is given twice.")
        taps[path] = design
    return taps


def create(name: str, num_classes: int, *, taps: Mapping[Any, Any], rngs: nnx.Rngs,
           image_size: int, dtype=jnp.float32, classifier: str = "") -> Attached:
    """The factory ``name``'s model with ``taps`` attached (none: its own head alone).

    The factory is called as ``fn(num_classes, rngs=rngs)`` (and ``dtype=`` if it takes it) and
    returns an ``nnx.Module`` taking NHWC images ``[B, S, S, 3]`` (``S = image_size``) and returning
    logits ``[B, K]``. Its state must be ``nnx.Param`` and ``nnx.BatchStat`` only: the trainer keeps
    those two and passes the random keys per call (``rngs=``), so a stored ``nnx.Rngs`` (e.g.
    ``nnx.Dropout(rate, rngs=rngs)``) is an error that says so.
    """
    fn = load_factory(name)
    kwargs = {"dtype": dtype} if _accepts(fn, "dtype") else {}
    model = fn(num_classes, rngs=rngs, **kwargs)
    if not isinstance(model, nnx.Module):
        raise errors.ConfigError(f"config.model={name!r} returned a {type(model).__name__}, not "
                                 "an nnx.Module (a Linen module goes through nnx.bridge.ToNNX: "
                                 "docs/models.md).")
    rest: Any = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.BatchStat)))
    extra = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)]
    if extra:
        raise errors.ConfigError(
            f"config.model={name!r}: the model holds state other than parameters and BatchNorm "
            f"statistics, at {', '.join(extra[:6])}. The trainer passes the random keys per call "
            "(rngs=...): build dropout without stored keys (nnx.Dropout(rate) and call it with "
            "rngs=), and for nnx.bridge.ToNNX set `to_nnx__rngs = None` after lazy_init.")
    accepts_train = _accepts(type(model).__call__, "train")
    example = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    try:
        return attach(model, taps, num_classes=num_classes, rngs=rngs, example=example,
                      example_kwargs={"train": False} if accepts_train else None, dtype=dtype,
                      classifier=classifier or None)
    except (TypeError, ValueError) as e:
        raise errors.ConfigError(f"config.model={name!r} with config.taps: {e}") from e


def export_state(wrapped: Attached, *filters) -> nnx.State:
    """The user's model's state without the branches: equal to ``nnx.state(plain_model, *filters)``
    (default: everything)."""
    state = nnx.state(wrapped.model, *filters) if filters else nnx.state(wrapped.model)
    assert isinstance(state, nnx.State)
    return state


def load_main(wrapped: Attached, state: nnx.State) -> Attached:
    """Loads a state of the plain model (e.g. a checkpoint) into ``wrapped.model``."""
    nnx.update(wrapped.model, state)
    return wrapped


def param_count(module: nnx.Module) -> int:
    """Number of parameters (``nnx.Param`` elements) of ``module``."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
