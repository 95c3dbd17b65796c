"""DKS Table 1 (CIFAR-100): DenseNet (d=40, k=12) with baseline / ds / dks (and dsn, dhm, byot).

Usage: --config=configs/cifar100_densenet40.py:dks (the preset is the method; default dks).

Recipe: ``base()``, then ``config_base.cifar_densenet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          densenet40_k12, aux "paper" (C2, C3; docs/models.md)
    data           cifar100; augment "cifar": zero-pad 4, random 32x32 crop, horizontal flip
    epochs, batch  300, 64
    learning rate  0.1, step schedule: x0.1 at epochs 150, 225
    optimizer      SGD, momentum 0.9, Nesterov on; weight decay 1e-4 (coupled L2, every parameter)
    method         the preset (default dks): alpha 1.0 (each auxiliary CE), beta 1.0 (each
                   synergy pair), pairs bidirectional, temperature 1, divergence ce; baseline
                   trains with aux "none"; byot: temperature 3, divergence kl
    source         DKS Table 1 (CIFAR-100)
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.cifar_densenet_recipe(config_base.base())
    c.model, c.dataset = "densenet40_k12", "cifar100"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
