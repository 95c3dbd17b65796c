"""DKS Table 6: knowledge distillation from a ResNet-50 teacher into ResNet-18 (ImageNet).

Presets: c1 (standard KD on the main head), c1_ds (KD on C1 plus deep supervision), c2c3_ds (KD on
the auxiliary heads C2 and C3 plus DS). The teacher is the export of a resnet50 baseline run:
    --config.loss.teacher_checkpoint=gs://BUCKET/resnet50_baseline/export
The paper searched T in 1, 2, 5, 10, 20 per setting: set --config.loss.temperature.
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
