"""DKS Table 5: each auxiliary branch of ResNet-18 (ImageNet) trained on its own.

Presets ``C2``, ``C3``: the network made of the main path's stem and stages up to that branch's
fork followed by the branch (``config.branch_alone``), trained as one plain network. Its top-1 is
compared with the same branch's head (C2 or C3) in the DKS run with both branches,
``configs/ablation_branches_resnet18.py:C1C2C3`` (DKS Table 5 reports 30.69 and 31.89 top-1 error
for C2 and C3 trained with DKS, gains of 3.23 and 2.39 over separate training).

Recipe: ``base()``, then ``config_base.imagenet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          resnet18 stem and stages up to the fork of branch C2 (preset) of aux "paper",
                   then that branch: one head
    data           imagenet2012 (train / validation), 224x224, streaming loader; augment
                   "imagenet_simple": resize to 256x256, random 224x224 crop, horizontal flip
    epochs, batch  100, 256
    learning rate  0.1, step schedule: x0.1 at epochs 30, 60, 90
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 1e-4 (coupled L2, every parameter)
    compute        bfloat16 (parameters float32); BatchNorm statistics over groups of 32 images
    method         baseline: cross-entropy of the one head (no auxiliary or synergy term)
    source         DKS Table 5
"""

from dks_jax import config_base


def get_config(arg=None):
    branch = config_base.parse_preset(arg, "C2", ("C2", "C3"))
    c = config_base.imagenet_recipe(config_base.base())
    c.model, c.aux = "resnet18", "paper"
    c.method, c.branch_alone = "baseline", branch
    return c
