"""Image folders: ``<root>/<split>/<class>/<image>`` in a directory or a tar archive.

The same layout may sit inside a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive (an optional leading
folder is allowed). Classes are the sub-folders of the training split, sorted by name: class
``i`` is the ``i``-th name. Within a class, images are sorted by file name, so the example order
(index ``i``) is fixed by the data. Images are JPEG, PNG, BMP or GIF (other files are ignored),
converted to RGB.

Archives are **read in place**: one sequential pass keeps the encoded images in host memory
(about the archive's size); nothing is unpacked or written anywhere, so a read-only shared
folder works and no cache can be left half-written or stale. For archives larger than host
memory, unpack them once (``tar xf``) and point ``dataset`` at the folder.

A TFDS name (``cifar10``) is served from an image-folder copy under ``data_dir`` when there is
one (``find_folder_copy``); the copy must then have the named data set's classes and split sizes.
"""

from __future__ import annotations

import collections
import os
import pathlib
import tarfile
import zlib

import numpy as np

from dks_jax.data.sources import (
    KNOWN_SIZES,
    KNOWN_STATS,
    DataNotFoundError,
    IndexedSplit,
    Source,
    estimate_stats,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


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


def image_folder(path, train_split: str, eval_split: str, *, name: str | None = None) -> Source:
    """Source for a folder or archive in the ``<split>/<class>/<image>`` layout.

    Both splits are ``IndexedSplit``s: labels int32 [N] (class index, classes sorted by folder
    name), examples sorted by class, then file name. ``image_shape`` is example 0's (H, W, 3).
    ``name`` (a TFDS name such as ``cifar10``) selects known normalisation statistics and the
    split sizes to check (``KNOWN_SIZES``); otherwise mean and std are estimated from up to
    ``sources.STATS_SAMPLE`` training images.
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
    known = KNOWN_STATS.get(name) if name else None
    mean, std = known if known is not None else estimate_stats(train)
    return Source(
        name=name or path.name,
        kind="image_folder",
        location=location,
        num_classes=len(class_names),
        class_names=class_names,
        image_shape=train.first_shape(),
        mean=mean,
        std=std,
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
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file (member.isfile() above)
                    cls.append((f"{path}::{member.name}", f.read()))
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

