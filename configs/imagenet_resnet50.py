"""DKS Table 2 (ImageNet): ResNet-50, simple augmentation with baseline / ds / dks.

Usage: --config=configs/imagenet_resnet50.py:dks (the preset is the method; default dks).

Recipe: ``base()``, then ``config_base.imagenet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          resnet50, aux "paper" (C2 after conv4_x, C3 after conv3_x)
    data           imagenet2012 (train / validation), 224x224, streaming loader; augment
                   "imagenet_simple": resize to 256x256, random 224x224 crop, horizontal flip
    epochs, batch  100, 256
    learning rate  0.1, step schedule: x0.1 at epochs 30, 60, 90
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 1e-4 (coupled L2, every parameter)
    compute        bfloat16 (parameters float32); BatchNorm statistics over groups of 32 images
    method         the preset (default dks): alpha 1.0 (each auxiliary CE), beta 1.0 (each
                   synergy pair), pairs bidirectional, temperature 1, divergence ce; baseline
                   trains with aux "none"; byot: temperature 3, divergence kl
    source         DKS Table 2 (ImageNet)
"""

from dks_jax import config_base


def get_config(method=None):
    c = config_base.imagenet_recipe(config_base.base(), aggressive=False)
    c.model = "resnet50"
    return config_base.with_method(c, config_base.parse_preset(method, "dks", config_base.METHODS))
