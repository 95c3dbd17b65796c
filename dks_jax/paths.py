"""Paths that may be local or on Cloud Storage (``gs://...``), through ``etils.epath``."""

from __future__ import annotations

import os

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")


def as_path(path: str | os.PathLike) -> epath.Path:
    """An ``epath.Path``: a local path made absolute (``~`` expanded), or a ``gs://`` URL kept intact."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if not is_remote(text):
        # Orbax needs absolute paths.
        text = os.path.abspath(os.path.expanduser(text))
    return epath.Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URLs such as ``gs://bucket/dir``."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)
