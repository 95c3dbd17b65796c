"""DHM (Dynamic Hierarchical Mimicking) with Bernoulli sampling of branches (DHM supplement D).

Presets: a CIFAR backbone name (default cifar_resnet32); every branch takes part in an epoch with
probability ``loss.mimic_prob`` (0.5), drawn once per epoch.
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
