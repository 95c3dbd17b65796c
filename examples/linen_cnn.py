"""A Linen CNN trained with DKS: Flax Linen modules bridged to NNX (``flax.nnx.bridge``), stage by
stage, so that branches can attach between the stages.

Run it (one DKS training step on random images, then the per-head logits)::

    python examples/linen_cnn.py

or train it with the command-line trainer: ``--config.model=examples.linen_cnn:linen_cnn
--config.taps='stage1=simple,stage2=simple'`` with any config (run from the repository root).

A tap names an NNX submodule; ``nnx.bridge.ToNNX`` turns one Linen module into one NNX module,
whose Linen insides cannot be tapped. So the model below bridges each stage on its own: the stages
are ordinary Linen code, and the NNX class only strings them together. Two details of the bridge:
training mode passes ``mutable=["batch_stats"]`` so that Linen's BatchNorm may update its running
statistics (which the bridge writes back as ``nnx.BatchStat``), and the bridge's stored random
keys are dropped after initialisation (``to_nnx__rngs = None``): the trainer passes keys per call.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class Stage(nn.Module):
    """Linen: ``blocks`` x (3x3 conv, BatchNorm, ReLU), the first with ``stride``."""

    features: int
    blocks: int = 2
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.blocks):
            s = self.stride if i == 0 else 1
            x = nn.Conv(self.features, (3, 3), strides=(s, s), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return x


class Head(nn.Module):
    """Linen: global average pooling, then a dense classifier."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _bridge(module: nn.Module, x: jax.Array, rngs: nnx.Rngs) -> nnx.Module:
    bridged = nnx.bridge.ToNNX(module, rngs=rngs).lazy_init(x, train=False)
    bridged.to_nnx__rngs = None  # the trainer passes random keys per call
    return bridged


class LinenCNN(nnx.Module):
    """Three bridged Linen stages (16, 32, 64 channels) and a bridged Linen head."""

    def __init__(self, num_classes: int, *, image_size: int = 32, rngs: nnx.Rngs):
        x = jnp.zeros((1, image_size, image_size, 3))
        self.stage1 = _bridge(Stage(16), x, rngs)
        x = jnp.zeros((1, image_size, image_size, 16))
        self.stage2 = _bridge(Stage(32, stride=2), x, rngs)
        x = jnp.zeros((1, image_size // 2, image_size // 2, 32))
        self.stage3 = _bridge(Stage(64, stride=2), x, rngs)
        x = jnp.zeros((1, image_size // 4, image_size // 4, 64))
        self.head = _bridge(Head(num_classes), x, rngs)

    def __call__(self, images, *, train: bool = False):
        mutable = ["batch_stats"] if train else False
        x = images
        for stage in (self.stage1, self.stage2, self.stage3):
            x = stage(x, train=train, mutable=mutable)
        return self.head(x)


def linen_cnn(num_classes: int, *, rngs: nnx.Rngs) -> LinenCNN:
    """The factory the trainer calls (``config.model="examples.linen_cnn:linen_cnn"``)."""
    return LinenCNN(num_classes, rngs=rngs)


if __name__ == "__main__":
    import optax

    from dks_jax import attach, losses

    model = attach.attach(
        linen_cnn(10, rngs=nnx.Rngs(0)),
        {"stage1": "simple", "stage2": "simple"},
        num_classes=10,
        rngs=nnx.Rngs(1),
        example=jnp.zeros((1, 32, 32, 3)),
    )
    spec = losses.ObjectiveSpec(method="dks", num_heads=model.num_heads)
    tx = optax.sgd(0.1, momentum=0.9)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, images, labels):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, stats)
            loss, _ = losses.objective(
                m(images, train=True), labels, spec=spec, step=0, rng=jax.random.key(0)
            )
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    params, stats, opt_state, loss = step(params, stats, opt_state, images, labels)
    print(f"one DKS step on a bridged Linen CNN: loss {float(loss):.4f}")
    logits = nnx.merge(graphdef, params, stats)(images, train=False)
    print("heads:", model.head_names, [tuple(z.shape) for z in logits])
