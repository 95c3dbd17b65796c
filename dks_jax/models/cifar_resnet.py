"""He et al.'s CIFAR ResNets (6n+2 layers, 16/32/64 channels, parameter-free shortcuts).

Main path: conv1 3x3,16 -> conv2_x [16] x n -> conv3_x [32] x n (stride 2) -> conv4_x [64] x n
(stride 2) -> global average pooling -> fc. Shortcuts that change shape are parameter-free
(option A): subsample with the stride (``shortcut="subsample"``, as in He et al. and fb.resnet.torch)
or 2x2 average pooling (``shortcut="avgpool"``, as in the DHM authors' code), then zero-pad the new
channels.

Branches (DKS supplement Table 2 / DHM supplement Table 1; DHM code ``[[5, 3], [5]]`` etc.):
C3 forks after conv2_x and re-runs conv3_x, conv4_x at the backbone widths with fewer blocks; C2
forks after conv3_x and runs conv4_x at twice the width (128). ResNet-32 also has the DKS ablation
designs (DKS Table 3, supplement 2.1.2, Fig. 3, Table 6). ResNet-1202 uses three shallow-but-wide
branches of plain 3x3 convolutions (DKS supplement Table 1, Fig. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dks_jax.models import layers
from dks_jax.models.branches import BranchSpec, StageSpec
from dks_jax.models.network import ModelSpec

WIDTHS = (16, 32, 64)


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + parameter-free shortcut, ReLU."""

    def __init__(self, in_features, width, stride, *, shortcut, zero_init, cfg, rngs):
        if width < in_features:
            raise ValueError(f"zero-padding shortcut cannot shrink {in_features} -> {width}")
        self.conv1 = layers.Conv(in_features, width, 3, stride=stride, dtype=cfg.dtype, rngs=rngs)
        self.bn1 = cfg.bn(width)
        self.conv2 = layers.Conv(width, width, 3, dtype=cfg.dtype, rngs=rngs)
        self.bn2 = cfg.bn(width, zero_init=zero_init)
        self.in_features, self.out_features, self.stride = in_features, width, stride
        self.shortcut = shortcut

    def _shortcut(self, x):
        if self.stride != 1:
            if self.shortcut == "subsample":
                x = x[:, :: self.stride, :: self.stride, :]
            else:
                x = layers.avg_pool(x, self.stride, self.stride)
        extra = self.out_features - self.in_features
        if extra:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, in_features]`` -> ``[B, ceil(H / stride), ceil(W / stride), width]``
        (compute dtype). ``rngs`` is unused."""
        y = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        y = self.bn2(self.conv2(y), train=train)
        return layers.materialize(jax.nn.relu(y + self._shortcut(x)))


class CifarResNet:
    """Family builders for the CIFAR ResNets."""

    strides = (1, 2, 2)

    def __init__(self, shortcut: str = "subsample", zero_init_residual: bool = False):
        if shortcut not in ("subsample", "avgpool"):
            raise ValueError(f"shortcut must be 'subsample' or 'avgpool', got {shortcut!r}")
        self.shortcut = shortcut
        self.zero_init_residual = zero_init_residual

    def stem(self, cfg, rngs):
        return layers.ConvBN(3, WIDTHS[0], 3, cfg=cfg, rngs=rngs)

    def stage(self, index, in_features, spec, cfg, rngs):
        stride = self.strides[index] if spec.stride is None else spec.stride
        blocks = []
        for i in range(spec.blocks):
            blocks.append(
                BasicBlock(
                    in_features if i == 0 else spec.width, spec.width, stride if i == 0 else 1,
                    shortcut=self.shortcut, zero_init=self.zero_init_residual, cfg=cfg, rngs=rngs,
                )
            )
        return blocks

    def head_norm(self, features, cfg):
        return None


def _stages(n):
    return tuple(StageSpec(n, w) for w in WIDTHS)


def _paper(c3: tuple[int, int], c2: int) -> tuple[BranchSpec, ...]:
    """C2 after conv3_x: conv4_x at 128 x c2 blocks; C3 after conv2_x: [32] x c3[0], [64] x c3[1]."""
    return (
        BranchSpec("C2", after=1, stages=(StageSpec(c2, 128),)),
        BranchSpec("C3", after=0, stages=(StageSpec(c3[0], 32), StageSpec(c3[1], 64))),
    )


def _narrow(c3: tuple[int, int], c2: int) -> tuple[BranchSpec, ...]:
    """:func:`_paper` at half the widths (DKS Table 6, "Narrow"): C2 [64] x c2, C3 [16], [32]."""
    return (
        BranchSpec("C2", after=1, stages=(StageSpec(c2, 64),)),
        BranchSpec("C3", after=0, stages=(StageSpec(c3[0], 16), StageSpec(c3[1], 32))),
    )


# DKS ablation designs for ResNet-32 (DKS Table 3, supplement 2.1.2, Fig. 3 and Table 6). The pools
# bring conv2_x (32x32) and conv3_x (16x16) outputs to 4x4. Fig. 3's layer widths are not legible in
# the text; we use the GoogLeNet auxiliary classifier's (1x1 conv 128, fc 1024) that DKS cites [41].
_RESNET32_ABLATIONS = {
    "simple": (
        BranchSpec("C2", after=1, pool=(4, 4, 0)),
        BranchSpec("C3", after=0, pool=(8, 8, 0)),
    ),
    "ap_2fc": (
        BranchSpec("C2", after=1, pool=(4, 4, 0), hidden=(1024,)),
        BranchSpec("C3", after=0, pool=(8, 8, 0), hidden=(1024,)),
    ),
    "ap_conv_2fc": (
        BranchSpec("C2", after=1, pool=(4, 4, 0), conv=128, hidden=(1024,)),
        BranchSpec("C3", after=0, pool=(8, 8, 0), conv=128, hidden=(1024,)),
    ),
    # Table 6, "Narrow": the original design at half the widths.
    "narrow": _narrow((5, 3), 5),
    # Table 6, "Shallow": the original widths with fewer blocks.
    "shallow": (
        BranchSpec("C2", after=1, stages=(StageSpec(2, 128),)),
        BranchSpec("C3", after=0, stages=(StageSpec(2, 32), StageSpec(1, 64))),
    ),
}


def _wide(name: str, after_block: int, widths: tuple[int, ...]) -> BranchSpec:
    return BranchSpec(
        name,
        after=(2, after_block),
        stages=tuple(StageSpec(1, w, stride=1, kind="conv") for w in widths),
    )


# ResNet-1202 (DKS supplement 2.1.3, Table 1, Fig. 4): three shallow-but-wide branches of 3x3,
# stride-1 conv layers: C2 [512], C3 [256, 512], C4 [128, 256, 512]. Fig. 4(a) (the fork points) is
# not legible in the text; stride-1 branches keep the papers' rule that every path has the same
# number of downsampling steps only if they fork inside conv4_x, so they fork after 150 (C2),
# 100 (C3) and 50 (C4) of its 200 blocks.
_RESNET1202_WIDE = (
    _wide("C2", 150, (512,)),
    _wide("C3", 100, (256, 512)),
    _wide("C4", 50, (128, 256, 512)),
)


MODELS = {
    # ResNet-8 (n=1): not in the papers; the smallest member of the family, for tests and demos.
    "cifar_resnet8": ModelSpec(
        CifarResNet, _stages(1),
        # "narrow": the paper's design at half the widths (DKS Table 6), the CPU demo's branches.
        {"paper": _paper((1, 1), 1), "simple": _RESNET32_ABLATIONS["simple"],
         "narrow": _narrow((1, 1), 1)},
        reference=(10, "not in the papers: He et al. 2016 6n+2 family with n=1"),
    ),
    # ResNet-14 and -20 (n=2, 3; ResNet-20 is in He et al. Table 6): the papers' branch rule at
    # their depth (C2: conv4_x at 128 x n blocks; C3: [32] x n, [64] x ceil(n/2), as ResNet-32's
    # 5 / 5, 3), and "narrow" at half the widths (DKS Table 6), the CPU study's branches.
    "cifar_resnet14": ModelSpec(
        CifarResNet, _stages(2),
        {"paper": _paper((2, 1), 2), "narrow": _narrow((2, 1), 2),
         "simple": _RESNET32_ABLATIONS["simple"]},
        reference=(10, "not in the papers: He et al. 2016 6n+2 family with n=2"),
    ),
    "cifar_resnet20": ModelSpec(
        CifarResNet, _stages(3),
        {"paper": _paper((3, 2), 3), "narrow": _narrow((3, 2), 3),
         "simple": _RESNET32_ABLATIONS["simple"]},
        reference=(10, "0.27M, He et al. 2016, Table 6"),
    ),
    "cifar_resnet32": ModelSpec(
        CifarResNet, _stages(5), {"paper": _paper((5, 3), 5), **_RESNET32_ABLATIONS},
        reference=(10, "0.46M, He et al. 2016, Table 6"),
    ),
    "cifar_resnet110": ModelSpec(
        CifarResNet, _stages(18), {"paper": _paper((9, 9), 18)},
        reference=(10, "1.7M, He et al. 2016, Table 6"),
    ),
    # aux="dhm": the DHM paper's ResNet-1202 branches (DHM supplement Table 1, code [[100, 100],
    # [200]]), built like those of ResNet-32/110; "paper" is DKS's shallow-but-wide design.
    "cifar_resnet1202": ModelSpec(
        CifarResNet, _stages(200), {"paper": _RESNET1202_WIDE, "dhm": _paper((100, 100), 200)},
        reference=(10, "19.4M, He et al. 2016, Table 6"),
    ),
}
