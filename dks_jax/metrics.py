"""Metric writers: JSON lines, the console and TensorBoard, none of them needing TensorFlow.

Every writer has clu's ``MetricWriter`` interface (``write_scalars``, ``write_hparams``, ``flush``,
``close``). TensorBoard event files go through tensorboardX (TensorFlow is optional at run time,
docs/design.md), with the same tags as ``metrics.jsonl``. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dks_jax import paths

METRICS_FILE = "metrics.jsonl"


def plain(value):
    """A scalar or array as a JSON value (NaN and infinities as strings: JSON has none)."""
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
        record = {"step": int(step), **{k: plain(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ConsoleWriter(_PlainWriter):
    """One readable line per call on stdout (absl logs go to stderr); metrics.jsonl has the rest.

    A train record (with ``loss``) prints progress, loss, main-head train top-1, images/s and the
    time left; an evaluation record the test top-1 of every head; the run's summary record its
    size. Other records (clu's ``steps_per_sec``/``uptime`` notes) are not printed.
    """

    SILENT = frozenset({"steps_per_sec", "uptime"})

    def __init__(self):
        self.total_steps = None

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        line = self.format(step, {k: plain(v) for k, v in scalars.items()})
        if line:
            print(line, flush=True)

    def format(self, step: int, s: Mapping) -> str:
        if "total_steps" in s:
            self.total_steps = int(s["total_steps"])
        total = self.total_steps
        where = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        if "loss" in s:
            parts = [where]
            if "epoch" in s:
                parts.append(f"epoch {s['epoch']:.2f}")
            parts.append(f"loss {_fmt(s['loss'])}")
            if "train_top1/C1" in s:
                parts.append(f"train top-1 {100 * s['train_top1/C1']:.1f}%")
            if "images_per_sec" in s:
                parts.append(f"{s['images_per_sec']:.0f} img/s")
            if "eta_min" in s:
                parts.append(f"eta {format_duration(60 * s['eta_min'])}")
            return " | ".join(parts)
        top1 = {k.split("/", 1)[1]: v for k, v in s.items() if k.startswith("eval_top1/")}
        if top1:
            heads = " ".join(f"{h} {v:.2f}" for h, v in top1.items())
            return f"{where} | test top-1 (%): {heads}"
        if "num_params" in s:
            return (f"{s['num_params']:,} parameters, {s.get('num_heads', 1)} head(s), "
                    f"{s.get('num_train', '?'):,} training / {s.get('num_eval', '?'):,} test images, "
                    f"{total} steps on {s.get('num_devices', '?')} device(s)")
        rest = {k: v for k, v in s.items() if k not in self.SILENT}
        if not rest:
            return ""
        return f"[{where}] " + " ".join(f"{k}={_fmt(v)}" for k, v in rest.items())


def _fmt(v) -> str:
    v = plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``4000`` -> ``"1h06m"``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


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


class TensorBoardWriter(_PlainWriter):
    """Scalars and hyperparameters as TensorBoard event files in ``logdir``, through tensorboardX."""

    def __init__(self, logdir):
        import tensorboardX  # a dependency; imported here so that importing metrics stays light

        self.logdir = str(logdir)
        self._writer = tensorboardX.SummaryWriter(self.logdir, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        for tag, value in scalars.items():
            value = plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, value, int(step))

    def write_hparams(self, hparams: Mapping):
        """The flax examples' ``write_hparams``: the config, flattened, in the HParams tab."""
        from tensorboardX.summary import hparams as hparams_summary

        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()}
        for summary in hparams_summary(flat, {"eval_top1/C1": 0.0}):
            self._writer.file_writer.add_summary(summary)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def create_writer(workdir, *, console: bool = True) -> MultiWriter:
    """Writers for ``workdir``: metrics.jsonl, console, and TensorBoard (``tensorboard/``)."""
    if jax.process_index() != 0:
        return MultiWriter([])
    workdir = paths.as_path(workdir)
    writers: list[Any] = [JsonlWriter(workdir / METRICS_FILE)]  # anything with write_scalars
    if console:
        writers.append(ConsoleWriter())
    writers.append(TensorBoardWriter(workdir / "tensorboard"))
    return MultiWriter(writers)


def features_off() -> list[str]:
    """What this installation cannot do, and why (logged once at start-up)."""
    if tensorflow_available():
        return []
    return ["TFDS data sets (cifar10, imagenet2012, ...) and the streaming tf.data loader: "
            "TensorFlow is not installed (pip install -e '.[tf]'); image folders and archives with "
            "the in-memory loader work"]


def parameter_table(params: Mapping, branches_key: str = "branches") -> str:
    """Parameters per top-level module (``clu.parameter_overview`` counts), the main path's and the
    branches' apart: ``module | parameters | share``."""
    from clu import parameter_overview  # works without TensorFlow

    total = parameter_overview.count_parameters(params)
    rows, sums = [], {"main path": 0, "branches": 0}
    for name, sub in params.items():
        subs = sub.items() if name == branches_key and isinstance(sub, Mapping) else [(None, sub)]
        for index, tree in subs:
            n = parameter_overview.count_parameters(tree)
            sums["branches" if index is not None else "main path"] += n
            rows.append((name if index is None else f"{name}/{index}", n))
    width = max(len(r[0]) for r in rows + [("main path", 0)])
    lines = [f"{'module':<{width}}  {'parameters':>12}  share"]
    lines += [f"{m:<{width}}  {n:>12,}  {100 * n / max(total, 1):5.1f}%" for m, n in rows]
    lines += [f"{m:<{width}}  {n:>12,}  {100 * n / max(total, 1):5.1f}%" for m, n in sums.items()]
    return "\n".join(lines)


def read_metrics(workdir) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl``, in order."""
    path = paths.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_so_far(workdir) -> float:
    """Seconds of training already spent on the run in ``workdir`` (0 for a new run): the last
    ``elapsed_s`` of its metrics.jsonl, which counts every earlier segment of a resumed run,
    work that a stop made redo included."""
    values = [r["elapsed_s"] for r in read_metrics(workdir) if "elapsed_s" in r]
    return float(values[-1]) if values else 0.0
