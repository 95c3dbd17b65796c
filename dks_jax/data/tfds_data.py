"""TFDS data sets by name (``cifar10``, ``cifar100``, ``imagenet2012``, ...), prepared under
``data_dir``; downloaded and prepared first when missing (and reachable).

Split sizes, classes and image shapes come from the builder's info. Data sets with a fixed image
size that fit in ``HOST_CACHE_BYTES`` are read once (still encoded) into host memory and then
served by index exactly like an image folder (an ``IndexedSplit``); larger ones (ImageNet) are
read sequentially by the streaming loader (a ``SequentialSplit``).

TensorFlow and TFDS are imported on first use, not when this module is imported.
"""

from __future__ import annotations

import logging
import os
import socket

import numpy as np

from dks_jax.data.sources import (
    KNOWN_STATS,
    DataNotFoundError,
    IndexedSplit,
    SequentialSplit,
    Source,
)

# TFDS data sets with a fixed image shape and at most this many bytes on disk are read into
# host memory once and served by index (same order as the in-memory loader).
HOST_CACHE_BYTES = 2 * 1024**3

log = logging.getLogger(__name__)


def _prepare_hint(name: str, data_dir, train_split: str) -> str:
    where = data_dir or "~/tensorflow_datasets"
    hint = (
        f"Prepare it with `tfds build {name} --data_dir={where}` (needs internet"
    )
    if name.startswith("imagenet"):
        hint += (f"; ImageNet also needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                 f"in {where}/downloads/manual/ first")
    hint += (
        f"), or put an image-folder copy at {where}/{name}/{train_split}/<class>/<image> or "
        f"{where}/{name}-jpeg.tar.gz and set config.data_dir={where}."
    )
    return hint


# Where TFDS downloads the data sets that need no manual step; checked before a download, so that
# a machine without internet gets its message at once rather than after minutes of retries.
DOWNLOAD_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _no_data_message(name: str, data_dir, train_split: str, why: str) -> str:
    where = data_dir or "~/tensorflow_datasets"
    return (
        f"The data set {name!r} is not in {where} and {why}. Two ways out: point at a folder "
        f"holding {name}-jpeg.tar.gz (or {name}/{train_split}/<class>/<image>) with "
        f"`make demo DATA_DIR=<folder>` or --config.data_dir=<folder>; or run where there is "
        f"internet, and TFDS downloads and prepares it into {where} once."
    )


def _download(builder, name: str, data_dir, train_split: str) -> None:
    """Downloads and prepares a TFDS data set; a clear DataNotFoundError when that is impossible."""
    host = DOWNLOAD_HOSTS.get(name)
    if host is not None and not _reachable(host):
        raise DataNotFoundError(_no_data_message(
            name, data_dir, train_split, f"cannot be downloaded ({host} cannot be reached)"))
    log.warning("data set %s is not prepared in %s: downloading and preparing it (once).", name,
                data_dir or "~/tensorflow_datasets")
    try:
        builder.download_and_prepare()
    except OSError as e:  # requests' connection errors are OSErrors
        raise DataNotFoundError(_no_data_message(
            name, data_dir, train_split, f"its download failed ({type(e).__name__}: {e})")) from e


def tfds_source(name: str, data_dir, train_split: str, eval_split: str, *,
                download: bool = True) -> Source:
    """Source for TFDS data set ``name`` under ``data_dir`` (needs TensorFlow); downloaded and
    prepared first when it is not there and ``download`` is set.

    Splits are ``IndexedSplit``s (labels int32 [N], images encoded in host memory, TFDS's file
    order) when the images have a fixed shape and the data set takes at most
    ``HOST_CACHE_BYTES``, else ``SequentialSplit``s. ``image_shape`` is (H, W, 3), or None when
    the sizes vary.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataNotFoundError(
            f"data set {name!r} is a TFDS name, and tensorflow_datasets/tensorflow cannot be "
            f"imported ({e}). Install them (pip install 'dks_jax[tf]'), or "
            + _prepare_hint(name, data_dir, train_split).split(", or ", 1)[1]
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for unknown names
        raise DataNotFoundError(
            f"{name!r} is neither a path nor a TFDS data set ({type(e).__name__}: {e})"
        ) from e
    manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))  # e.g. ImageNet
    if download and not manual and not builder.info.splits:
        _download(builder, name, data_dir, train_split)
        builder = tfds.builder(name, data_dir=data_dir)
    info = builder.info
    sizes = {}
    for split in (train_split, eval_split):
        try:
            sizes[split] = int(info.splits[split].num_examples)
        except (KeyError, ValueError, AssertionError) as e:
            have = sorted(info.splits.keys())
            if not have:
                raise DataNotFoundError(
                    f"TFDS data set {name!r} is not prepared in data_dir={data_dir}. "
                    + _prepare_hint(name, data_dir, train_split)
                ) from e
            raise DataNotFoundError(
                f"TFDS data set {name!r} has no split {split!r} (it has {have}): set "
                "config.train_split / config.eval_split"
            ) from e
    image_key, label_key = info.supervised_keys or ("image", "label")
    features = info.features
    image_shape = tuple(features[image_key].shape)
    fixed = all(d is not None for d in image_shape)
    label_feature = features[label_key]
    num_classes = int(label_feature.num_classes)
    class_names = tuple(getattr(label_feature, "names", None) or range(num_classes))
    in_host = fixed and int(info.dataset_size or 0) <= HOST_CACHE_BYTES
    splits = {}
    for split in (train_split, eval_split):
        desc = f"TFDS {name} ({split})"
        if in_host:
            splits[split] = _read_tfds_records(builder, split, image_key, label_key, desc,
                                               sizes[split])
        else:
            splits[split] = _sequential_split(tfds, builder, split, image_key, label_key, desc,
                                              sizes[split])
    mean, std = KNOWN_STATS.get(name, KNOWN_STATS["imagenet2012"])
    # (H, W, 3): the loaders decode to RGB (a grayscale data set too).
    shape = (int(image_shape[0]), int(image_shape[1]), 3) if fixed else None
    return Source(
        name=name,
        kind="tfds",
        location=str(builder.data_dir),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in class_names),
        image_shape=shape,
        mean=mean,
        std=std,
        train=splits[train_split],
        eval=splits[eval_split],
    )


def _read_tfds_records(builder, split, image_key, label_key, desc, num_examples) -> IndexedSplit:
    """Reads a split once, images still encoded, in TFDS's file order."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False,
                                    add_tfds_id=True),
    )
    blobs, label_list, keys = [], [], []
    for ex in tfds.as_numpy(ds):
        blobs.append(bytes(ex[image_key]))
        label_list.append(int(ex[label_key]))
        keys.append(f"{desc}: {ex['tfds_id'].decode()}")
    if len(blobs) != num_examples:
        raise ValueError(f"{desc}: read {len(blobs)} examples, the builder info says "
                         f"{num_examples}")
    labels = np.asarray(label_list, np.int32)
    labels.flags.writeable = False
    return IndexedSplit(description=desc, labels=labels, keys=keys, blobs=blobs,
                        cache_key=f"tfds:{builder.data_dir}:{split}")


def _sequential_split(tfds, builder, split, image_key, label_key, desc, num_examples):
    instr = tfds.core.ReadInstruction.from_spec(split)
    absolute = instr.to_absolute(builder.info.splits)
    if len(absolute) != 1:
        raise ValueError(f"{desc}: the streaming loader reads one split or one slice of a "
                         f"split, not {split!r}")
    base, start = absolute[0].splitname, int(absolute[0].from_ or 0)
    offsets, pos = {}, 0
    for fi in builder.info.splits[split].file_instructions:
        offsets[os.path.basename(fi.filename)] = pos - int(fi.skip)
        pos += int(fi.take)
    return SequentialSplit(description=desc, builder=builder, split=split,
                           num_examples=num_examples, image_key=image_key, label_key=label_key,
                           base_split=base, start=start, file_offsets=offsets)
