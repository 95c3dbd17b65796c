"""DKS Table 1 (CIFAR-100): WRN-28-10 with baseline / ds / dks (and dsn, dhm, byot).

Usage: --config=configs/cifar100_wrn28_10.py:dks (the preset is the method; default dks).

Recipe: ``base()``, then ``config_base.cifar_wrn_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          wrn28_10, aux "paper" (C2, C3; docs/models.md)
    data           cifar100; augment "cifar": zero-pad 4, random 32x32 crop, horizontal flip
    epochs, batch  200, 128
    learning rate  0.1, step schedule: x0.2 at epochs 60, 120, 160
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 5e-4 (coupled L2, every parameter)
    method         the preset (default dks): alpha 1.0 (each auxiliary CE), beta 1.0 (each
                   synergy pair), pairs bidirectional, temperature 1, divergence ce; baseline
                   trains with aux "none"; byot: temperature 3, divergence kl
    source         DKS Table 1 (CIFAR-100)
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.cifar_wrn_recipe(config_base.base())
    c.model, c.dataset = "wrn28_10", "cifar100"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
