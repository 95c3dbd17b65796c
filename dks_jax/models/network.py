"""The generic classifier: a family's stem and stages, its final norm, a classifier, and branches.

Submodule names of the main path (``stem``, ``stages``, ``head_norm``, ``fc``) never depend on the
auxiliary branches, which all live under ``branches``: the exported (inference) model is the state
minus the ``branches`` subtree, and a model built with ``aux="none"`` has exactly that state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dks_jax.models import layers
from dks_jax.models.branches import Branch, BranchSpec, Family, StageSpec, build_stage, run_stage


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry entry: family, main-path stages, and the branch designs per ``aux`` value.

    aux: ``aux`` name -> every available branch of that design, deepest first (C2, C3, C4).
    options: default family keyword arguments (``create(**overrides)`` replaces them).
    image_size: the input size the model was designed for (32 CIFAR, 224 ImageNet).
    reference: ``(num_classes, published count and source)`` the main path was checked against.
    """

    family: type
    stages: tuple[StageSpec, ...]
    aux: Mapping[str, tuple[BranchSpec, ...]]
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    image_size: int = 32
    reference: tuple[int, str] = (0, "")


class Network(nnx.Module):
    """Backbone + auxiliary classifiers.

    ``model(x, train=False, rngs=None)`` takes NHWC images of any float dtype and returns a tuple of
    float32 logits ``(main, deepest aux, ..., shallowest aux)``.
    """

    def __init__(
        self,
        family: Family,
        stages: tuple[StageSpec, ...],
        branches: tuple[BranchSpec, ...],
        num_classes: int,
        *,
        cfg: layers.LayerConfig,
        rngs: layers.InitRngs,
        feature_adapters: bool = False,
    ):
        self.dtype = cfg.dtype
        self.num_classes = num_classes
        self.stem = family.stem(cfg, rngs)
        self.stages: nnx.List[nnx.List] = nnx.List()
        ch = self.stem.out_features
        # channels after every block: {(stage, blocks done): channels}
        channels = {}
        for index, spec in enumerate(stages):
            stage = build_stage(family, index, ch, spec, cfg, rngs)
            for b, block in enumerate(stage):
                channels[(index, b + 1)] = block.out_features
            ch = stage[-1].out_features
            self.stages.append(stage)
        self.head_norm = family.head_norm(ch, cfg)
        self.fc = layers.Linear(ch, num_classes, dtype=cfg.dtype, rngs=rngs)

        taps = []
        self.branches: nnx.List[Branch] = nnx.List()
        for branch_spec in branches:
            tap = self._tap(branch_spec.after)
            if tap not in channels:
                raise ValueError(
                    f"branch {branch_spec.name} forks at {branch_spec.after}: no such position"
                )
            taps.append(tap)
            self.branches.append(
                Branch(family, branch_spec, channels[tap], num_classes, cfg=cfg, rngs=rngs)
            )
        if feature_adapters:  # after every branch: the branches' initialisation stays the same
            for branch in self.branches:
                branch.adapter = layers.Linear(branch.fc.in_features, ch, dtype=cfg.dtype,
                                               rngs=rngs)
        self.taps = tuple(taps)
        self.head_names = ("C1",) + tuple(spec.name for spec in branches)

    def _tap(self, after: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(after, int):
            return (after, len(self.stages[after]))
        stage, blocks = after
        return (stage, blocks)

    @property
    def num_heads(self) -> int:
        return 1 + len(self.branches)

    def features(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        offsets: Mapping[tuple[int, int], jax.Array] | None = None,
        every_block: bool = False,
    ) -> tuple[jax.Array, dict[tuple[int, int], jax.Array]]:
        """Main path up to its last feature map ``[B, H', W', C]``, and the feature maps at the taps.

        ``x``: NHWC images ``float[B, H, W, 3]``, any float dtype; every map is in the compute
        dtype.

        The maps are keyed by position ``(stage, blocks done)``. For analysis (``dks_jax.tools.analysis``):
        offsets: ``{tap: array}`` added to the main path's map at those taps, before both the rest
          of the main path and the branch read it; with zeros, the gradient with respect to an
          offset is the gradient with respect to the shared map.
        every_block: return the map after every block (in order), not only at the taps.
        """
        offsets = offsets or {}
        wanted = set(self.taps)
        if not set(offsets) <= wanted:
            raise ValueError(f"offsets at {sorted(set(offsets) - wanted)}: not taps {self.taps}")
        tapped = {}

        def keep(pos, x):
            if pos in offsets:
                x = x + offsets[pos].astype(x.dtype)
            if every_block or pos in wanted:
                tapped[pos] = x
            return x

        x = self.stem(jnp.asarray(x).astype(self.dtype), train=train, rngs=rngs)
        for s, stage in enumerate(self.stages):
            if not every_block and not any(t[0] == s and t[1] < len(stage) for t in wanted):
                x = run_stage(stage, x, train=train, rngs=rngs)
            else:  # a branch forks inside this stage, or every block's map is wanted
                for b, block in enumerate(stage):
                    x = block(x, train=train, rngs=rngs)
                    if b + 1 < len(stage):
                        x = keep((s, b + 1), x)
            x = keep((s, len(stage)), x)
        return x, tapped

    def run_main(
        self,
        x: jax.Array,
        start: tuple[int, int] | None = None,
        stop: tuple[int, int] | None = None,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """A piece of the main path: from position ``start`` to position ``stop``.

        Positions are ``(stage, blocks done)``, as :attr:`taps`. ``start=None``: ``x`` is the
        NHWC images ``float[B, H, W, 3]`` (any float dtype) and the stem runs first; otherwise
        ``x`` is the map at ``start``. ``stop=None``: up to the last feature map (what
        :meth:`classify` takes). The blocks run are those at positions ``p`` with
        ``start < p <= stop``; ``start == stop`` returns ``x``. Chained pieces compute exactly
        what :meth:`features` does (the early-exit predictor of ``dks_jax.anytime`` runs them).
        """
        if start is None:
            x = self.stem(jnp.asarray(x).astype(self.dtype), train=train, rngs=rngs)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                pos = (s, b + 1)
                if (start is None or pos > start) and (stop is None or pos <= stop):
                    x = block(x, train=train, rngs=rngs)
        return x

    def classify(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """The main classifier on the main path's last feature map ``[B, H', W', C]``: the
        family's final norm (if any), global average pooling and the fully connected layer ->
        float32 logits ``[B, K]`` (head C1 of :meth:`__call__`)."""
        if self.head_norm is not None:
            x = self.head_norm(x, train=train)
        return self.fc(layers.global_avg_pool(x)).astype(jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        offsets: Mapping[tuple[int, int], jax.Array] | None = None,
        return_features: bool = False,
    ):
        """NHWC images ``float[B, H, W, 3]`` (any float dtype) -> a tuple of ``num_heads`` logits
        ``float32[B, K]``, in the order C1 (main), C2 (deepest branch), ... .

        ``offsets``: see :meth:`features`.

        ``return_features`` (a model built with ``feature_adapters=True``, for BYOT's hint terms):
        ``(logits, features)``, ``features`` the main path's pooled feature ``[B, D]`` and every
        branch's classifier input through its adaptation layer, also ``[B, D]`` (float32).
        """
        x, tapped = self.features(x, train=train, rngs=rngs, offsets=offsets)
        if self.head_norm is not None:
            x = self.head_norm(x, train=train)
        pooled = layers.global_avg_pool(x)
        logits, feats = [self.fc(pooled)], [pooled]
        for i, (tap, branch) in enumerate(zip(self.taps, self.branches, strict=True)):
            with layers.mac_scope(f"branches/{i}"):
                out = branch(tapped[tap], train=train, rngs=rngs, return_feature=return_features)
            if return_features:
                logits.append(out[0])
                feats.append(out[1])
            else:
                logits.append(out)
        heads = tuple(z.astype(jnp.float32) for z in logits)
        if return_features:
            return heads, tuple(f.astype(jnp.float32) for f in feats)
        return heads
