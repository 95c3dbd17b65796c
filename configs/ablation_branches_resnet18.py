"""DKS Table 4: DKS on ResNet-18 (ImageNet) with classifiers at different depths.

C1 is the main classifier, C2 after conv4_x, C3 after conv3_x, C4 after conv2_x.
Presets: C1 (baseline), C1C2, C1C3, C1C4, C1C2C3 (the paper's choice), C1C2C3C4.
"""

from dks_jax import config_base

PRESETS = ("C1", "C1C2", "C1C3", "C1C4", "C1C2C3", "C1C2C3C4")


def get_config(arg=None):
    name = config_base.parse_preset(arg, "C1C2C3", PRESETS)
    c = config_base.imagenet_recipe(config_base.base())
    c.model = "resnet18"
    if name == "C1":
        return config_base.with_method(c, "baseline")
    c.branches = name
    return config_base.with_method(c, "dks")
