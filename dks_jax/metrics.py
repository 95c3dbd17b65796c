"""Metric writers: JSON lines always, the console, and TensorBoard through clu when TensorFlow is there.

clu's writers and periodic actions import TensorFlow, which is optional at run time (DESIGN.md), so
the JSONL and console writers below are plain Python with the same ``write_scalars`` interface.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
import numpy as np

from dks_jax import paths

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class _PlainWriter:
    """The parts of clu's ``MetricWriter`` interface these writers do not need."""

    def write_hparams(self, hparams: Mapping):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class JsonlWriter(_PlainWriter):
    """Appends ``{"step": s, "name": value, ...}`` lines to ``<workdir>/metrics.jsonl``."""

    def __init__(self, path):
        self.path = paths.as_path(path)

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ConsoleWriter(_PlainWriter):
    """Prints one line per call (stdout; absl logs go to stderr)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        text = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
        print(f"[step {step}] {text}", flush=True)


def _fmt(v) -> str:
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MultiWriter:
    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def create_writer(workdir, *, console: bool = True) -> MultiWriter:
    """Writers for ``workdir``: metrics.jsonl, console, and TensorBoard (``tensorboard/``) via clu."""
    if jax.process_index() != 0:
        return MultiWriter([])
    workdir = paths.as_path(workdir)
    writers = [JsonlWriter(workdir / METRICS_FILE)]
    if console:
        writers.append(ConsoleWriter())
    if tensorflow_available():
        from clu import metric_writers

        writers.append(metric_writers.SummaryWriter(str(workdir / "tensorboard")))
    return MultiWriter(writers)


def read_metrics(workdir) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl``, in order."""
    path = paths.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
