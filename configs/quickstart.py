"""Quick start (``make demo``): DKS on the real CIFAR-10 images, about 2.5 minutes on 2 CPU cores.

A CIFAR ResNet-8 (the n=1 member of He et al.'s family) with the papers' two branch designs at half
their widths (``aux="narrow"``, DKS Table 6), trained with the DKS objective for 0.65 of an epoch:
batch 64, Nesterov SGD, learning rate 0.2 on a cosine schedule with a short warm-up, no augmentation
(in so short a run random crops and flips cost more accuracy than they protect against
overfitting). The evaluation covers all 10,000 test images. Progress, per-head accuracy, a checkpoint
and an export land in the workdir. The images come from ``data_dir`` (``make demo`` points it at
../shared/data when that exists, which holds cifar10-jpeg.tar.gz), otherwise TFDS downloads CIFAR-10.

Recipe: ``base()``, then ``config_base.cifar_resnet_recipe``, then this file
(all the recipes side by side: docs/design.md, "The papers' recipes"):

    model          cifar_resnet8, aux "narrow" (C2, C3)
    data           cifar10, in-memory loader, augment "none"; all 10,000 test images (eval batch 500)
    epochs, batch  0.65, 64
    learning rate  0.2, cosine decay to 0 after a linear warm-up of 0.05 epoch
    optimizer      SGD, momentum 0.9, Nesterov on; weight decay 1e-4 (coupled L2, every parameter)
    method         dks: alpha 1.0 (each auxiliary CE), beta 1.0 (each synergy pair), pairs
                   bidirectional, temperature 1, divergence ce
    source         no paper table: the demo
"""

from dks_jax import config_base


def get_config():
    c = config_base.cifar_resnet_recipe(config_base.base())
    c.model, c.aux, c.dataset = "cifar_resnet8", "narrow", "cifar10"
    c.loader, c.augment = "in_memory", "none"
    c.batch_size, c.eval_batch_size = 64, 500
    c.num_epochs = 0.65
    c.lr_schedule, c.learning_rate, c.nesterov, c.warmup_epochs = "cosine", 0.2, True, 0.05
    c.log_every_steps = 50
    c.eval_every_epochs = 1.0  # at the end
    c.checkpoint_every_epochs = 0.25
    c.log_grad_consistency = False  # a second compilation at evaluation; on for real runs
    return config_base.with_method(c, "dks")
