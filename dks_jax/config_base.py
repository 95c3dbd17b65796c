"""The shared base of every config in ``configs/``, and the papers' recipes (docs/design.md).

A config file is a few lines: ``get_config()`` starts from ``base()``, applies a recipe and sets what
differs. Durations are in epochs; steps are derived at run time from the data set and batch size, so
``--config.batch_size=...`` keeps the schedule right. Nothing derived is stored in the config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from dks_jax import errors, paths
from dks_jax.losses import METHODS

__all__ = ["METHODS", "base", "from_run", "load", "flatten", "override", "parse_preset", "to_dict",
           "with_method"]


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Model (dks_jax.models.create).
    c.model = "cifar_resnet32"  # a registry name, or a factory "module:function" (docs/models.md)
    c.aux = "paper"  # paper | none | simple | ap_2fc | ap_conv_2fc | narrow | shallow
    c.branches = ""  # active classifiers by DKS name, e.g. "C1C2C3"; "" = the design's default set
    c.branch_alone = ""  # e.g. "C2": train that branch of `aux` alone as one network (DKS Table 5)
    c.num_classes = 0  # 0 = the data set's number of classes
    c.dropout = 0.0  # WRN only (0.3 in the papers' strong-regularisation rows)
    c.zero_init_residual = False
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.bn_group_size = 0  # BatchNorm statistics over groups of this many examples; 0 = whole batch
    # A factory model's branches (dks_jax.attach): "<submodule path>=<design>, ...", e.g.
    # "blocks.2=tokens_cls, blocks.4=transformer_cls"; and, for BYOT's feature hints, the path of
    # its classifier (whose input is the main feature), e.g. "head".
    c.taps = ""
    c.classifier = ""

    # Objective (dks_jax.losses.objective).
    c.method = "dks"
    c.loss = ml_collections.ConfigDict()
    c.loss.alpha = 1.0  # weight of each auxiliary cross-entropy (DS, DKS, DHM; DSN's alpha_m)
    c.loss.beta = 1.0  # weight of each synergy pair (DKS, DHM, BYOT)
    c.loss.pairs = "bidirectional"  # top_down | bottom_up | bidirectional
    c.loss.temperature = 1.0
    c.loss.divergence = "ce"  # ce (the paper) | kl
    c.loss.label_smoothing = 0.0
    c.loss.gamma = 0.0  # DSN companion threshold
    c.loss.dsn_companion = "ce"  # ce | squared_hinge
    c.loss.dsn_zero_fraction = 1.0  # DSN: alpha reaches 0 at this fraction of training
    c.loss.dsn_schedule = "linear"  # DSN zero-ing: linear (decays to 0) | step (drops to 0)
    c.loss.dsn_norm = "inside"  # DSN Eq. 3: ||w||^2 inside the hinge | weight_decay (left to it)
    c.loss.byot_alpha = 0.3  # BYOT: distillation weight (label term 1 - alpha), authors' code
    c.loss.byot_lambda = 0.03  # BYOT: hint (feature L2) weight, authors' code
    c.loss.mimic_prob = 0.5  # DHM: probability that a branch takes part in an epoch
    c.loss.kd_weight = 1.0
    c.loss.kd_heads = (0,)  # heads taught by the teacher (KD)
    c.loss.teacher_model = ""  # KD: registry name of the teacher
    c.loss.teacher_checkpoint = ""  # KD: the `export/` folder of a run of this code

    # Data (dks_jax.data.create).
    c.dataset = "cifar100"  # TFDS name, or a path to an image folder / .tar / .tar.gz
    c.data_dir = ""  # TFDS data_dir, and where image-folder copies of named data sets are looked for
    c.download = True  # a TFDS name that is not prepared in data_dir is downloaded (needs internet)
    c.train_split = "train"
    c.eval_split = "test"
    c.loader = "auto"  # auto | in_memory | streaming | grain
    c.grain_workers = 0  # loader=grain: worker processes decoding and augmenting (0 = in-process)
    c.augment = "cifar"  # cifar | imagenet_simple | imagenet_inception | none
    c.image_size = 32
    c.resize_mode = "both_sides"  # ImageNet "simple" augmentation: both_sides | shorter_side
    c.cutout = 0
    c.label_noise = 0.0
    c.train_examples = 0  # > 0: a fixed class-balanced subset of the training split (in-memory data)

    # Optimisation.
    c.batch_size = 64  # global, over all devices of all hosts
    c.eval_batch_size = 0  # 0 = batch_size
    c.num_epochs = 200.0
    c.seed = 0
    c.num_seeds = 1  # > 1: seeds seed, seed+1, ... trained at once, the state vmapped (in-memory data)
    c.optimizer = "sgd"  # sgd (the papers') | adamw
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.weight_decay_mask = "all"  # all (the papers' PyTorch) | kernels
    c.lr_schedule = "step"  # step | cosine | constant
    c.lr_boundaries = (60.0, 120.0, 180.0)  # epochs (step schedule)
    c.lr_decay_factor = 0.1
    c.warmup_epochs = 0.0

    # Logging, evaluation, checkpoints.
    c.log_every_steps = 100
    c.eval_every_epochs = 1.0
    c.log_grad_consistency = True  # cosine of main vs branch gradients at every evaluation
    c.checkpoint_every_epochs = 1.0
    c.max_to_keep = 3
    c.async_checkpointing = True
    c.profile_steps = 0  # > 0: write a profiler trace of this many steps after the first log step
    c.start_over = False  # True: move an incompatible run's checkpoints aside and start anew
    return c


def cifar_resnet_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ResNet and MobileNet on CIFAR: SGD 0.9, batch 64, wd 1e-4, 200 epochs, 0.1 /10 every 60."""
    c.batch_size, c.weight_decay, c.nesterov = 64, 1e-4, False
    c.num_epochs, c.learning_rate = 200.0, 0.1
    c.lr_boundaries, c.lr_decay_factor = (60.0, 120.0, 180.0), 0.1
    return c


