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

**Train / eval mode of the branches** (BatchNorm in :class:`Conv` and :class:`Family` branches): a
``train=`` keyword of the call if given (this project's convention), else the wrapper's
``use_running_average`` attribute, which ``wrapped.train()`` / ``wrapped.eval()`` set like they set
``nnx.BatchNorm``'s. ``rngs=`` of the call (an ``nnx.Rngs``) is passed to :class:`Family` branches
for dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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
    "export_state",
    "load_main",
    "parse_path",
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
    "transformer": Transformer(),
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

    def __call__(self, x, *, train: bool = False, rngs=None):
        x = x[:, 0] if self.class_token else jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
        return self.fc(self.norm(x))


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

    def __call__(self, x, *, train: bool = False, rngs=None):
        b, t, d = x.shape
        x = x.astype(self.dtype)
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads),
                            3, axis=2)
        attn = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # [B, T, H, Dh]
        x = x + self.proj(attn.reshape(b, t, d))
        x = x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))
        return self.head(x)


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

    def __call__(self, x, *, train: bool = False, rngs=None):
        for conv in self.convs:
            x = conv(x, train=train)
        return self.fc(layers.global_avg_pool(x))


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

# While a wrapper's call runs: (id(tapped module) -> [(call order, output)], [calls so far]).
_RECORD: contextvars.ContextVar[tuple[dict[int, list], list[int]] | None] = contextvars.ContextVar(
    "dks_jax_attach_record", default=None
)
_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` records its output (cached per class)."""
    sub = _TAPPED.get(cls)
    if sub is None:
        original = cls.__call__

        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            context = _RECORD.get()
            if context is not None and id(self) in context[0]:
                record, count = context
                count[0] += 1
                record[id(self)].append((count[0], out))
            return out

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _TAPPED[cls] = sub
    return sub


@contextlib.contextmanager
def _capturing(modules: Sequence[nnx.Module]) -> Iterator[dict[int, list]]:
    """While open, every call of ``modules`` appends ``(call order, output)`` to the yielded dict,
    keyed by ``id(module)`` (order: when the call returned); their classes are restored on exit."""
    record: dict[int, list] = {id(m): [] for m in modules}
    if len(record) != len(modules):
        raise ValueError("two taps name the same submodule instance")
    originals = [type(m) for m in modules]
    token = _RECORD.set((record, [0]))
    try:
        for m, cls in zip(modules, originals, strict=True):
            object.__setattr__(m, "__class__", _tapped_class(cls))
        yield record
    finally:
        for m, cls in zip(modules, originals, strict=True):
            object.__setattr__(m, "__class__", cls)
        _RECORD.reset(token)


def _run(model, paths: Sequence[Path], args, kwargs):
    """The user's forward with the taps captured: ``(output, [(order, tapped output)] per path)``."""
    modules = [_resolve(model, p) for p in paths]
    with _capturing(modules) as record:
        out = model(*args, **kwargs)
    found = []
    for p, m in zip(paths, modules, strict=True):
        calls = record[id(m)]
        if len(calls) != 1:
            raise ValueError(f"tap {_name(p)!r} was called {len(calls)} times in the forward pass; "
                             "a tap must be called exactly once")
        found.append(calls[0])
    return out, found


# ---------------------------------------------------------------------------------------------
# The wrapper.


class Attached(nnx.Module):
    """A user's model (``self.model``, unchanged) + auxiliary branches (``self.branches``).

    ``self(*args, **kwargs)`` -> tuple of ``num_heads`` float32 logits ``[B, K]``: the model's own
    output, then the branches from the deepest tap to the shallowest (``tap_paths`` in that order).
    """

    def __init__(self, model: nnx.Module, paths: Sequence[Path], branch_modules: Sequence[nnx.Module],
                 names: Sequence[str]):
        self.model = model
        self.branches = nnx.List(branch_modules)
        self.tap_paths = tuple(paths)
        self.head_names = ("C1",) + tuple(names)
        self.use_running_average = False  # set by .train() / .eval(): the branches' BN mode

    @property
    def num_heads(self) -> int:
        return 1 + len(self.branches)

    def __call__(self, *args, **kwargs):
        out, found = _run(self.model, self.tap_paths, args, kwargs)
        train = bool(kwargs["train"]) if "train" in kwargs else not self.use_running_average
        rngs = kwargs.get("rngs")
        rngs = rngs if isinstance(rngs, nnx.Rngs) else None
        heads = [_main(out)]
        for i, (branch, (_, x)) in enumerate(zip(self.branches, found, strict=True)):
            with layers.mac_scope(f"branches/{i}"):
                heads.append(branch(x, train=train, rngs=rngs))
        return tuple(jnp.asarray(z).astype(jnp.float32) for z in heads)


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
) -> Attached:
    """``model`` with one auxiliary branch per tap (see the module doc).

    taps: ``{path: design}``; path ``"layer3"``, ``"blocks.6"`` or ``("blocks", 6)``; design a name
      in :data:`DESIGNS` or a spec (:class:`Simple`, :class:`Conv`, :class:`Tokens`,
      :class:`Transformer`, :class:`Family`).
    example: the model's input (an array or ``jax.ShapeDtypeStruct``), or a tuple of positional
      arguments; ``example_kwargs`` its keyword arguments (e.g. ``{"train": False}``). The model is
      run once on it under ``jax.eval_shape`` to learn the tapped shapes and their order.
    dtype: the branches' compute dtype (parameters are float32).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"attach: model must be an nnx.Module, got {type(model).__name__}")
    if not taps:
        raise ValueError("attach: no taps given")
    paths = [parse_path(t) for t in taps]
    designs = [_design(d) for d in taps.values()]
    if len(set(paths)) != len(paths):
        raise ValueError(f"attach: a tap is given twice: {[_name(p) for p in paths]}")
    for p in paths:
        _resolve(model, p)  # errors name the path before anything is traced
    args = example if isinstance(example, tuple) else (example,)
    kwargs = dict(example_kwargs or {})
    graphdef, state = nnx.split(model)
    found: list = []

    def forward(state, args):
        out, tapped = _run(nnx.merge(graphdef, state), paths, args, kwargs)
        found.extend((order, jax.ShapeDtypeStruct(x.shape, x.dtype)) if hasattr(x, "shape")
                     else (order, x) for order, x in tapped)
        return _main(out)

    jax.eval_shape(forward, state, args)
    for p, d, (_, x) in zip(paths, designs, found, strict=True):
        rank = _RANK[type(d)]
        if not isinstance(x, jax.ShapeDtypeStruct) or len(x.shape) not in (3, 4):
            raise ValueError(f"tap {_name(p)!r}: its output is {_describe(x)}; a branch needs an "
                             "array [B, H, W, C] (conv maps) or [B, T, D] (tokens)")
        if len(x.shape) != rank:
            kind = "conv maps [B, H, W, C]" if rank == 4 else "tokens [B, T, D]"
            raise ValueError(f"tap {_name(p)!r}: its output has shape {tuple(x.shape)}; design "
                             f"{d!r} takes {kind}")
    # deepest first: the tap called last in the forward pass gives head C2
    order = sorted(range(len(paths)), key=lambda i: -found[i][0])
    cfg = layers.LayerConfig(dtype=dtype)
    keys = layers.KeySeq(rngs.params())
    modules = [_build(designs[i], tuple(found[i][1].shape), num_classes, cfg, keys) for i in order]
    names = [f"C{k + 2}" for k in range(len(order))]
    return Attached(model, [paths[i] for i in order], modules, names)


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
