"""Workdirs and data paths, local or on Cloud Storage, through ``dks_jax.paths`` (etils.epath).

Offline: a ``gs://`` URL must stay a URL (``pathlib`` and ``os.path`` turn ``gs://b`` into ``gs:/b``),
join like a path, and reach the storage backend whole. For the last part the gs:// backend is a
local folder (``epath.testing.mock_epath``), and the run folder's files (config, metrics, moved
checkpoints) are written and read back through it.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from etils import epath
from etils.epath import gpath

from dks_jax import checkpointing, metrics, paths


def test_gs_url_stays_a_url_and_joins_like_a_path():
    workdir = paths.as_path("gs://my-bucket/dks/run 1")
    assert isinstance(workdir, epath.Path)
    assert paths.is_remote(workdir) and paths.is_remote("gs://my-bucket/dks/run 1")
    assert str(workdir) == os.fspath(workdir) == "gs://my-bucket/dks/run 1"
    step = workdir / "checkpoints" / "1000"
    assert str(step) == "gs://my-bucket/dks/run 1/checkpoints/1000"
    assert step.name == "1000" and str(step.parent.parent) == "gs://my-bucket/dks/run 1"
    assert str(paths.as_path("gs://my-bucket/dks/")) == "gs://my-bucket/dks"
    assert paths.as_path(workdir) is workdir
    # Through a string and back (TFDS data_dir, TensorBoard logdir=str(workdir)): unchanged.
    assert str(paths.as_path(str(step))) == str(step)
    assert str(paths.as_path("gs://bucket/tfds")) == "gs://bucket/tfds"
    # What the helper is for: the standard library collapses the '//' of a URL.
    assert str(pathlib.Path("gs://my-bucket/dks")) == "gs:/my-bucket/dks"
    assert os.path.normpath("gs://my-bucket/dks") == "gs:/my-bucket/dks"


def test_local_workdir_has_the_same_interface(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    workdir = paths.as_path("~/runs/r1")
    assert not paths.is_remote(workdir) and not paths.is_remote(tmp_path)
    assert str(workdir) == str(tmp_path / "runs" / "r1")
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json"]
    assert paths.as_path(tmp_path / "runs" / "r1") == workdir


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://BUCKET/KEY served from tmp_path/gcs/BUCKET/KEY; yields (root, URLs the backend got)."""
    # With TensorFlow installed epath sends gs:// to tf.io.gfile; this routes it to the backend
    # table, which mock_epath replaces (private etils API: skip rather than reach the network).
    if not callable(getattr(gpath, "_is_tf_installed", None)):
        pytest.skip("etils.epath.gpath._is_tf_installed is gone: cannot keep gs:// offline")
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    root = tmp_path / "gcs"
    root.mkdir()
    seen = []

    def local(path):
        text = os.fspath(path)
        if text.startswith("gs://"):
            seen.append(text)
            return str(root / text[len("gs://"):])
        return text

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def glob(original, pattern):
        found = original(local(pattern))
        if not os.fspath(pattern).startswith("gs://"):
            return found
        return ["gs://" + os.path.relpath(f, root) for f in found]

    with epath.testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
                                  mkdir=one, remove=one, rmtree=one, stat=one, rename=two,
                                  replace=two, copy=two, glob=glob):
        yield root, seen


def test_run_folder_files_on_gs_reach_the_backend_as_urls(fake_gcs):
    root, seen = fake_gcs
    workdir = paths.as_path("gs://bucket/dks/r18")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps({"batch_size": 1024}))
    writer = metrics.JsonlWriter(workdir / metrics.METRICS_FILE)
    writer.write_scalars(1, {"loss": 2.5})
    writer.write_scalars(2, {"loss": 1.5})
    assert metrics.read_metrics("gs://bucket/dks/r18") == [
        {"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}]
    assert json.loads((root / "bucket/dks/r18/config.json").read_text()) == {"batch_size": 1024}
    assert "gs://bucket/dks/r18/metrics.jsonl" in seen
    assert seen and all(url.startswith("gs://bucket/dks/r18") for url in seen)


def test_checkpoints_are_moved_aside_on_gs(fake_gcs):
    root, seen = fake_gcs
    workdir = paths.as_path("gs://bucket/runs/a")
    (workdir / "checkpoints" / "500").mkdir(parents=True)
    (workdir / "best").mkdir()
    moved = checkpointing.move_aside("gs://bucket/runs/a")
    assert str(moved) == "gs://bucket/runs/a/previous-0"
    assert (root / "bucket/runs/a/previous-0/checkpoints/500").is_dir()
    assert (root / "bucket/runs/a/previous-0/best").is_dir()
    assert not (root / "bucket/runs/a/checkpoints").exists()
    assert all(url.startswith("gs://bucket/runs/a") for url in seen)


def test_relative_local_workdir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = paths.as_path("workdirs/r1")
    assert workdir.is_absolute()
    assert str(workdir) == str(tmp_path / "workdirs" / "r1")
