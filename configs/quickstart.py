"""Quick start (``make demo``): DKS on the real CIFAR-10 images, a few minutes on 2 CPU cores.

A CIFAR ResNet-8 (the n=1 member of He et al.'s family) with the papers' two branch designs scaled
to it, trained for one epoch with a cosine schedule; progress, per-head accuracy, a checkpoint and
an export land in the workdir. The images come from ``data_dir`` (``make demo`` points it at
../shared/data when that exists, which holds cifar10-jpeg.tar.gz), otherwise from TFDS.
"""

from dks_jax import config_base


def get_config():
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.dataset = "cifar_resnet8", "cifar10"
    c.loader = "in_memory"
    c.batch_size, c.eval_batch_size = 64, 512
    c.num_epochs = 1.0
    c.lr_schedule, c.learning_rate, c.warmup_epochs = "cosine", 0.1, 0.05
    c.log_every_steps = 50
    c.eval_every_epochs = 1.0  # at the end
    c.checkpoint_every_epochs = 0.25
    return config_base.with_method(c, "dks")
