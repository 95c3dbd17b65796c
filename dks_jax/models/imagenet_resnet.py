"""ImageNet ResNets in torchvision's layout (ResNet v1.5: a bottleneck's stride is on its 3x3).

Main path: conv1 7x7,64 /2 -> max pool 3x3 /2 -> conv2_x .. conv5_x (64/128/256/512 planes,
basic or bottleneck blocks, 1x1 projection shortcuts with BN) -> global average pooling -> fc.

Branches (DKS supplement Table 7 / DHM supplement Table 4; DHM code ``[[1, 2], [2]]`` for ResNet-18
etc.): C3 forks after conv3_x and runs its own conv4_x, conv5_x at the backbone widths with fewer
blocks; C2 forks after conv4_x and runs conv5_x at twice the width (1024 planes). ResNet-18 also
has C4 (DKS Table 4) after conv2_x, with one block in conv3_x and conv4_x and two in conv5_x, and
the "simple" design of DKS Fig. 3 / supplement Fig. 6 (average pool to 4x4, one fc).
"""

from __future__ import annotations

import jax
from flax import nnx

from dks_jax.models import layers
from dks_jax.models.branches import BranchSpec, StageSpec
from dks_jax.models.network import ModelSpec

PLANES = (64, 128, 256, 512)


class Stem(nnx.Module):
    """conv 7x7/2 -> BN -> ReLU -> max pool 3x3/2."""

    def __init__(self, cfg, rngs):
        self.conv = layers.ConvBN(3, 64, 7, stride=2, cfg=cfg, rngs=rngs)
        self.out_features = 64

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, 3]`` -> ``[B, ceil(H / 4), ceil(W / 4), 64]`` (compute dtype)."""
        return layers.max_pool(self.conv(x, train=train), 3, 2, 1)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, in_features, planes, stride, *, zero_init, cfg, rngs):
        out = planes * self.expansion
        self.conv1 = layers.ConvBN(in_features, planes, 3, stride=stride, cfg=cfg, rngs=rngs)
        self.conv2 = layers.ConvBN(planes, out, 3, relu=False, zero_init=zero_init, cfg=cfg,
                                   rngs=rngs)
        self.downsample = _projection(in_features, out, stride, cfg, rngs)
        self.out_features = out

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, in_features]`` -> ``[B, ceil(H / stride), ceil(W / stride), planes]``
        (compute dtype). ``rngs`` is unused."""
        y = self.conv2(self.conv1(x, train=train), train=train)
        r = x if self.downsample is None else self.downsample(x, train=train)
        return layers.materialize(jax.nn.relu(y + r))


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_features, planes, stride, *, zero_init, cfg, rngs):
        out = planes * self.expansion
        self.conv1 = layers.ConvBN(in_features, planes, 1, cfg=cfg, rngs=rngs)
        self.conv2 = layers.ConvBN(planes, planes, 3, stride=stride, cfg=cfg, rngs=rngs)
        self.conv3 = layers.ConvBN(planes, out, 1, relu=False, zero_init=zero_init, cfg=cfg,
                                   rngs=rngs)
        self.downsample = _projection(in_features, out, stride, cfg, rngs)
        self.out_features = out

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, in_features]`` -> ``[B, ceil(H / stride), ceil(W / stride), 4 *
        planes]`` (compute dtype). ``rngs`` is unused."""
        y = self.conv3(self.conv2(self.conv1(x, train=train), train=train), train=train)
        r = x if self.downsample is None else self.downsample(x, train=train)
        return layers.materialize(jax.nn.relu(y + r))


def _projection(in_features, out, stride, cfg, rngs):
    if stride == 1 and in_features == out:
        return None
    return layers.ConvBN(in_features, out, 1, stride=stride, relu=False, cfg=cfg, rngs=rngs)


class ImageNetResNet:
    """Family builders for torchvision-layout ResNets."""

    strides = (1, 2, 2, 2)

    def __init__(self, block: str = "basic", zero_init_residual: bool = False):
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        self.block = BasicBlock if block == "basic" else Bottleneck
        self.zero_init_residual = zero_init_residual

    def stem(self, cfg, rngs):
        return Stem(cfg, rngs)

    def stage(self, index, in_features, spec, cfg, rngs):
        stride = self.strides[index] if spec.stride is None else spec.stride
        blocks, ch = [], in_features
        for i in range(spec.blocks):
            block = self.block(ch, spec.width, stride if i == 0 else 1,
                               zero_init=self.zero_init_residual, cfg=cfg, rngs=rngs)
            blocks.append(block)
            ch = block.out_features
        return blocks

    def head_norm(self, features, cfg):
        return None


def _paper(c3: tuple[int, int], c2: int, c4: bool = False) -> tuple[BranchSpec, ...]:
    """C2 after conv4_x: conv5_x [1024 planes] x c2; C3 after conv3_x: [256] x c3[0], [512] x c3[1]."""
    branches: tuple[BranchSpec, ...] = (
        BranchSpec("C2", after=2, stages=(StageSpec(c2, 1024),)),
        BranchSpec("C3", after=1, stages=(StageSpec(c3[0], 256), StageSpec(c3[1], 512))),
    )
    if c4:  # DKS Table 4 / supplement Table 7 (ResNet-18 only); off unless asked for
        branches += (
            BranchSpec(
                "C4", after=0,
                stages=(StageSpec(1, 128), StageSpec(1, 256), StageSpec(2, 512)),
                default=False,
            ),
        )
    return branches


# DKS Fig. 3 and supplement Fig. 6: average pooling to 4x4 then one fc. C2 (conv4_x, 14x14x256):
# kernel 5, stride 3, padding 1; C3 (conv3_x, 28x28x128): kernel 7, stride 7, padding 3.
_SIMPLE = (
    BranchSpec("C2", after=2, pool=(5, 3, 1)),
    BranchSpec("C3", after=1, pool=(7, 7, 3)),
)


def _model(block: str, depths: tuple[int, ...], aux: dict, published: str) -> ModelSpec:
    return ModelSpec(
        ImageNetResNet,
        tuple(StageSpec(n, p) for n, p in zip(depths, PLANES, strict=True)),
        aux,
        options={"block": block},
        image_size=224,
        reference=(1000, f"{published}, torchvision.models"),
    )


MODELS = {
    "resnet18": _model(
        "basic", (2, 2, 2, 2), {"paper": _paper((1, 2), 2, c4=True), "simple": _SIMPLE},
        "11,689,512",
    ),
    "resnet34": _model(
        "basic", (3, 4, 6, 3), {"paper": _paper((3, 2), 3)}, "21,797,672"
    ),
    "resnet50": _model(
        "bottleneck", (3, 4, 6, 3), {"paper": _paper((3, 2), 3)}, "25,557,032"
    ),
    "resnet101": _model(
        "bottleneck", (3, 4, 23, 3), {"paper": _paper((12, 2), 3)},
        "44,549,160",
    ),
    "resnet152": _model(
        "bottleneck", (3, 8, 36, 3), {"paper": _paper((18, 2), 3)},
        "60,192,808",
    ),
}