def cifar_densenet_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DenseNet on CIFAR: Nesterov 0.9, batch 64, wd 1e-4, 300 epochs, 0.1 /10 at 50% and 75%."""
    c.batch_size, c.weight_decay, c.nesterov = 64, 1e-4, True
    c.num_epochs, c.learning_rate = 300.0, 0.1
    c.lr_boundaries, c.lr_decay_factor = (150.0, 225.0), 0.1
    return c


def cifar_wrn_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """WRN on CIFAR: SGD 0.9, batch 128, wd 5e-4, 200 epochs, 0.1 /5 at 60, 120, 160."""
    c.batch_size, c.weight_decay, c.nesterov = 128, 5e-4, False
    c.num_epochs, c.learning_rate = 200.0, 0.1
    c.lr_boundaries, c.lr_decay_factor = (60.0, 120.0, 160.0), 0.2
    return c


def imagenet_recipe(c: ml_collections.ConfigDict, *, aggressive: bool = False):
    """ResNet on ImageNet: SGD 0.9, batch 256, wd 1e-4, 100 epochs, 0.1 /10 every 30; BN statistics
    per 32 images (the papers' 8 GPUs x 32); resize 256 + crop 224 + flip, or Inception-style."""
    c.dataset, c.eval_split = "imagenet2012", "validation"
    c.loader, c.image_size = "streaming", 224
    c.augment = "imagenet_inception" if aggressive else "imagenet_simple"
    c.batch_size, c.weight_decay, c.nesterov = 256, 1e-4, False
    c.num_epochs, c.learning_rate = 100.0, 0.1
    c.lr_boundaries, c.lr_decay_factor = (30.0, 60.0, 90.0), 0.1
    c.bn_group_size = 32
    c.dtype = "bfloat16"
    c.log_every_steps, c.max_to_keep = 500, 2
    return c


def with_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Sets ``method``; the plain baseline trains the backbone alone (``aux="none"``), BYOT gets its
    temperature 3 and KL divergence."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {', '.join(METHODS)}.")
    c.method = method
    if method == "baseline":
        c.aux = "none"
    if method == "byot":  # BYOT's own setting (the authors' code): T = 3, KL
        c.loss.temperature, c.loss.divergence = 3.0, "kl"
    return c


