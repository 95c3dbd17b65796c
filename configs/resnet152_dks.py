"""ResNet-152 with DKS on ImageNet (DKS Table 2): Inception-style augmentation, batch 256, 100 epochs.

    python -m dks_jax.main --config=configs/resnet152_dks.py --workdir=gs://BUCKET/resnet152_dks \
        --config.data_dir=gs://BUCKET/tensorflow_datasets
"""

from dks_jax import config_base


def get_config():
    c = config_base.imagenet_recipe(config_base.base(), aggressive=True)
    c.model, c.aux = "resnet152", "paper"
    return config_base.with_method(c, "dks")
