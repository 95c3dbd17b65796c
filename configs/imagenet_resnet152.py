"""DKS Table 2 (ImageNet): ResNet-152, Inception-style (aggressive) augmentation with baseline / ds / dks.

Usage: --config=configs/imagenet_resnet152.py:dks (the preset is the method; default dks).
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.imagenet_recipe(config_base.base(), aggressive=True)
    c.model = "resnet152"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
