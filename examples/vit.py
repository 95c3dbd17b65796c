"""A small Vision Transformer written in plain ``flax.nnx`` (nothing from dks_jax), trained with
auxiliary branches attached from outside (``dks_jax.attach``).

Train it with DKS through the command line, from the repository root (the factory is found as
``examples.vit:vit_small``; ``configs/vit_cifar10_dks.py`` names it and its taps)::

    python -m dks_jax.main --config=configs/vit_cifar10_dks.py --workdir=/tmp/vit_dks

or in a notebook::

    from dks_jax import attach
    vit = vit_small(10, rngs=nnx.Rngs(0))
    wrapped = attach.attach(vit, {"blocks.2": "tokens_cls", "blocks.4": "tokens_cls"},
                            num_classes=10, rngs=nnx.Rngs(1),
                            example=jnp.zeros((1, 32, 32, 3)))
    main, c2, c3 = wrapped(images)           # main head, then blocks.4's branch, then blocks.2's

The model follows common ViT practice for 32 x 32 images (patches of 4 x 4, a class token, learned
position embeddings, pre-LN blocks); its call takes the images only, as most models written
elsewhere do: the trainer's ``train=`` / ``rngs=`` are not passed to it (it has no dropout or
BatchNorm to switch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """Pre-LN transformer block: multi-head self-attention, then an MLP with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, dtype=dtype, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
        self.mlp2 = nnx.Linear(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))


class ViT(nnx.Module):
    """Images ``[B, H, W, 3]`` -> logits ``[B, num_classes]`` (from the class token)."""

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: int = 2,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        tokens = (image_size // patch) ** 2
        self.patch = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens + 1, dim)))
        self.blocks = nnx.List([Block(dim, heads, mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token.get_value(), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls.astype(x.dtype), x], axis=1) + self.pos.get_value()
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit_small(num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ViT:
    """Width 64, 6 blocks, 4 heads (about 0.2 M parameters): a ViT that trains on a CPU."""
    return ViT(num_classes, dim=64, depth=6, heads=4, dtype=dtype, rngs=rngs)


def vit_tiny(num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ViT:
    """Width 16, 3 blocks, 2 heads: for tests."""
    return ViT(num_classes, dim=16, depth=3, heads=2, dtype=dtype, rngs=rngs)
