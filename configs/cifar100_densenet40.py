"""DKS Table 1 (CIFAR-100): DenseNet (d=40, k=12) with baseline / ds / dks (and dsn, dhm, byot).

Usage: --config=configs/cifar100_densenet40.py:dks (the preset is the method; default dks).
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.cifar_densenet_recipe(config_base.base())
    c.model, c.dataset = "densenet40_k12", "cifar100"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
