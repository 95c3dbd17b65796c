"""Wide Residual Networks WRN-d-k (Zagoruyko & Komodakis), pre-activation, for CIFAR.

Main path: conv1 3x3,16 -> conv2_x [16k] x n -> conv3_x [32k] x n (/2) -> conv4_x [64k] x n (/2)
-> BN-ReLU -> global average pooling -> fc, with n = (d - 4) / 6. Block: BN-ReLU-conv3x3-BN-ReLU-
[dropout]-conv3x3, plus the input, or a 1x1 conv of the pre-activated input when the shape changes
(as in the WRN and DKS authors' code). ``dropout`` (0.3 in the papers' strong-regularisation rows)
sits between the two convolutions.

Branches (DKS supplement Table 3 / DHM supplement Table 3; DHM code ``[[4, 2], [4]]`` for
WRN-28-10, ``[[2, 1], [2]]`` for WRN-16-8; DKS code ``n`` and ``n // 2``): C3 forks after conv2_x
and runs conv3_x [32k] x n, conv4_x [64k] x n/2; C2 forks after conv3_x and runs conv4_x [128k] x n;
each ends with its own BN-ReLU.
"""

from __future__ import annotations

import jax
from flax import nnx

from dks_jax.models import layers
from dks_jax.models.branches import BranchSpec, StageSpec
from dks_jax.models.network import ModelSpec


class Block(nnx.Module):
    """Pre-activation basic block (WRN)."""

    def __init__(self, in_features, width, stride, *, dropout, cfg, rngs):
        self.bn1 = cfg.bn(in_features)
        self.conv1 = layers.Conv(in_features, width, 3, stride=stride, dtype=cfg.dtype, rngs=rngs)
        self.bn2 = cfg.bn(width)
        self.conv2 = layers.Conv(width, width, 3, dtype=cfg.dtype, rngs=rngs)
        self.shortcut = (
            layers.Conv(in_features, width, 1, stride=stride, dtype=cfg.dtype, rngs=rngs)
            if stride != 1 or in_features != width
            else None
        )
        self.dropout = dropout
        self.out_features = width

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, in_features]`` -> ``[B, ceil(H / stride), ceil(W / stride), width]``
        (compute dtype). ``rngs``: a ``dropout`` stream when training with dropout."""
        o = jax.nn.relu(self.bn1(x, train=train))
        y = jax.nn.relu(self.bn2(self.conv1(o), train=train))
        y = layers.dropout(y, self.dropout, train=train, rngs=rngs)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet:
    """Family builders for WRNs."""

    strides = (1, 2, 2)

    def __init__(self, dropout: float = 0.0):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)

    def stem(self, cfg, rngs):
        return layers.StemConv(16, cfg=cfg, rngs=rngs)  # the first block pre-activates it

    def stage(self, index, in_features, spec, cfg, rngs):
        stride = self.strides[index] if spec.stride is None else spec.stride
        return [
            Block(in_features if i == 0 else spec.width, spec.width, stride if i == 0 else 1,
                  dropout=self.dropout, cfg=cfg, rngs=rngs)
            for i in range(spec.blocks)
        ]

    def head_norm(self, features, cfg):
        return layers.NormAct(features, cfg=cfg)


def _wrn(depth: int, k: int, published: str) -> ModelSpec:
    if (depth - 4) % 6:
        raise ValueError("WRN depth must be 6n + 4")
    n = (depth - 4) // 6
    widths = (16 * k, 32 * k, 64 * k)
    paper = (
        BranchSpec("C2", after=1, stages=(StageSpec(n, 2 * widths[2]),)),
        BranchSpec("C3", after=0, stages=(StageSpec(n, widths[1]), StageSpec(n // 2, widths[2]))),
    )
    return ModelSpec(
        WideResNet, tuple(StageSpec(n, w) for w in widths), {"paper": paper},
        reference=(10, published),
    )


MODELS = {
    "wrn16_8": _wrn(16, 8, "11.0M, Zagoruyko & Komodakis 2016"),
    "wrn28_4": _wrn(28, 4, "not in the WRN paper; same builder as WRN-28-10"),
    "wrn28_10": _wrn(28, 10, "36.5M, Zagoruyko & Komodakis 2016"),
}
