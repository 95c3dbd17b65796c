"""Where examples come from: image folders (directory or tar archive) and TFDS data sets.

Image folders
  ``<root>/<split>/<class>/<image>`` in a directory, or the same layout inside a ``.tar`` /
  ``.tar.gz`` / ``.tgz`` archive (an optional leading folder is allowed). Classes are the
  sub-folders of the training split, sorted by name: class ``i`` is the ``i``-th name. Within a
  class, images are sorted by file name, so the example order (index ``i``) is fixed by the data.
  Images are JPEG, PNG, BMP or GIF (other files are ignored), converted to RGB.

  Archives are **read in place**: one sequential pass keeps the encoded images in host memory
  (about the archive's size); nothing is unpacked or written anywhere, so a read-only shared
  folder works and no cache can be left half-written or stale. For archives larger than host
  memory, unpack them once (``tar xf``) and point ``dataset`` at the folder.

TFDS
  By name (``cifar10``, ``cifar100``, ``imagenet2012``, ...), prepared under ``data_dir``. Split
  sizes, classes and image shapes come from the builder's info. Data sets with a fixed image
  size that fit in ``HOST_CACHE_BYTES`` are read once (still encoded) into host memory and then
  served by index exactly like an image folder; larger ones (ImageNet) are read sequentially by
  the streaming loader.

Unreadable images are an error, not skipped: a skipped example would change the example order
and the batches (differently on each host), so a run would no longer be a pure function of its
seed. The message names the file; remove or replace it.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import pathlib
import socket
import tarfile
import threading
import zlib
from collections.abc import Sequence

import numpy as np

from dks_jax import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
# TFDS data sets with a fixed image shape and at most this many bytes on disk are read into
# host memory once and served by index (same order as the in-memory loader).
HOST_CACHE_BYTES = 2 * 1024**3

# Per-channel mean and std of the training images, in [0, 1] units.
KNOWN_STATS = {
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

    Exactly one of ``paths`` (files on disk) and ``blobs`` (encoded bytes in memory) is set.
    ``keys[i]`` names the example in messages (file path, archive member or TFDS id).
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
        if self.blobs is not None:
            return self.blobs[i]
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
    class has enough examples for.
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
        labels=labels[keep], keys=pick(split.keys), paths=pick(split.paths),
        blobs=pick(split.blobs),
        cache_key=f"{split.cache_key}[balanced:{num_examples}]" if split.cache_key else "",
    )


_DECODED: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_DECODED_LOCK = threading.Lock()


@dataclasses.dataclass(eq=False)
class Source:
    """Both splits of a data set and what is known about them."""

    name: str
    kind: str  # "image_folder" | "tfds"
    location: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int] | None  # fixed (H, W, C), or None when sizes vary
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: IndexedSplit | SequentialSplit
    eval: IndexedSplit | SequentialSplit

    @property
    def random_access(self) -> bool:
        return isinstance(self.train, IndexedSplit) and isinstance(self.eval, IndexedSplit)


# ----------------------------------------------------------------------------- messages


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


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] (PIL; RGB). Raises on unreadable data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


# ----------------------------------------------------------------------------- resolving


def is_path(dataset: str) -> bool:
    """Whether ``dataset`` names a folder/archive rather than a TFDS data set."""
    d = str(dataset)
    return (
        "/" in d or os.sep in d or d.startswith(("~", "."))
        or d.lower().endswith(ARCHIVE_EXTENSIONS)
    )


def find_folder_copy(name: str, data_dir: str | None, train_split: str) -> pathlib.Path | None:
    """An image-folder copy of TFDS data set ``name`` under ``data_dir``, if there is one.

    Looked for, in this order: ``<name>-jpeg.tar.gz``, ``<name>-jpeg.tar``, ``<name>.tar.gz``,
    ``<name>.tgz``, ``<name>.tar``, and folders ``<name>-jpeg/`` and ``<name>/`` holding a
    ``<train_split>/`` sub-folder (TFDS's own ``<name>/<version>/`` folder does not count).
    """
    if not data_dir:
        return None
    root = pathlib.Path(os.path.expanduser(str(data_dir)))
    for cand in (f"{name}-jpeg.tar.gz", f"{name}-jpeg.tar", f"{name}.tar.gz", f"{name}.tgz",
                 f"{name}.tar"):
        if (root / cand).is_file():
            return root / cand
    for cand in (f"{name}-jpeg", name):
        if (root / cand / train_split).is_dir():
            return root / cand
    return None


def resolve(dataset: str, data_dir: str | None, train_split: str, eval_split: str, *,
            download: bool = True) -> Source:
    """The Source for config values ``dataset``, ``data_dir``, ``train_split``, ``eval_split``.

    ``dataset`` is a path to an image folder or archive, or a TFDS name; for a name, an
    image-folder copy under ``data_dir`` (see ``find_folder_copy``) is used before TFDS, and a TFDS
    data set that is not prepared yet is downloaded and prepared when ``download`` is set.
    """
    dataset = str(dataset)
    if is_path(dataset):
        path = pathlib.Path(os.path.expanduser(dataset))
        if not path.exists():
            raise DataNotFoundError(
                f"data set {dataset!r} not found: expected an image folder "
                f"<root>/{train_split}/<class>/<image> or a .tar/.tar.gz archive of that layout"
            )
        return image_folder(path, train_split, eval_split)
    copy = find_folder_copy(dataset, data_dir, train_split)
    if copy is not None:
        log.info("data set %s: using the image-folder copy %s", dataset, copy)
        return image_folder(copy, train_split, eval_split, name=dataset)
    return tfds_source(dataset, data_dir, train_split, eval_split, download=download)


# ----------------------------------------------------------------------------- image folders


def image_folder(path, train_split: str, eval_split: str, *, name: str | None = None) -> Source:
    """Source for a folder or archive in the ``<split>/<class>/<image>`` layout.

    ``name`` (a TFDS name such as ``cifar10``) selects known normalisation statistics; otherwise
    they are estimated from up to ``STATS_SAMPLE`` training images.
    """
    path = pathlib.Path(path)
    if path.is_file():
        if not str(path).lower().endswith(ARCHIVE_EXTENSIONS):
            raise ValueError(f"{path} is a file but not a .tar/.tar.gz/.tgz archive")
        files = _read_archive(str(path), (train_split, eval_split))
        location, kind_desc = str(path), "archive"
    else:
        files = {s: _list_folder(path / s) for s in (train_split, eval_split)}
        location, kind_desc = str(path), "folder"
    for split in (train_split, eval_split):
        if files[split] is None:
            found = sorted(s for s in _splits_present(path) if s not in (train_split, eval_split))
            raise DataNotFoundError(
                f"no split {split!r} in the image {kind_desc} {location}: expected "
                f"{location}{'::' if kind_desc == 'archive' else '/'}{split}/<class>/<image>"
                + (f"; found splits {found} (set config.train_split / config.eval_split)"
                   if found else "")
            )
    class_names = tuple(sorted(files[train_split]))
    if not class_names:
        raise ValueError(
            f"no class folders in {location}/{train_split}: expected "
            f"{location}/{train_split}/<class>/<image> with one folder per class"
        )
    empty = [c for c in class_names if not files[train_split][c]]
    if empty:
        raise ValueError(f"class folders without images in {location}/{train_split}: {empty}")
    unknown = sorted(set(files[eval_split]) - set(class_names))
    if unknown:
        raise ValueError(
            f"classes {unknown} of {location}/{eval_split} are not in {location}/{train_split}"
        )
    missing = [c for c in class_names if not files[eval_split].get(c)]
    if missing:
        raise DataNotFoundError(
            f"{location}/{eval_split} has no images of {len(missing)} of the {len(class_names)} "
            f"classes of {train_split}: {_names(missing)}. An evaluation without them would "
            "report accuracy on the other classes only: restore the missing images (a partial "
            "copy or an interrupted download?)."
        )
    if name in KNOWN_SIZES:
        _check_known_sizes(name, location, class_names, files, (train_split, eval_split))
    splits = {}
    for split in (train_split, eval_split):
        items = [(ci, key, item) for ci, c in enumerate(class_names)
                 for key, item in files[split].get(c, [])]
        if not items:
            raise ValueError(f"no images in {location}/{split}")
        labels = np.asarray([ci for ci, _, _ in items], np.int32)
        labels.flags.writeable = False
        keys = [key for _, key, _ in items]
        payload = [item for _, _, item in items]
        stamp = _stamp(path)
        splits[split] = IndexedSplit(
            description=f"{location} ({split})",
            labels=labels,
            keys=keys,
            paths=payload if kind_desc == "folder" else None,
            blobs=payload if kind_desc == "archive" else None,
            cache_key=f"folder:{location}:{stamp}:{split}",
        )
    train = splits[train_split]
    mean, std = KNOWN_STATS.get(name, (None, None)) if name else (None, None)
    if mean is None:
        mean, std = estimate_stats(train)
    return Source(
        name=name or path.name,
        kind="image_folder",
        location=location,
        num_classes=len(class_names),
        class_names=class_names,
        image_shape=train.first_shape(),
        mean=tuple(mean),
        std=tuple(std),
        train=train,
        eval=splits[eval_split],
    )


def _names(items, limit: int = 10) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_known_sizes(name, location, class_names, files, splits) -> None:
    """A copy of a named data set must have its classes and, for its standard splits, its sizes."""
    sizes, num_classes = KNOWN_SIZES[name]
    if len(class_names) != num_classes:
        raise DataNotFoundError(
            f"{location} is used as {name}, which has {num_classes} classes, but it has "
            f"{len(class_names)}. Restore the full copy, or name the folder itself as "
            "config.dataset (then it is not taken for the named data set)."
        )
    for split in splits:
        if split not in sizes:
            continue  # another split name: a subset the user chose
        have = sum(len(v) for v in files[split].values())
        if have != sizes[split]:
            per_class = {c: len(v) for c, v in files[split].items()}
            expected = sizes[split] // num_classes
            short = [f"{c} ({n})" for c, n in per_class.items() if n != expected]
            raise DataNotFoundError(
                f"{location}/{split} has {have:,} images, but {name}'s {split} split has "
                f"{sizes[split]:,}" + (f" ({expected:,} per class; differing: {_names(short)})"
                                       if sizes[split] % num_classes == 0 and short else "")
                + ". The copy is incomplete: restore it, or name the folder itself as "
                "config.dataset to use it as it is."
            )


def _stamp(path: pathlib.Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_folder(split_dir: pathlib.Path):
    """{class: [(key, path), ...] sorted by file name}, or None if the split folder is absent."""
    if not split_dir.is_dir():
        return None
    out = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files = sorted(f.name for f in os.scandir(entry.path) if f.is_file()
                           and _is_image(f.name))
            out[entry.name] = [(os.path.join(entry.path, f),) * 2 for f in files]
    return out


def _splits_present(path: pathlib.Path) -> list[str]:
    if path.is_dir():
        return [p.name for p in path.iterdir() if p.is_dir()]
    return list(_read_archive_splits.get(str(path), ()))


_ARCHIVES: collections.OrderedDict = collections.OrderedDict()
_read_archive_splits: dict[str, tuple[str, ...]] = {}


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Notes how the archive ended: ``"marker"`` (the zero blocks of a complete tar), or how it
    was cut (``tarfile`` stops silently at the end of the data after any whole member)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar._end_seen = "marker"
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar._end_seen = "the data ends after a member"
            raise
        except tarfile.InvalidHeaderError:
            tar._end_seen = "an invalid header follows the last member"
            raise


def _read_archive(path: str, splits: tuple[str, ...]):
    """{split: {class: [(member name, bytes), ...] sorted by name} or None}, memoised.

    One sequential pass over the archive (``tarfile`` stream mode, any compression); members
    are ``[prefix/]<split>/<class>/<image>``.
    """
    key = (path, _stamp(pathlib.Path(path)), tuple(splits))
    if key in _ARCHIVES:
        _ARCHIVES.move_to_end(key)
        return _ARCHIVES[key]
    found: dict[str, dict[str, list]] = {}
    all_splits = set()
    try:
        with tarfile.open(path, "r|*", tarinfo=_EndCheckingTarInfo) as tar:
            for member in tar:
                parts = [p for p in pathlib.PurePosixPath(member.name).parts if p != "."]
                if len(parts) >= 3:
                    all_splits.add(parts[-3])
                elif len(parts) == 2 and member.isdir():
                    all_splits.add(parts[-2])
                if member.isdir() and len(parts) >= 2 and parts[-2] in splits:
                    found.setdefault(parts[-2], {}).setdefault(parts[-1], [])
                    continue
                if not member.isfile() or len(parts) < 3 or parts[-3] not in splits:
                    continue
                cls = found.setdefault(parts[-3], {}).setdefault(parts[-2], [])
                if _is_image(parts[-1]):
                    cls.append((f"{path}::{member.name}", tar.extractfile(member).read()))
            end = getattr(tar, "_end_seen", None)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read the archive {path}: {e}") from e
    if end != "marker":
        raise DataNotFoundError(
            f"the archive {path} ends without its end-of-archive blocks ({end}): it is truncated, "
            "and images after the cut are missing. Copy or download it again.")
    _read_archive_splits[path] = tuple(sorted(all_splits))
    out = {s: ({c: sorted(v) for c, v in found[s].items()} if s in found else None)
           for s in splits}
    _ARCHIVES[key] = out
    while len(_ARCHIVES) > 2:
        _ARCHIVES.popitem(last=False)
    return out


def estimate_stats(split: IndexedSplit, max_images: int = STATS_SAMPLE):
    """Per-channel mean and std in [0, 1] from up to ``max_images`` evenly spaced images."""
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
    return tuple(float(round(m, 4)) for m in mean), tuple(float(round(s, 4)) for s in std)


# ----------------------------------------------------------------------------- TFDS


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
    prepared first when it is not there and ``download`` is set."""
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
    if fixed and image_shape[-1] != 3:
        image_shape = (*image_shape[:2], 3)
    return Source(
        name=name,
        kind="tfds",
        location=str(builder.data_dir),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in class_names),
        image_shape=tuple(int(d) for d in image_shape) if fixed else None,
        mean=tuple(mean),
        std=tuple(std),
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
    blobs, labels, keys = [], [], []
    for ex in tfds.as_numpy(ds):
        blobs.append(bytes(ex[image_key]))
        labels.append(int(ex[label_key]))
        keys.append(f"{desc}: {ex['tfds_id'].decode()}")
    if len(blobs) != num_examples:
        raise ValueError(f"{desc}: read {len(blobs)} examples, the builder info says "
                         f"{num_examples}")
    labels = np.asarray(labels, np.int32)
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
