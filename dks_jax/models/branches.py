"""Auxiliary branches as data, and the one generic builder that turns a spec into modules.

A branch design is a :class:`BranchSpec`: where it forks off the main path, then the stages it runs
(each :class:`StageSpec` = blocks x width, built by the backbone family's own stage builder, so a
ResNet branch is made of ResNet blocks, a DenseNet branch of dense layers, ...), then its classifier:
either the family's final norm/activation + global average pooling + one fully connected layer
(the papers' designs), or average pooling to a small grid + optional 1x1 conv + fully connected
layers (the DKS ablation designs). Every family module only writes tables of these specs.

Naming follows the DKS paper: C1 is the main classifier, C2 the deepest auxiliary classifier, C3 the
next shallower, C4 the shallowest (ResNet-18 ablation). Heads are returned in that order.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
from flax import nnx

from dks_jax.models import layers


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """``blocks`` x ``width`` of one stage.

    width: the family's width parameter: planes for ResNets (a bottleneck outputs 4x planes),
      channels for WRN and MobileNet (MobileNet may give one width per block as a tuple), the growth
      rate for DenseNet.
    stride: the first block's stride; None = the family's stride for this stage position.
    kind: "family" = the backbone's own block; "conv" = plain 3x3 conv-BN-ReLU layers (the
      shallow-but-wide ResNet-1202 branches of DKS supplement Table 1 / Fig. 4).
    """

    blocks: int
    width: int | tuple[int, ...]
    stride: int | None = None
    kind: str = "family"


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """One auxiliary classifier.

    name: "C2" (deepest) ... "C4" (shallowest).
    after: main-path stage index the branch forks after (at the end of that stage), or
      ``(stage, blocks)`` to fork after the first ``blocks`` blocks of ``stage``.
    stages: the stages the branch runs; the first one takes the role of main stage ``after + 1``
      (so it downsamples like it) unless it gives its own stride.
    pool: None = family final norm + global average pooling + fc. Else ``(kernel, stride, padding)``
      of an average pooling that must give a ``pooled`` x ``pooled`` grid, which is flattened.
    conv: width of a 1x1 conv-BN-ReLU after that pooling (AP+1Conv+2FC), or None.
    hidden: widths of ReLU fully connected layers before the classifier (AP+2FC: one).
    default: active when ``branches=`` is not given.
    """

    name: str
    after: int | tuple[int, int]
    stages: tuple[StageSpec, ...] = ()
    pool: tuple[int, int, int] | None = None
    pooled: int = 4
    conv: int | None = None
    hidden: tuple[int, ...] = ()
    default: bool = True


class Block(Protocol):
    """A stem or one block of a stage (an ``nnx.Module``): NHWC ``float[B, H, W, C_in]`` ->
    ``float[B, H', W', out_features]`` in the compute dtype."""

    out_features: int

    def __call__(
        self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """``float[B, H, W, C_in]`` -> ``float[B, H', W', out_features]`` (compute dtype)."""
        ...


class Family(Protocol):
    """What a backbone family gives the generic builders (see cifar_resnet.py for an example)."""

    strides: tuple[int, ...]

    def stem(self, cfg: layers.LayerConfig, rngs: layers.InitRngs) -> Block: ...

    def stage(
        self, index: int, in_features: int, spec: StageSpec, cfg: layers.LayerConfig,
        rngs: layers.InitRngs,
    ) -> list[Block]: ...

    def head_norm(self, features: int, cfg: layers.LayerConfig) -> nnx.Module | None: ...


def build_stage(
    family: Family, index: int, in_features: int, spec: StageSpec, cfg: layers.LayerConfig,
    rngs: layers.InitRngs,
) -> nnx.List:
    """The stage at position ``index`` (for its default stride) from ``in_features`` channels."""
    if spec.blocks < 1:
        raise ValueError(f"a stage needs at least one block: {spec}")
    if spec.kind == "family":
        blocks = family.stage(index, in_features, spec, cfg, rngs)
    elif spec.kind == "conv":
        if not isinstance(spec.width, int):
            raise ValueError(f"a conv stage has one width for all its layers: {spec}")
        stride = 1 if spec.stride is None else spec.stride
        blocks, ch = [], in_features
        for i in range(spec.blocks):
            blocks.append(
                layers.ConvBN(ch, spec.width, 3, stride=stride if i == 0 else 1, cfg=cfg, rngs=rngs)
            )
            ch = spec.width
    else:
        raise ValueError(f"unknown stage kind {spec.kind!r}")
    return nnx.List(blocks)


def run_stage(stage, x, *, train: bool, rngs: nnx.Rngs | None):
    """The blocks of ``stage`` in order: ``float[B, H, W, C]`` -> the last block's output
    ``[B, H', W', out_features]`` (compute dtype)."""
    for block in stage:
        x = block(x, train=train, rngs=rngs)
    return x


class Branch(nnx.Module):
    """An auxiliary classifier built from a :class:`BranchSpec` and the family's builders."""

    def __init__(
        self,
        family: Family,
        spec: BranchSpec,
        in_features: int,
        num_classes: int,
        *,
        cfg: layers.LayerConfig,
        rngs: layers.InitRngs,
    ):
        first = spec.after + 1 if isinstance(spec.after, int) else spec.after[0]
        self.stages: nnx.List[nnx.List] = nnx.List()
        ch = in_features
        for j, stage_spec in enumerate(spec.stages):
            stage = build_stage(family, first + j, ch, stage_spec, cfg, rngs)
            ch = stage[-1].out_features
            self.stages.append(stage)
        self.pool = spec.pool
        self.pooled = spec.pooled
        self.norm = family.head_norm(ch, cfg) if spec.pool is None else None
        self.conv = (
            layers.ConvBN(ch, spec.conv, 1, cfg=cfg, rngs=rngs) if spec.conv is not None else None
        )
        if spec.pool is None:
            if spec.conv is not None or spec.hidden:
                raise ValueError(f"{spec.name}: conv/hidden layers need pool=(k, s, p)")
            features = ch
        else:
            ch = spec.conv or ch
            features = ch * spec.pooled * spec.pooled
        self.hidden: nnx.List[layers.Linear] = nnx.List()
        for width in spec.hidden:
            self.hidden.append(layers.Linear(features, width, dtype=cfg.dtype, rngs=rngs))
            features = width
        self.fc = layers.Linear(features, num_classes, dtype=cfg.dtype, rngs=rngs)
        # BYOT's adaptation ("bottleneck") layer, set by Network(feature_adapters=True): the
        # classifier's input feature -> the main path's width, for losses.byot_feature_loss.
        self.adapter: layers.Linear | None = nnx.data(None)

    def features(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None,
                 every_block: bool = False):
        """The last feature map before the classifier's pooling, ``[B, H, W, C]`` (compute dtype),
        from the main path's map ``x`` at the fork, ``float[B, H_in, W_in, C_in]``.

        every_block: instead, ``{(branch stage, blocks done): map}`` after every block, in order
        (for ``dks_jax.tools.analysis``).
        """
        maps = {}
        for j, stage in enumerate(self.stages):
            if every_block:
                for b, block in enumerate(stage):
                    x = maps[(j, b + 1)] = block(x, train=train, rngs=rngs)
            else:
                x = run_stage(stage, x, train=train, rngs=rngs)
        return maps if every_block else x

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None,
                 return_feature: bool = False):
        """``x``: the main path's map at the fork, ``float[B, H, W, C]``. Returns the logits
        ``[B, K]`` in the compute dtype (``Network`` casts them to float32); with
        ``return_feature``, ``(logits, adapted feature [B, D])``."""
        x = self.features(x, train=train, rngs=rngs)
        if self.pool is None:
            if self.norm is not None:
                x = self.norm(x, train=train)
            x = layers.global_avg_pool(x)
        else:
            x = layers.avg_pool(x, *self.pool)
            if x.shape[1:3] != (self.pooled, self.pooled):
                raise ValueError(
                    f"this auxiliary classifier pools to {self.pooled}x{self.pooled} at the "
                    f"image size it was designed for; got {x.shape[1]}x{x.shape[2]}"
                )
            if self.conv is not None:
                x = self.conv(x, train=train)
            x = x.reshape(x.shape[0], -1)
        for fc in self.hidden:
            x = jax.nn.relu(fc(x))
        if return_feature:
            if self.adapter is None:
                raise ValueError("return_feature needs a model built with feature_adapters=True")
            return self.fc(x), self.adapter(x)
        return self.fc(x)
