"""The CPU evidence study (results/cpu_study/README.md has the protocol): does DKS help, at 2-core scale?

CIFAR ResNet-14 (He et al.'s 6n+2 family, n=2) on a fixed class-balanced 10,000-image subset of the
CIFAR-10 training images (1,000 per class), evaluated on all 10,000 test images; 12 epochs, batch
64, SGD momentum 0.9, learning rate 0.1 with a half-epoch linear warm-up and cosine decay, weight
decay 1e-4 (the papers' CIFAR ResNet recipe, its schedule compressed), random crops and flips.
DS, DKS and DHM use the papers' branch design for this depth at half its widths (``aux="narrow"``:
C2 [64] x 2 after conv3_x, C3 [16] x 2, [32] x 1 after conv2_x; DKS Table 6's "Narrow").

Presets ``<method>[,<noise>]``: method baseline | ds | dks | dhm, noise the fraction of training
labels replaced by another class (default 0; the study's noisy setting is 0.5, as in DKS
section 4.3). Example: --config=configs/cpu_study.py:dks,0.5

Recipe: ``base()``, then ``config_base.cifar_resnet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          cifar_resnet14, aux "narrow" (C2, C3)
    data           cifar10: 10,000 training images (train_examples 10000), in-memory loader, all
                   10,000 test images (eval batch 500); label_noise = the preset's fraction
                   (default 0); augment "cifar": zero-pad 4, random 32x32 crop, horizontal flip
    epochs, batch  12, 64
    learning rate  0.1, cosine decay to 0 after a linear warm-up of 0.5 epoch
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 1e-4 (coupled L2, every parameter)
    method         the preset's (default dks): alpha 1.0 (each auxiliary CE), beta 1.0 (each
                   synergy pair), pairs bidirectional, temperature 1, divergence ce; baseline
                   trains with aux "none"; dhm: each branch takes part with probability 0.5
    source         no paper table: the CPU study (results/cpu_study/README.md)
"""

from dks_jax import config_base


def get_config(arg=None):
    method, _, noise = (arg or "dks").partition(",")
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.aux, c.dataset = "cifar_resnet14", "narrow", "cifar10"
    c.loader, c.train_examples = "in_memory", 10_000
    c.label_noise = float(noise or 0.0)
    if not 0.0 <= c.label_noise < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {c.label_noise}")
    c.num_epochs = 12.0
    c.lr_schedule, c.warmup_epochs = "cosine", 0.5
    c.eval_batch_size = 500
    c.log_every_steps = 78  # twice an epoch (156 steps)
    c.eval_every_epochs = 3.0
    c.checkpoint_every_epochs = 1.0
    return config_base.with_method(
        c, config_base.parse_preset(method, "dks", ("baseline", "ds", "dks", "dhm")))
