"""ResNet-32 on CIFAR-10 with the papers' CIFAR recipe: baseline / ds / dks (and dsn, dhm, byot).

The CIFAR-10 half of the full-scale comparison (README, "The full-scale comparison on one GPU");
``cifar100_resnet32.py`` is the CIFAR-100 half (DKS Table 1). Usage:
--config=configs/cifar10_resnet32.py:dks (the preset is the method; default dks).
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.dataset = "cifar_resnet32", "cifar10"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
