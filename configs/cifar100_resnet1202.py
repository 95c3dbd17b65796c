"""DKS Table 1 / section 4.3 (CIFAR-100): ResNet-1202 with three shallow-but-wide branches.

Usage: --config=configs/cifar100_resnet1202.py:dks (the preset is the method; default dks).
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.dataset = "cifar_resnet1202", "cifar100"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
