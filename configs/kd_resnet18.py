"""DKS Table 6: knowledge distillation from a ResNet-50 teacher into ResNet-18 (ImageNet).

Presets: c1 (standard KD on the main head), c1_ds (KD on C1 plus deep supervision), c2c3_ds (KD on
the auxiliary heads C2 and C3 plus DS). The teacher is the export of a resnet50 baseline run:
    --config.loss.teacher_checkpoint=gs://BUCKET/resnet50_baseline/export
The paper searched T in 1, 2, 5, 10, 20 per setting: set --config.loss.temperature.

Recipe: ``base()``, then ``config_base.imagenet_recipe``, then this file
(the default preset's values; all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          resnet18; c1: aux "none"; c1_ds, c2c3_ds: aux "paper" (C2, C3)
    data           imagenet2012 (train / validation), 224x224, streaming loader; augment
                   "imagenet_simple": resize to 256x256, random 224x224 crop, horizontal flip
    epochs, batch  100, 256
    learning rate  0.1, step schedule: x0.1 at epochs 30, 60, 90
    optimizer      SGD, momentum 0.9, Nesterov off; weight decay 1e-4 (coupled L2, every parameter)
    compute        bfloat16 (parameters float32); BatchNorm statistics over groups of 32 images
    method         kd from teacher_model resnet50, temperature 2.0, kd_weight 1.0, on kd_heads
                   (0,) (c1, c1_ds) or (1, 2) (c2c3_ds); alpha (each auxiliary CE) 0.0 (c1) or
                   1.0 (c1_ds, c2c3_ds)
    source         DKS Table 6
"""

from dks_jax import config_base

PRESETS = {"c1": ("none", (0,), 0.0), "c1_ds": ("paper", (0,), 1.0),
           "c2c3_ds": ("paper", (1, 2), 1.0)}


def get_config(arg=None):
    name = config_base.parse_preset(arg, "c1", PRESETS)
    c = config_base.imagenet_recipe(config_base.base())
    c.model, c.method = "resnet18", "kd"
    c.aux, c.loss.kd_heads, c.loss.alpha = PRESETS[name]
    c.loss.teacher_model = "resnet50"
    c.loss.temperature = 2.0
    return c
