"""Test set-up: 8 fake CPU devices and XNNPACK convolutions, set before JAX is imported, and a
compilation cache for the session.

Tests that want one device build their mesh from ``jax.devices()[:1]``. Many tests compile the same
tiny programs (the same step of the same config, in-process or in a subprocess of the command line):
JAX's persistent compilation cache, in a fresh folder per session that is removed at exit, compiles
each once (the training tests: a third less time). ``JAX_COMPILATION_CACHE_DIR`` set by the caller is
left alone.
"""

import atexit
import os
import pathlib
import shutil
import tarfile
import tempfile

import pytest

from dks_jax import xla_flags

_FLAGS = [
    "--xla_force_host_platform_device_count=8",
    *xla_flags.CPU_FLAGS,  # what the command-line tools use on CPU
    # 8 fake devices share 2 cores, so a participant of a collective can arrive seconds after
    # the others; one that never arrives is a hang, which XLA aborts after 120 + 120 s with the
    # rendezvous named (pytest-timeout's per-test limit, pyproject.toml, comes after that).
    "--xla_cpu_collective_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=120",
]
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # inherited by the tests' subprocesses
    _CACHE = tempfile.mkdtemp(prefix="dks_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("DKS_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_tar():
    """Path of the real CIFAR-10 JPEG archive (skips when the shared folder is absent)."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"{CIFAR_TAR} not found (set DKS_SHARED_DATA to the folder holding it)")
    return CIFAR_TAR


@pytest.fixture(scope="session")
def cifar_subset(cifar_tar, tmp_path_factory):
    """A small real image folder: the first 40 train and 20 test images of each CIFAR-10 class.

    Layout ``<root>/{train,test}/<class>/<name>.jpg``, read from the shared archive once per session.
    """
    root = tmp_path_factory.mktemp("cifar_subset")
    quota = {"train": 40, "test": 20}
    counts = {}
    with tarfile.open(cifar_tar, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = pathlib.PurePosixPath(member.name).parts
            split, cls = parts[-3], parts[-2]
            if split not in quota or counts.get((split, cls), 0) >= quota[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dest = root / split / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    return root
