"""DKS Table 5: each auxiliary branch of ResNet-18 (ImageNet) trained on its own.

Presets ``C2``, ``C3``: the network made of the main path's stem and stages up to that branch's
fork followed by the branch (``config.branch_alone``), trained as one plain network. Its top-1 is
compared with the same branch's head (C2 or C3) in the DKS run with both branches,
``configs/ablation_branches_resnet18.py:C1C2C3`` (DKS Table 5 reports 30.69 and 31.89 top-1 error
for C2 and C3 trained with DKS, gains of 3.23 and 2.39 over separate training).
"""

from dks_jax import config_base


def get_config(arg=None):
    branch = config_base.parse_preset(arg, "C2", ("C2", "C3"))
    c = config_base.imagenet_recipe(config_base.base())
    c.model, c.aux = "resnet18", "paper"
    c.method, c.branch_alone = "baseline", branch
    return c