def parse_preset(arg: str | None, default: str, valid) -> str:
    """The preset argument of ``get_config(arg)`` (``--config=configs/x.py:arg``), checked."""
    arg = arg or default
    if arg not in valid:
        raise ValueError(f"Unknown preset {arg!r}; valid: {', '.join(valid)}.")
    return arg


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config ``spec`` (``path/to/config.py[:preset]``) with command-line ``overrides``.

    ``overrides`` are written as on the trainer's command line, ``"--config.loss.beta=0.5"``, and
    parsed by ml_collections exactly as ``--config.<field>`` flags are (types from the field's
    current value; ``true``/``false``, tuples ``(1,2)``). The config is locked: an unknown field is
    a :class:`errors.ConfigError` naming the valid ones.
    """
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise errors.ConfigError(f"Config file {path!r} (from {spec!r}) not found.")
    bad = [o for o in overrides if not o.startswith("--config.") or "=" not in o]
    if bad:
        raise errors.ConfigError(
            f"Overrides are written --config.<field>=<value> (as for python -m dks_jax.main), "
            f"got {', '.join(map(repr, bad))}.")
    argv = ["dks_jax", f"--config={spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv, lock_config=True)
    try:
        values(argv)
    except flags.IllegalFlagValueError as e:  # the file failed: its last line says why
        raise errors.ConfigError(f"{spec}: {str(e).strip().splitlines()[-1]}") from e
    except (AttributeError, KeyError, flags.Error) as e:
        config = load(spec) if overrides else None
        fields = ", ".join(sorted(flatten(config.to_dict()))) if config is not None else ""
        raise errors.ConfigError(
            f"{spec}: cannot apply {' '.join(overrides)} ({type(e).__name__}: {e}). "
            f"Fields: {fields}.") from e
    return values["config"].value


def override(config: ml_collections.ConfigDict,
             overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``overrides`` (``"--config.<field>=<value>"``) applied as
    :func:`load` applies them; an unknown field is a :class:`errors.ConfigError`."""
    if not overrides:
        return config
    bad = [o for o in overrides if not o.startswith("--config.") or "=" not in o]
    if bad:
        raise errors.ConfigError(
            f"Overrides are written --config.<field>=<value>, got {', '.join(map(repr, bad))}.")
    argv = ["dks_jax", *overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config.copy_and_resolve_references(),
                                        flag_values=values, sys_argv=argv, lock_config=True)
        values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise errors.ConfigError(
            f"cannot apply {' '.join(overrides)} ({type(e).__name__}: {e}). Fields: "
            f"{', '.join(sorted(flatten(config.to_dict())))}.") from e
    return values["config"].value


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """A nested mapping (a config's ``to_dict()`` or its JSON) as ``{"loss.beta": value, ...}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def from_run(workdir) -> ml_collections.ConfigDict:
    """The config a run folder was trained with (its ``config.json``), on top of :func:`base` so
    that a field added since then has its default."""
    path = paths.as_path(workdir) / "config.json"
    if not path.exists():
        raise errors.ConfigError(f"{workdir} holds no config.json: is it a run folder of dks_jax?")
    saved = json.loads(path.read_text())
    config = base()
    config.update(saved)
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """``config`` as plain JSON values (tuples become lists), keys sorted: what ``config.json``
    holds and what experiments are compared by."""
    return json.loads(config.to_json_best_effort(sort_keys=True))
