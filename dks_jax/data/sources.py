"""Where examples come from: the splits and sources both loaders read.

A ``Source`` holds both splits of a data set and what is known about it (classes, image shape,
normalisation statistics). ``data.resolve_source`` builds it from the config, by one of

* ``folders.image_folder``: an image folder ``<root>/<split>/<class>/<image>``, as a directory or
  a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive read in place (``folders.py``);
* ``tfds_data.tfds_source``: a TFDS data set by name (``cifar10``, ``cifar100``,
  ``imagenet2012``, ...), prepared under ``data_dir`` (``tfds_data.py``).

A split is an ``IndexedSplit`` (served by index: image folders, and TFDS data sets small enough
to keep in host memory) or a ``SequentialSplit`` (large TFDS data sets such as ImageNet, read
in file order by the streaming loader).

Unreadable images are an error, not skipped: a skipped example would change the example order
and the batches (differently on each host), so a run would no longer be a pure function of its
seed. The message names the file; remove or replace it.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import threading
from collections.abc import Sequence

import numpy as np

from dks_jax import errors

# A per-channel value, (R, G, B).
RGB = tuple[float, float, float]
# Per-channel mean and std of the training images, in [0, 1] units.
KNOWN_STATS: dict[str, tuple[RGB, RGB]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Split sizes and class counts of the named data sets: an image-folder copy must match them.
KNOWN_SIZES = {
    "cifar10": ({"train": 50_000, "test": 10_000}, 10),
    "cifar100": ({"train": 50_000, "test": 10_000}, 100),
    "imagenet2012": ({"train": 1_281_167, "validation": 50_000}, 1000),
}
# Images sampled (evenly spaced over the training split) to estimate mean/std of other folders.
STATS_SAMPLE = 1000

log = logging.getLogger(__name__)


class DataNotFoundError(errors.UserError, FileNotFoundError):
    """The data set is not where the config says; the message says how to get it."""


# ----------------------------------------------------------------------------- splits


@dataclasses.dataclass(eq=False)
class IndexedSplit:
    """A split served by index: example ``i`` is ``read(i)`` (encoded bytes) with ``labels[i]``.

    ``labels``: int32 [N], class indices. Exactly one of ``paths`` (N files on disk) and
    ``blobs`` (N encoded images in memory) is set. ``keys[i]`` names the example in messages
    (file path, archive member or TFDS id). ``cache_key`` identifies the split's contents for
    the memo of ``decode_all`` ("" = this object only).
    """

    description: str
    labels: np.ndarray
    keys: Sequence[str]
    paths: Sequence[str] | None = None
    blobs: Sequence[bytes] | None = None
    cache_key: str = ""

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        """The encoded image (JPEG, PNG, ...) of example ``i``."""
        if self.blobs is not None:
            return self.blobs[i]
        assert self.paths is not None  # exactly one of paths and blobs is set
        with open(self.paths[i], "rb") as f:
            return f.read()

    def decode(self, i: int) -> np.ndarray:
        """Example ``i`` as uint8 [H, W, 3] (ValueError naming the file if unreadable)."""
        try:
            return decode_image(self.read(i))
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear message
            raise ValueError(unreadable_message(self.keys[i], e)) from e

    def decode_all(self) -> np.ndarray:
        """All images as one read-only uint8 array [N, H, W, 3] (memoised per split).

        Raises ValueError naming the file for an unreadable image or a size different from the
        first image's.
        """
        key = self.cache_key or f"id:{id(self)}"
        with _DECODED_LOCK:
            if key in _DECODED:
                _DECODED.move_to_end(key)
                return _DECODED[key]
        first = self.decode(0)
        out = np.empty((self.num_examples, *first.shape), np.uint8)
        out[0] = first
        for i in range(1, self.num_examples):
            img = self.decode(i)
            if img.shape != first.shape:
                raise ValueError(mixed_sizes_message(self.description, self.keys[0], first.shape,
                                                     self.keys[i], img.shape))
            out[i] = img
        out.flags.writeable = False
        with _DECODED_LOCK:
            _DECODED[key] = out
            while len(_DECODED) > 2:
                _DECODED.popitem(last=False)
        return out

    def first_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of example 0, read from its header only."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.read(0))) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001
            raise ValueError(unreadable_message(self.keys[0], e)) from e
        return (h, w, 3)


_DECODED: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_DECODED_LOCK = threading.Lock()


@dataclasses.dataclass(eq=False)
class SequentialSplit:
    """A TFDS split too large for host memory, read in file order by the streaming loader."""

    description: str
    builder: object  # tfds.core.DatasetBuilder
    split: str
    num_examples: int
    image_key: str
    label_key: str
    base_split: str
    start: int  # the split is base_split[start:start + num_examples]
    # tfds_id prefix (file basename) -> index in this split of the file's record 0.
    file_offsets: dict[str, int]

    def subsplit(self, lo: int, hi: int) -> str:
        """TFDS split string for examples [lo, hi) of this split."""
        return f"{self.base_split}[{self.start + lo}:{self.start + hi}]"


def balanced_subset(split, num_examples: int, num_classes: int) -> IndexedSplit:
    """The first ``num_examples / num_classes`` examples of every class, in the split's order.

    The same examples for every seed and run (a fixed, smaller training set, not a random draw),
    kept in the split's order. ``num_examples`` must be a multiple of ``num_classes`` that every
    class has enough examples for. The result's labels are int32 [num_examples].
    """
    if not isinstance(split, IndexedSplit):
        raise errors.ConfigError(
            f"config.train_examples picks a subset of a split read by index; {split.description} "
            "is streamed. Use a TFDS slice instead, e.g. --config.train_split='train[:10000]'.")
    labels = np.asarray(split.labels)
    per_class, extra = divmod(int(num_examples), num_classes)
    if num_examples <= 0 or extra:
        raise errors.ConfigError(
            f"config.train_examples={num_examples}: give a positive multiple of the "
            f"{num_classes} classes (the subset is class-balanced), or 0 for the whole split.")
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < per_class:
        short = int(np.argmin(counts))
        raise errors.ConfigError(
            f"config.train_examples={num_examples} needs {per_class} examples of each class; "
            f"class {short} has {counts[short]} in {split.description}. Lower train_examples.")
    rank = np.zeros(len(labels), np.int64)  # i's position among the examples of its class
    for k in range(num_classes):
        where = np.flatnonzero(labels == k)
        rank[where] = np.arange(len(where))
    keep = np.flatnonzero(rank < per_class)
    pick = lambda seq: None if seq is None else [seq[i] for i in keep]
    return IndexedSplit(
        description=f"{split.description} (balanced subset of {num_examples})",
        labels=labels[keep], keys=[split.keys[int(i)] for i in keep], paths=pick(split.paths),
        blobs=pick(split.blobs),
        cache_key=f"{split.cache_key}[balanced:{num_examples}]" if split.cache_key else "",
    )


@dataclasses.dataclass(eq=False)
class Source:
    """Both splits of a data set and what is known about them."""

    name: str
    kind: str  # "image_folder" | "tfds"
    location: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int] | None  # fixed (H, W, C), or None when sizes vary
    mean: RGB
    std: RGB
    train: IndexedSplit | SequentialSplit
    eval: IndexedSplit | SequentialSplit

    @property
    def random_access(self) -> bool:
        return isinstance(self.train, IndexedSplit) and isinstance(self.eval, IndexedSplit)


# ----------------------------------------------------------------------------- images, messages


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] (PIL; RGB). Raises on unreadable data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def estimate_stats(split: IndexedSplit, max_images: int = STATS_SAMPLE) -> tuple[RGB, RGB]:
    """Per-channel ``(mean, std)`` in [0, 1] units (two 3-tuples of floats, rounded to 4 places)
    from up to ``max_images`` evenly spaced images of ``split``."""
    from PIL import Image

    n = split.num_examples
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(np.int64))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in idx:
        try:
            with Image.open(io.BytesIO(split.read(int(i)))) as im:
                im.draft("RGB", (64, 64))  # JPEG: decode at reduced size, fast and close enough
                x = np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3) / 255.0
        except Exception as e:  # noqa: BLE001
            raise ValueError(unreadable_message(split.keys[int(i)], e)) from e
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return _rounded_rgb(mean), _rounded_rgb(std)


def _rounded_rgb(values: np.ndarray) -> RGB:
    r, g, b = (float(round(v, 4)) for v in values)
    return r, g, b


def unreadable_message(key: str, error: BaseException) -> str:
    return (
        f"cannot decode image {key}: {error}. Unreadable images are an error, not skipped, so "
        "that every run and every host sees the same examples: remove or replace the file."
    )


def mixed_sizes_message(description, key0, shape0, key, shape) -> str:
    return (
        f"images of mixed sizes in {description}: {key0} is {_hwc(shape0)} but {key} is "
        f"{_hwc(shape)}. The in_memory loader and the 'cifar'/'none' augmentations need one fixed "
        "size: use loader='streaming' with augment='imagenet_simple' or 'imagenet_inception' "
        "(they resize every image), or resize the images."
    )


def _hwc(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ----------------------------------------------------------------------------- resolving
