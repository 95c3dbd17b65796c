"""DKS section 4.3 (and DHM supplement E): DenseNet (d=40, k=12) on CIFAR-10 with corrupted labels.

Presets ``<method>,<noise>``: method baseline | ds | dks | dhm, noise a fraction (0, 0.5, 0.8).
Example: --config=configs/densenet40_noisy_cifar10.py:dks,0.5
"""

from dks_jax import config_base


def get_config(arg=None):
    method, _, noise = (arg or "dks,0.5").partition(",")
    c = config_base.cifar_densenet_recipe(config_base.base())
    c.model, c.dataset = "densenet40_k12", "cifar10"
    c.label_noise = float(noise or 0.5)
    if not 0.0 <= c.label_noise < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {c.label_noise}")
    return config_base.with_method(c, config_base.parse_preset(method, "dks",
                                                               ("baseline", "ds", "dks", "dhm")))
