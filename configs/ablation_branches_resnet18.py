"""DKS Table 4: DKS on ResNet-18 (ImageNet) with classifiers at different depths.

C1 is the main classifier, C2 after conv4_x, C3 after conv3_x, C4 after conv2_x.
Presets: C1 (baseline), C1C2, C1C3, C1C4, C1C2C3 (the paper's choice), C1C2C3C4.

Recipe: ``base()``, then ``config_base.imagenet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          resnet18, aux "paper", branches = the preset (default C1C2C3)
    data           imagenet2012 (train / validation), 224x224, streaming loader; augment
                   "imagenet_simple": resize to 256x256, random 224x224 crop, horizontal flip
    epochs, batch  100, 256
    learning rate  0.1, step schedule: x0.1 at epochs 30, 60, 90
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 1e-4 (coupled L2, every parameter)
    compute        bfloat16 (parameters float32); BatchNorm statistics over groups of 32 images
    method         dks: alpha 1.0 (each auxiliary CE), beta 1.0 (each synergy pair), pairs
                   bidirectional, temperature 1, divergence ce; preset C1: baseline, aux "none"
    source         DKS Table 4
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
