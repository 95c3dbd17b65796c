"""MobileNet (v1) on 32x32 inputs as in DKS supplement Table 5.

Main path (C1 row of the table): conv 3x3,32 -> depthwise-separable layers 64, 128, 128, 256, 256
(stride 1) -> 512 /2, 512 x 5 -> 1024 /2, 1024 -> global average pooling -> fc. A depthwise-separable
layer is dw conv3x3 (stride s)-BN-ReLU then pw conv1x1-BN-ReLU. Only the 512 and 1024 layers marked
"s2" in the table downsample, so the last feature map is 8x8 like the other CIFAR backbones.

Branches (Table 5): C3 forks before the 512 /2 layer and runs 512 /2, 512 x 3, 1024 /2, 1024; C2
forks before the 1024 /2 layer and runs 2048 /2, 2048.
"""

from __future__ import annotations

from flax import nnx

from dks_jax.models import layers
from dks_jax.models.branches import BranchSpec, StageSpec
from dks_jax.models.network import ModelSpec


class SeparableBlock(nnx.Module):
    """dw 3x3 (stride) -> BN -> ReLU -> pw 1x1 -> BN -> ReLU."""

    def __init__(self, in_features, out_features, stride, *, cfg, rngs):
        self.dw = layers.ConvBN(in_features, in_features, 3, stride=stride, groups=in_features,
                                cfg=cfg, rngs=rngs)
        self.pw = layers.ConvBN(in_features, out_features, 1, cfg=cfg, rngs=rngs)
        self.out_features = out_features

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, in_features]`` -> ``[B, ceil(H / stride), ceil(W / stride),
        out_features]`` (compute dtype). ``rngs`` is unused."""
        return self.pw(self.dw(x, train=train), train=train)


class MobileNet:
    """Family builders (stage width: channels, or one width per block)."""

    strides = (1, 2, 2)

    def stem(self, cfg, rngs):
        return layers.ConvBN(3, 32, 3, cfg=cfg, rngs=rngs)

    def stage(self, index, in_features, spec, cfg, rngs):
        stride = self.strides[index] if spec.stride is None else spec.stride
        widths = spec.width if isinstance(spec.width, tuple) else (spec.width,) * spec.blocks
        if len(widths) != spec.blocks:
            raise ValueError(f"{spec}: one width per block expected")
        blocks, ch = [], in_features
        for i, w in enumerate(widths):
            blocks.append(SeparableBlock(ch, w, stride if i == 0 else 1, cfg=cfg, rngs=rngs))
            ch = w
        return blocks

    def head_norm(self, features, cfg):
        return None


MODELS = {
    "mobilenet_cifar": ModelSpec(
        MobileNet,
        (StageSpec(5, (64, 128, 128, 256, 256)), StageSpec(6, 512), StageSpec(2, 1024)),
        {
            "paper": (
                BranchSpec("C2", after=1, stages=(StageSpec(2, 2048),)),
                BranchSpec("C3", after=0, stages=(StageSpec(4, 512), StageSpec(2, 1024))),
            )
        },
        reference=(1000, "4.2M (3.2M + 1000-way fc), Howard et al. 2017 (MobileNet-224)"),
    ),
}
