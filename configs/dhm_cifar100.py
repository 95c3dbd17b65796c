"""DHM (Dynamic Hierarchical Mimicking) with Bernoulli sampling of branches (DHM supplement D).

Presets: a CIFAR backbone name (default cifar_resnet32); every branch takes part in an epoch with
probability ``loss.mimic_prob`` (0.5), drawn once per epoch.

Recipe: ``base()``, then the backbone's recipe of ``config_base`` (RECIPES below), then this file
(all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          the preset (default cifar_resnet32), aux "paper" (C2, C3; docs/models.md)
    data           cifar100; augment "cifar": zero-pad 4, random 32x32 crop, horizontal flip
    epochs, batch  ResNet, MobileNet: 200, 64; DenseNet: 300, 64; WRN: 200, 128
    learning rate  0.1; step schedule x0.1 at epochs 60, 120, 180 (ResNet, MobileNet; the
                   default), x0.1 at 150, 225 (DenseNet), x0.2 at 60, 120, 160 (WRN)
    optimizer      SGD, momentum 0.9, Nesterov on for DenseNet only; weight decay 1e-4 (WRN:
                   5e-4), coupled L2 on every parameter
    method         dhm: mimic_prob 0.5, alpha 1.0 (each auxiliary CE), beta 1.0 (each synergy
                   pair), pairs bidirectional, temperature 1, divergence ce
    source         DHM supplement D
"""

from dks_jax import config_base

RECIPES = {"cifar_resnet32": "cifar_resnet_recipe", "cifar_resnet110": "cifar_resnet_recipe",
           "mobilenet_cifar": "cifar_resnet_recipe", "densenet40_k12": "cifar_densenet_recipe",
           "densenet100_k12": "cifar_densenet_recipe", "densenet_bc100_k12": "cifar_densenet_recipe",
           "wrn16_8": "cifar_wrn_recipe", "wrn28_4": "cifar_wrn_recipe",
           "wrn28_10": "cifar_wrn_recipe"}


def get_config(arg=None):
    model = config_base.parse_preset(arg, "cifar_resnet32", RECIPES)
    c = getattr(config_base, RECIPES[model])(config_base.base())
    c.model, c.dataset = model, "cifar100"
    c.loss.mimic_prob = 0.5
    return config_base.with_method(c, "dhm")
