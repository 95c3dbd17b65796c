"""DKS Table 3: auxiliary-classifier designs for ResNet-32 on CIFAR-100, with DS or DKS.

Presets ``<design>,<method>``: design in simple | ap_2fc | ap_conv_2fc | narrow | shallow | paper,
method in ds | dks. Example: --config=configs/ablation_aux_resnet32.py:narrow,dks

Recipe: ``base()``, then ``config_base.cifar_resnet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          cifar_resnet32, aux = the design (default "paper": C2, C3; docs/models.md)
    data           cifar100; augment "cifar": zero-pad 4, random 32x32 crop, horizontal flip
    epochs, batch  200, 64
    learning rate  0.1, step schedule: x0.1 at epochs 60, 120, 180
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 1e-4 (coupled L2, every parameter)
    method         the preset's, ds | dks (default dks): alpha 1.0 (each auxiliary CE); dks also
                   beta 1.0 (each synergy pair), pairs bidirectional, temperature 1, divergence ce
    source         DKS Table 3
"""

from dks_jax import config_base

DESIGNS = ("simple", "ap_2fc", "ap_conv_2fc", "narrow", "shallow", "paper")


def get_config(arg=None):
    design, _, method = (arg or "paper,dks").partition(",")
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.dataset = "cifar_resnet32", "cifar100"
    c.aux = config_base.parse_preset(design, "paper", DESIGNS)
    return config_base.with_method(c, config_base.parse_preset(method, "dks", ("ds", "dks")))
