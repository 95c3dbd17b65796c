"""DKS section 4.3 (and DHM supplement E): DenseNet (d=40, k=12) on CIFAR-10 with corrupted labels.

Presets ``<method>,<noise>``: method baseline | ds | dks | dhm, noise a fraction (0, 0.5, 0.8).
Example: --config=configs/densenet40_noisy_cifar10.py:dks,0.5

Recipe: ``base()``, then ``config_base.cifar_densenet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          densenet40_k12, aux "paper" (C2, C3; docs/models.md)
    data           cifar10 with label_noise = the preset's fraction (default 0.5) of training
                   labels replaced by another class; augment "cifar": zero-pad 4, random 32x32
                   crop, horizontal flip
    epochs, batch  300, 64
    learning rate  0.1, step schedule: x0.1 at epochs 150, 225
    optimizer      SGD, momentum 0.9, Nesterov on; weight decay 1e-4 (coupled L2, every parameter)
    method         the preset's (default dks): alpha 1.0 (each auxiliary CE), beta 1.0 (each
                   synergy pair), pairs bidirectional, temperature 1, divergence ce; baseline
                   trains with aux "none"; dhm: each branch takes part with probability 0.5
    source         DKS section 4.3, DHM supplement E
"""

from dks_jax import config_base


def get_config(arg=None):
    method, _, noise = (arg or "dks,0.5").partition(",")
    c = config_base.cifar_densenet_recipe(config_base.base())
    c.model, c.dataset = "densenet40_k12", "cifar10"
    c.label_noise = float(noise or 0.5)
    if not 0.0 <= c.label_noise < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {c.label_noise}")
    return config_base.with_method(c, config_base.parse_preset(method, "dks",
                                                               ("baseline", "ds", "dks", "dhm")))
