"""A ViT written outside this project (``examples/vit.py``), with branches attached from outside.

``config.model`` names a factory (``module:function``) instead of a registry model, and
``config.taps`` where the branches attach (``dks_jax.attach``; docs/models.md, "Branches on your
own model"): a class-token LayerNorm + linear head after blocks 2 and 4 of the 6. Run from the
repository root (so that ``examples.vit`` imports); the preset is the method (default dks):

    python -m dks_jax.main --config=configs/vit_cifar10_dks.py:dks --workdir=/tmp/vit_dks \\
        --config.data_dir=../shared/data

Recipe: ``base()``, then this file (a CPU-sized ViT recipe, not a paper's):

    model          examples.vit:vit_small (width 64, 6 blocks, 4 heads, patches 4x4), taps
                   blocks.2 and blocks.4, design "tokens_cls"; BYOT's classifier "head"
    data           cifar10: 10,000 training images (train_examples 10000), in-memory loader, all
                   10,000 test images (eval batch 500); augment "cifar": zero-pad 4, random 32x32
                   crop, horizontal flip
    epochs, batch  10, 128
    learning rate  0.002, cosine decay to 0 after a linear warm-up of 1 epoch
    optimizer      AdamW (b1 0.9, b2 0.999), decoupled weight decay 0.05 on kernels only
    method         the preset (default dks): alpha 1.0 (each auxiliary CE), beta 1.0 (each
                   synergy pair), pairs bidirectional, temperature 1, divergence ce; baseline
                   trains the ViT alone; byot: temperature 3, divergence kl
    source         no paper table: an example of DKS on a model of one's own
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.base()
    c.model = "examples.vit:vit_small"
    c.taps, c.classifier = "blocks.2=tokens_cls, blocks.4=tokens_cls", "head"
    c.dataset, c.loader, c.train_examples = "cifar10", "in_memory", 10000
    c.batch_size, c.eval_batch_size, c.num_epochs = 128, 500, 10.0
    c.optimizer, c.learning_rate, c.weight_decay, c.weight_decay_mask = "adamw", 0.002, 0.05, "kernels"
    c.lr_schedule, c.warmup_epochs = "cosine", 1.0
    c.log_every_steps = 20
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
