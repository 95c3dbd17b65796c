"""DKS Table 3: auxiliary-classifier designs for ResNet-32 on CIFAR-100, with DS or DKS.

Presets ``<design>,<method>``: design in simple | ap_2fc | ap_conv_2fc | narrow | shallow | paper,
method in ds | dks. Example: --config=configs/ablation_aux_resnet32.py:narrow,dks
"""

from dks_jax import config_base

DESIGNS = ("simple", "ap_2fc", "ap_conv_2fc", "narrow", "shallow", "paper")


def get_config(arg=None):
    design, _, method = (arg or "paper,dks").partition(",")
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.dataset = "cifar_resnet32", "cifar100"
    c.aux = config_base.parse_preset(design, "paper", DESIGNS)
    return config_base.with_method(c, config_base.parse_preset(method, "dks", ("ds", "dks")))
