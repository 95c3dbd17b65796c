"""DKS section 4.3: the three pairwise knowledge-matching strategies on ResNet-18 (ImageNet).

Presets: top_down | bottom_up | bidirectional (the DKS default).
"""

from dks_jax import config_base


def get_config(arg=None):
    c = config_base.imagenet_recipe(config_base.base())
    c.model = "resnet18"
    c.loss.pairs = config_base.parse_preset(arg, "bidirectional",
                                            ("top_down", "bottom_up", "bidirectional"))
    return config_base.with_method(c, "dks")
