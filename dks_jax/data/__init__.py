"""Input pipelines: TFDS and image folders, data on the accelerator or streamed, noisy labels.

    ds = data.create(config, mesh)
    for step, batch in zip(range(start, total), ds.train_iterator(batch_size, start_step=start)):
        ...   # batch["image"] float32 [B, H, W, C], batch["label"] int32 [B], sharded over 'data'
    for batch in ds.eval_iterator(batch_size):
        ...   # plus batch["mask"] bool [B]: False on the padding of the last batch

Config fields read (top level; the config is built from ``config_base.base()``, which holds the
defaults): ``dataset`` (TFDS name, or path to an image folder / .tar / .tar.gz), ``data_dir``,
``download``, ``train_split``, ``eval_split``, ``loader`` (``auto`` | ``in_memory`` |
``streaming`` | ``grain``), ``grain_workers``, ``augment`` (``cifar`` | ``imagenet_simple`` |
``imagenet_inception`` | ``none``),
``image_size`` (0 = the images' own size if square, else 224), ``resize_mode`` (``both_sides`` |
``shorter_side``), ``cutout`` (0 = off), ``label_noise`` (fraction of training labels replaced by
another class), ``train_examples`` (> 0: train on the first ``train_examples / num_classes``
examples of every class; the noise is drawn on that subset), ``seed``.

Modules: ``sources`` (splits, ``Source``; :func:`resolve_source` here picks one), ``folders``
(image folders and tar archives), ``tfds_data`` (TFDS data sets), ``augment`` (the loaders'
augmentations), ``in_memory``, ``streaming`` and ``grain_loader`` (the loaders), ``order``
(example order), ``noise`` (label noise).

``loader='auto'`` picks ``in_memory`` when the images have one fixed size equal to
``image_size``, the augmentation is ``cifar`` or ``none``, and both splits decoded take at most
``IN_MEMORY_BYTES``; otherwise ``streaming``. Importing this package, and the in-memory loader
on image folders, do not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
from typing import TYPE_CHECKING

import jax
import numpy as np

from dks_jax import errors
from dks_jax.data import folders, order, sources, tfds_data
from dks_jax.data import noise as noise_lib
from dks_jax.data.sources import DataNotFoundError

if TYPE_CHECKING:  # imported where used: the loaders are needed only once a data set is built
    from dks_jax.data.grain_loader import GrainLoader
    from dks_jax.data.in_memory import InMemoryLoader
    from dks_jax.data.streaming import StreamingLoader

__all__ = ["create", "Dataset", "DataNotFoundError", "IN_MEMORY_BYTES"]

IN_MEMORY_BYTES = 4 * 1024**3
DATA_FILE = "data.json"  # Dataset.describe() of a run's training data, in its workdir
LOADERS = ("auto", "in_memory", "streaming", "grain")
AUGMENTS = ("cifar", "imagenet_simple", "imagenet_inception", "none")

log = logging.getLogger(__name__)


class Dataset:
    """A data set ready to iterate; built by ``create``.

    Attributes:
      num_classes, num_train, num_eval: sizes (from the source; TFDS: the builder's info).
      image_shape: (H, W, C) of the batches' images.
      loader: ``"in_memory"``, ``"streaming"`` or ``"grain"``.
      label_noise_report: ``{"requested", "realised", "num_changed", "num_examples", "seed"}``,
        or ``{}`` without label noise.
      class_names, source: the classes (index order) and the ``sources.Source``.
    """

    def __init__(self, *, source, loader, impl, image_shape, noise, mesh, process_index,
                 process_count, seed):
        self.source = source
        self.loader = loader
        self._impl = impl
        self.num_classes = source.num_classes
        self.class_names = source.class_names
        self.num_train = source.train.num_examples
        self.num_eval = source.eval.num_examples
        self.image_shape = tuple(image_shape)
        self.label_noise_report = noise.report() if noise is not None else {}
        self.mesh = mesh
        self.seed = seed
        self._process_count = jax.process_count() if process_count is None else process_count
        self._process_index = process_index

    def __repr__(self):
        return (f"Dataset({self.source.name!r}, loader={self.loader!r}, "
                f"num_train={self.num_train}, num_eval={self.num_eval}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")

    def describe(self) -> dict:
        """What a trained model needs to know of its data (JSON): classes, normalisation, sizes.
        The trainer writes it to ``<workdir>/data.json`` (:data:`DATA_FILE`)."""
        return {"dataset": self.source.name, "class_names": list(self.class_names),
                "num_classes": self.num_classes, "mean": list(self.source.mean),
                "std": list(self.source.std), "image_shape": list(self.image_shape),
                "num_train": self.num_train, "num_eval": self.num_eval}

    def steps_per_epoch(self, global_batch: int) -> int:
        """``num_train // global_batch``: the remainder of each epoch's order is dropped."""
        return order.steps_per_epoch(self.num_train, global_batch)

    def _check(self, global_batch):
        order.check_global_batch(global_batch, self.mesh, self._process_count)

    def train_iterator(self, global_batch: int, *, start_step: int = 0, seed: int | None = None):
        """Endless iterator of training batches, from step ``start_step``.

        Yields {"image": float32 [B, H, W, C], "label": int32 [B]}, global jax.Arrays with
        ``NamedSharding(mesh, P('data'))``. The batch of step ``s`` depends only on
        (seed, s // steps_per_epoch, s % steps_per_epoch). ``seed`` overrides the config's seed
        (in-memory loader only): several seeds then share one copy of the images on the devices,
        and each gets the order, augmentation and label noise a run with ``config.seed = seed``
        gets.
        """
        self._check(global_batch)
        self.steps_per_epoch(global_batch)
        if self.loader == "in_memory":
            impl = self._impl
            return (impl.train_batch(global_batch, s, seed) for s in itertools.count(int(start_step)))
        if seed is not None and seed != self.seed:
            raise errors.ConfigError(
                "A per-seed order (config.num_seeds > 1) needs --config.loader=in_memory.")
        return self._impl.train_iterator(global_batch, start_step=int(start_step))

    def eval_iterator(self, global_batch: int):
        """One pass over the eval split: {"image", "label", "mask"}; every example exactly once
        over all processes and devices, the last batch padded (mask False, zero image, label 0).
        """
        self._check(global_batch)
        if self.loader == "in_memory":
            return self._impl.eval_batches(global_batch)
        return self._impl.eval_iterator(global_batch)

    def eval_steps(self, global_batch: int) -> int:
        """Number of batches ``eval_iterator`` yields."""
        self._check(global_batch)
        if isinstance(self.source.eval, sources.SequentialSplit) and self.loader != "grain":
            per_process = -(-self.num_eval // self._process_count)
            return -(-per_process // (global_batch // self._process_count))
        return -(-self.num_eval // global_batch)

    def local_train_iterator(self, global_batch: int, *, start_step: int = 0):
        """Streaming and grain loaders: this process's part of each training batch, as NumPy:
        {"image": float32 [b, H, W, C], "label": int32 [b]}, ``b = B / process_count``."""
        self._streaming_only("local_train_iterator")
        return self._impl.local_train_batches(global_batch, start_step=start_step)

    def local_eval_iterator(self, global_batch: int):
        """Streaming and grain loaders: this process's part of each eval batch, as NumPy: {"image":
        float32 [b, H, W, C], "label": int32 [b], "mask": bool [b]}."""
        self._streaming_only("local_eval_iterator")
        return self._impl.local_eval_batches(global_batch)

    def _streaming_only(self, what):
        if self.loader not in ("streaming", "grain"):
            raise ValueError(f"{what} exists for the streaming and grain loaders; the in_memory loader "
                             "builds global batches on the devices")


def resolve_source(dataset: str, data_dir: str | None, train_split: str, eval_split: str, *,
            download: bool = True) -> sources.Source:
    """The Source for config values ``dataset``, ``data_dir``, ``train_split``, ``eval_split``.

    ``dataset`` is a path to an image folder or archive, or a TFDS name; for a name, an
    image-folder copy under ``data_dir`` (see ``folders.find_folder_copy``) is used before TFDS,
    and a TFDS data set that is not prepared yet is downloaded and prepared when ``download`` is
    set.
    """
    dataset = str(dataset)
    if folders.is_path(dataset):
        path = pathlib.Path(os.path.expanduser(dataset))
        if not path.exists():
            raise sources.DataNotFoundError(
                f"data set {dataset!r} not found: expected an image folder "
                f"<root>/{train_split}/<class>/<image> or a .tar/.tar.gz archive of that layout"
            )
        return folders.image_folder(path, train_split, eval_split)
    copy = folders.find_folder_copy(dataset, data_dir, train_split)
    if copy is not None:
        log.info("data set %s: using the image-folder copy %s", dataset, copy)
        return folders.image_folder(copy, train_split, eval_split, name=dataset)
    return tfds_data.tfds_source(dataset, data_dir, train_split, eval_split, download=download)


def create(config, mesh, *, process_index: int | None = None,
           process_count: int | None = None, stats: tuple | None = None) -> Dataset:
    """Builds the data set the config describes, for ``mesh`` (axis ``'data'``).

    ``process_index``/``process_count`` default to JAX's; tests override them to simulate one of
    several processes (then the streaming loader offers only the ``local_*`` iterators).
    ``stats``: ``(mean, std)`` to normalise with instead of the source's own (evaluating a trained
    model on other images normalises them as its training images were).
    """
    if not config.dataset:
        raise errors.ConfigError("config.dataset is empty: set a TFDS name (cifar10, cifar100, "
                                 "imagenet2012) or the path of an image folder / .tar / .tar.gz")
    dataset = str(config.dataset)
    data_dir = config.data_dir or None
    train_split, eval_split = str(config.train_split), str(config.eval_split)
    loader, augment = str(config.loader), str(config.augment)
    image_size = int(config.image_size)
    resize_mode = str(config.resize_mode)
    cutout = int(config.cutout)
    fraction = float(config.label_noise)
    seed = int(config.seed)
    if loader not in LOADERS:
        raise errors.ConfigError(f"config.loader must be one of {LOADERS}, not {loader!r}")
    if augment not in AUGMENTS:
        raise errors.ConfigError(f"config.augment must be one of {AUGMENTS}, not {augment!r}")
    if resize_mode not in ("both_sides", "shorter_side"):
        raise errors.ConfigError(f"config.resize_mode must be 'both_sides' or 'shorter_side', "
                                 f"not {resize_mode!r}")
    if cutout < 0:
        raise errors.ConfigError(f"config.cutout must be 0 (off) or a square size, not {cutout}")
    order.data_axis_size(mesh)

    source = resolve_source(dataset, data_dir, train_split, eval_split,
                             download=bool(config.download))
    if stats is not None:
        source = dataclasses.replace(source, mean=tuple(stats[0]), std=tuple(stats[1]))
    train_examples = int(config.train_examples)
    if train_examples:
        source = dataclasses.replace(source, train=sources.balanced_subset(
            source.train, train_examples, source.num_classes))
        log.info("training subset: %s", source.train.description)
    fixed = source.image_shape
    if not image_size:
        image_size = fixed[0] if fixed is not None and fixed[0] == fixed[1] else 224
    image_shape = (image_size, image_size, 3)
    noise = None
    if fraction > 0:
        noise = noise_lib.label_noise(source.train.num_examples, source.num_classes, fraction,
                                      seed)
        log.info("label noise: %s", noise.report())

    in_memory_ok, why = _in_memory_possible(source, augment, image_shape)
    if loader == "auto":
        loader = "in_memory" if in_memory_ok else "streaming"
    elif loader == "in_memory" and not in_memory_ok:
        raise errors.ConfigError(f"loader='in_memory' is not possible for {source.location}: {why}")

    impl: InMemoryLoader | StreamingLoader | GrainLoader
    if loader == "in_memory":
        from dks_jax.data.in_memory import InMemoryLoader

        train, ev = source.train, source.eval
        # in_memory_ok: source.random_access, both splits served by index
        assert isinstance(train, sources.IndexedSplit) and isinstance(ev, sources.IndexedSplit)
        clean = np.asarray(train.labels)
        labels_for_seed = None
        if noise is not None:
            # Each seed's own noise, as a run with config.seed = s draws it (config.num_seeds).
            labels_for_seed = lambda s: noise_lib.label_noise(
                len(clean), source.num_classes, fraction, s).apply(clean)
        impl = InMemoryLoader(
            mesh,
            (train.decode_all(), noise.apply(clean) if noise is not None else clean),
            (ev.decode_all(), np.asarray(ev.labels, np.int32)),
            augment=augment, cutout=cutout, mean=source.mean, std=source.std, seed=seed,
            labels_for_seed=labels_for_seed,
        )
    elif loader == "grain":
        from dks_jax.data.grain_loader import GrainLoader

        impl = GrainLoader(
            source, mesh, augment=augment, image_size=image_size, resize_mode=resize_mode,
            cutout=cutout, mean=source.mean, std=source.std, seed=seed, noise=noise,
            workers=int(config.get("grain_workers", 0)), process_index=process_index,
            process_count=process_count,
        )
    else:
        from dks_jax.data.streaming import StreamingLoader

        impl = StreamingLoader(
            source, mesh, augment=augment, image_size=image_size, resize_mode=resize_mode,
            cutout=cutout, mean=source.mean, std=source.std, seed=seed, noise=noise,
            process_index=process_index, process_count=process_count,
        )
    ds = Dataset(source=source, loader=loader, impl=impl, image_shape=image_shape, noise=noise,
                 mesh=mesh, process_index=process_index, process_count=process_count, seed=seed)
    log.info("%r", ds)
    return ds


def _in_memory_possible(source, augment, image_shape) -> tuple[bool, str]:
    fixed = source.image_shape
    if augment not in ("cifar", "none"):
        return False, f"augment={augment!r} needs the streaming loader"
    if fixed is None:
        return False, "its images do not have one fixed size"
    if tuple(fixed[:2]) != tuple(image_shape[:2]):
        return False, (f"its images are {sources._hwc(fixed)}, not image_size "
                       f"{image_shape[0]}x{image_shape[1]}")
    if not source.random_access:
        return False, "it is too large to read into host memory"
    total = (source.train.num_examples + source.eval.num_examples) * int(np.prod(fixed))
    if total > IN_MEMORY_BYTES:
        return False, (f"its decoded images take {total / 2**30:.1f} GiB, more than "
                       f"IN_MEMORY_BYTES = {IN_MEMORY_BYTES / 2**30:.0f} GiB")
    return True, ""
