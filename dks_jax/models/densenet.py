"""DenseNets for CIFAR (Huang et al.): the non-bottleneck DenseNet (L, k) and DenseNet-BC.

Main path: conv1 3x3, 2k channels -> dense block 1 -> transition -> dense block 2 -> transition ->
dense block 3 -> BN-ReLU -> global average pooling -> fc. A dense layer is BN-ReLU-conv3x3(k)
(DenseNet) or BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k) (BC), its output concatenated to its input; a
transition is BN-ReLU-conv1x1(floor(c * compression))-avgpool 2x2 (compression 1, BC 0.5). A
"stage" here is a dense block followed by its transition (none after the last block), so a branch
forking "after stage 0" takes the 16x16 output of the first transition, as in the DHM code.

Branches (DKS supplement Table 4 / DHM supplement Table 2; DHM code ``[[12, 6], [12]]`` for
L=40 and ``[[16, 16], [32]]`` for L=100 and BC-100): C3 re-runs dense blocks 2 and 3 at growth k
with fewer layers (with its own transition); C2 runs dense block 3 at three times the growth rate;
each ends with its own BN-ReLU. ``dropout`` (default 0) follows every convolution, as in DenseNet.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dks_jax.models import layers
from dks_jax.models.branches import BranchSpec, StageSpec
from dks_jax.models.network import ModelSpec


class DenseLayer(nnx.Module):
    def __init__(self, in_features, growth, *, bottleneck, dropout, cfg, rngs):
        self.bottleneck = (
            nnx.List([
                cfg.bn(in_features),
                layers.Conv(in_features, 4 * growth, 1, dtype=cfg.dtype, rngs=rngs),
            ])
            if bottleneck
            else None
        )
        ch = 4 * growth if bottleneck else in_features
        self.bn = cfg.bn(ch)
        self.conv = layers.Conv(ch, growth, 3, dtype=cfg.dtype, rngs=rngs)
        self.dropout = dropout
        self.out_features = in_features + growth

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, C]`` -> ``[B, H, W, C + growth]``: ``x`` and the new features, in
        ``x``'s dtype. ``rngs``: a ``dropout`` stream when training with dropout."""
        y = x
        if self.bottleneck is not None:
            bn, conv = self.bottleneck
            y = conv(jax.nn.relu(bn(y, train=train)))
            y = layers.dropout(y, self.dropout, train=train, rngs=rngs)
        y = self.conv(jax.nn.relu(self.bn(y, train=train)))
        y = layers.dropout(y, self.dropout, train=train, rngs=rngs)
        return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class Transition(nnx.Module):
    def __init__(self, in_features, compression, *, dropout, cfg, rngs):
        out = int(math.floor(in_features * compression))
        self.bn = cfg.bn(in_features)
        self.conv = layers.Conv(in_features, out, 1, dtype=cfg.dtype, rngs=rngs)
        self.dropout = dropout
        self.out_features = out

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, C]`` -> ``[B, H // 2, W // 2, floor(C * compression)]`` (compute
        dtype). ``rngs``: a ``dropout`` stream when training with dropout."""
        y = self.conv(jax.nn.relu(self.bn(x, train=train)))
        y = layers.dropout(y, self.dropout, train=train, rngs=rngs)
        return layers.avg_pool(y, 2, 2)


class DenseNet:
    """Family builders for CIFAR DenseNets (stage width = growth rate)."""

    strides = (1, 1, 1)  # downsampling is in the transitions that end stages 0 and 1
    num_stages = 3

    def __init__(
        self, growth: int = 12, bottleneck: bool = False, compression: float = 1.0,
        stem_features: int | None = None, dropout: float = 0.0,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.growth, self.bottleneck, self.compression = growth, bottleneck, compression
        self.stem_features = 2 * growth if stem_features is None else stem_features
        self.dropout = float(dropout)

    def stem(self, cfg, rngs):
        return layers.StemConv(self.stem_features, cfg=cfg, rngs=rngs)

    def stage(self, index, in_features, spec, cfg, rngs):
        blocks, ch = [], in_features
        for _ in range(spec.blocks):
            layer = DenseLayer(ch, spec.width, bottleneck=self.bottleneck, dropout=self.dropout,
                               cfg=cfg, rngs=rngs)
            blocks.append(layer)
            ch = layer.out_features
        if index < self.num_stages - 1:
            blocks.append(Transition(ch, self.compression, dropout=self.dropout, cfg=cfg,
                                     rngs=rngs))
        return blocks

    def head_norm(self, features, cfg):
        return layers.NormAct(features, cfg=cfg)


def _densenet(depth: int, k: int, bc: bool, c3: tuple[int, int], c2: int, published: str):
    n = (depth - 4) // 6 if bc else (depth - 4) // 3
    paper = (
        BranchSpec("C2", after=1, stages=(StageSpec(c2, 3 * k),)),
        BranchSpec("C3", after=0, stages=(StageSpec(c3[0], k), StageSpec(c3[1], k))),
    )
    # Stem: 16 channels for the plain DenseNets, 2k for DenseNet-BC (Huang et al. 2017, Sec. 4;
    # the DHM authors' code likewise); ``stem_features`` overrides it.
    options = {"growth": k, "bottleneck": bc, "compression": 0.5 if bc else 1.0,
               "stem_features": 2 * k if bc else 16}
    return ModelSpec(
        DenseNet, tuple(StageSpec(n, k) for _ in range(3)), {"paper": paper}, options,
        reference=(10, f"{published}, Huang et al. 2017, Table 2"),
    )


MODELS = {
    "densenet40_k12": _densenet(40, 12, False, (12, 6), 12, "1.0M"),
    "densenet100_k12": _densenet(100, 12, False, (16, 16), 32, "7.0M"),
    "densenet_bc100_k12": _densenet(100, 12, True, (16, 16), 32, "0.8M"),
}
