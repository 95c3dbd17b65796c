"""Quick start (``make demo``): DKS on the real CIFAR-10 images, a few minutes on 2 CPU cores.

A CIFAR ResNet-32 with the papers' two branches, trained for a fraction of an epoch with a short
cosine schedule; progress, per-head accuracy, a checkpoint and an export land in the workdir. The
images come from ``data_dir`` (``make demo`` points it at ../shared/data when that exists, which holds
cifar10-jpeg.tar.gz), otherwise from TFDS.
"""

from dks_jax import config_base


def get_config():
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.dataset = "cifar_resnet32", "cifar10"
    c.loader = "in_memory"
    c.batch_size, c.eval_batch_size = 64, 500
    c.num_epochs = 0.2
    c.lr_schedule, c.learning_rate, c.warmup_epochs = "cosine", 0.05, 0.02
    c.log_every_steps = 20
    c.eval_every_epochs = 1.0  # at the end
    c.checkpoint_every_epochs = 0.1
    return config_base.with_method(c, "dks")
