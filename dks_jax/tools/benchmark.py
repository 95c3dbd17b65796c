"""Training-step speed: ``python -m dks_jax.tools.benchmark --model=resnet18 --method=dks``.

Builds the real training step (``state.create``, ``steps.train_step``: model, objective, optimizer;
``jax.jit`` with the state donated) on synthetic data already on the devices (sharded over the
mesh's ``'data'`` axis), then:

- times ``lower`` and ``compile`` separately (``compile_s`` is their sum; no persistent compilation
  cache is used unless the environment turns one on);
- runs ``warmup`` steps (not timed), then ``steps`` steps, each timed on the host clock from dispatch
  to ``block_until_ready`` of its loss (all outputs of one XLA executable complete together), and
  reports the median (and min, p90) of those step times; it also times the same number of steps
  dispatched back to back with one sync at the end (``pipelined_step_ms``, what the training loop
  sees, since it never syncs per step);
- rotates over ``num_batches`` different random batches (normal images, uniform labels: never
  zeros, which can run faster than real data);
- reads the peak device memory (``device.memory_stats()``, where the backend has it, else n/a),
  XLA's own memory and FLOP analysis of the compiled step, and the per-image forward multiply-adds
  of the model from ``models.complexity``;
- MFU = 3 x 2 x MACs x images/s / (peak FLOP/s x devices), the peak from :data:`PEAK_FLOPS` (n/a on
  CPU and unknown devices). 3x: a training step costs about one forward and two forward-sized
  backward passes; 2: one multiply-add is two floating-point operations.

One JSON record per measurement is written to ``--output`` (a folder, default
``results/benchmarks/``, or a ``.json`` path), with the keys of :data:`REQUIRED_KEYS` and more.
``--compare_torch`` also times the PyTorch reference (``torch_reference.py`` beside this file, run by
``--torch_python``, e.g. ``.venv-torch/bin/python`` of ``make torch-env``) on the same device with
the same sizes, interleaved with JAX (:func:`measure_interleaved`): the reference starts as one
persistent subprocess and builds and warms up *before* JAX touches the device (JAX pre-allocates
most of a GPU's memory); then JAX compiles and warms up once; then ``--rounds`` rounds (default 3)
alternate, each ``steps`` timed PyTorch steps followed by ``steps`` timed JAX steps, so that a
change in the machine's load or clock during the measurement reaches both sides alike. Each side
reports the median step time over all its rounds' steps (``step_ms``, ``torch_step_ms``) and the
median of every round (``step_ms_rounds``, ``torch_step_ms_rounds``); the record adds the PyTorch
result's fields prefixed ``torch_`` (``torch_num_threads``: its ``torch.get_num_threads()``) and
``jax_over_torch`` = JAX images/s / PyTorch images/s. Without ``--compare_torch``, one round.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import platform
import queue
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from dks_jax import xla_flags

if __name__ == "__main__":  # the command line: the CPU defaults of dks_jax.main, before JAX starts
    xla_flags.apply_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from dks_jax import (  # noqa: E402
    cli,  # noqa: E402
    config_base,
    models,
    parallel,
    seeds,
    steps,
)
from dks_jax import state as state_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = "results/benchmarks"
PROG = "python -m dks_jax.tools.benchmark"
TORCH_SCRIPT = pathlib.Path(__file__).resolve().parent / "torch_reference.py"
# A nominal epoch length for the learning-rate schedule (the schedule's values do not change speed).
STEPS_PER_EPOCH = 1000
TORCH_METHODS = ("baseline", "ds", "dks")  # what torch_reference.py implements
# torch_reference.MODELS: model -> the aux designs the reference builds (a test checks they agree).
TORCH_MODELS = {
    **{name: ("none", "paper")
       for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{name: ("none", "paper", "narrow")
       for name in ("cifar_resnet8", "cifar_resnet14", "cifar_resnet20", "cifar_resnet32")},
    "cifar_resnet110": ("none", "paper"),
}
DEFAULT_ROUNDS = 3

# Keys every record has, plus ``torch_images_per_sec`` when a comparison ran.
REQUIRED_KEYS = (
    "device", "jax_version", "date", "command", "model", "aux", "method", "batch_size",
    "image_size", "dtype", "images_per_sec", "step_ms", "compile_s", "macs_per_image",
)


@dataclasses.dataclass(frozen=True)
class Peak:
    """Peak dense FLOP/s of one device for MFU.

    ``reference``: the figure MFU is computed against; ``datasheet``: the vendor's dense (no
    sparsity) figure, recorded too (``mfu_datasheet``) for comparison with published MFU numbers.
    """

    bfloat16: float | None
    float32: float | None
    datasheet_bfloat16: float | None
    datasheet_float32: float | None
    source: str


# Keyed by a substring of ``jax.Device.device_kind``; the first match wins (so "H100 PCIe" before
# "H100"). H100 and H200 (SXM): the reference ceiling is 790 TFLOP/s bf16, what an 8192^3 bf16
# matrix product reaches on an H100 or H200 (769-798 TFLOP/s measured);
# the datasheet says 989.4 TFLOP/s dense bf16. float32 runs XLA's convolutions and dots in TF32 on
# these GPUs by default: datasheet TF32 dense 494.7 TFLOP/s (no measured figure). Others: datasheets.
PEAK_FLOPS: dict[str, Peak] = {
    "H100 PCIe": Peak(756e12, 378e12, 756e12, 378e12, "NVIDIA H100 PCIe datasheet, dense"),
    "H100": Peak(790e12, 494.7e12, 989.4e12, 494.7e12,
                 "reference 790 TFLOP/s bf16 (measured 8192^3 bf16 matmul); "
                 "datasheet H100 SXM 989.4 bf16 / 494.7 TF32, dense"),
    "H200": Peak(790e12, 494.7e12, 989.4e12, 494.7e12,
                 "reference 790 TFLOP/s bf16 (measured 8192^3 bf16 matmul); "
                 "datasheet H200 SXM 989.4 bf16 / 494.7 TF32, dense"),
    "A100": Peak(312e12, 156e12, 312e12, 156e12, "NVIDIA A100 datasheet, dense bf16 / TF32"),
    "TPU v4": Peak(275e12, None, 275e12, None, "Cloud TPU v4 datasheet, bf16"),
    "TPU v5 lite": Peak(197e12, None, 197e12, None, "Cloud TPU v5e datasheet, bf16"),
    "TPU v5": Peak(459e12, None, 459e12, None, "Cloud TPU v5p datasheet, bf16"),
    "TPU v6 lite": Peak(918e12, None, 918e12, None, "Cloud TPU v6e datasheet, bf16"),
}


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, float | None, str]:
    """``(reference, datasheet, source)`` peak FLOP/s per device, or ``(None, None, "")``."""
    for key, peak in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return getattr(peak, dtype), getattr(peak, f"datasheet_{dtype}"), peak.source
    return None, None, ""


def mfu(macs_per_image: float, images_per_sec: float, peak: float | None, num_devices: int):
    """Model FLOP utilisation: ``3 * 2 * MACs * images/s / (peak * devices)``; None without a peak."""
    if not peak:
        return None
    return 6.0 * macs_per_image * images_per_sec / (peak * num_devices)


# ---- options ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    """What to measure. ``aux=None``: ``"none"`` for the baseline method, else ``"paper"``.
    ``image_size=0``: the model's design size; ``num_classes=0``: 1000 for ImageNet models, 10 else.
    ``num_devices=0``: every device."""

    model: str = "resnet18"
    aux: str | None = None
    method: str = "dks"
    branches: str = ""
    batch_size: int = 256
    image_size: int = 0
    num_classes: int = 0
    dtype: str = "auto"  # auto: float32 on the CPU (no bfloat16 units), bfloat16 on accelerators
    steps: int = 50
    warmup: int = 5
    num_batches: int = 2
    bn_group_size: int = 0
    num_devices: int = 0
    seed: int = 0
    num_seeds: int = 1  # > 1: that many seeds in one vmapped step (config.num_seeds), each a batch

    def resolved(self) -> Options:
        """A copy with the defaults that depend on the model filled in, validated."""
        if self.model not in models.names():
            raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(models.names())}")
        if self.method not in config_base.METHODS or self.method == "kd":
            valid = [m for m in config_base.METHODS if m != "kd"]
            raise ValueError(f"method {self.method!r} cannot be benchmarked; valid: {valid}")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        if dtype not in state_lib.DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(state_lib.DTYPES)}")
        if self.num_seeds < 1:
            raise ValueError(f"num_seeds must be at least 1, got {self.num_seeds}")
        if self.steps < 1 or self.warmup < 1 or self.num_batches < 1:
            raise ValueError("steps, warmup and num_batches must be at least 1 (the first warm-up "
                             "step absorbs one-off costs)")
        design = models.spec(self.model).image_size
        aux = self.aux or ("none" if self.method == "baseline" else "paper")
        return dataclasses.replace(
            self,
            aux=aux,
            dtype=dtype,
            image_size=self.image_size or design,
            num_classes=self.num_classes or (1000 if design >= 64 else 10),
        )


def build_config(options: Options):
    """The base config (SGD 0.9, weight decay 1e-4, lr 0.1) with the benchmark's fields."""
    c = config_base.base()
    c.model, c.aux, c.method = options.model, options.aux, options.method
    c.branches = options.branches
    c.num_classes, c.image_size = options.num_classes, options.image_size
    c.batch_size, c.dtype = options.batch_size, options.dtype
    c.bn_group_size, c.seed = options.bn_group_size, options.seed
    if models.spec(options.model).image_size >= 64:
        c.lr_boundaries = (30.0, 60.0, 90.0)
        c.num_epochs = 100.0
    return c


# ---- measurement --------------------------------------------------------------------------------


def synthetic_batches(options: Options, mesh) -> list[dict]:
    """``num_batches`` batches of normal float32 images and uniform labels, made on the devices."""
    lead = (options.num_seeds,) if options.num_seeds > 1 else ()  # one batch per seed
    sharding = (seeds.stacked_batch_sharding(mesh) if lead else parallel.batch_sharded(mesh))
    shape = (*lead, options.batch_size, options.image_size, options.image_size, 3)

    def make(key):
        k1, k2 = jax.random.split(key)
        return {
            "image": jax.random.normal(k1, shape, jnp.float32),
            "label": jax.random.randint(k2, (*lead, options.batch_size), 0, options.num_classes,
                                        jnp.int32),
        }

    make = jax.jit(make, out_shardings={"image": sharding, "label": sharding})
    keys = jax.random.split(jax.random.key(options.seed + 1), options.num_batches)
    return [make(k) for k in keys]


def _memory_peak(devices) -> int | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without the API raise various errors
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _xla_analysis(compiled) -> dict:
    """XLA's memory and FLOP estimates of the compiled step (per device program), where available."""
    out: dict[str, int | float] = {}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            out["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
            out["xla_argument_bytes"] = int(mem.argument_size_in_bytes)
            out["xla_output_bytes"] = int(mem.output_size_in_bytes)
    except Exception as e:  # noqa: BLE001
        logging.info("memory_analysis unavailable: %s", e)
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else None
        if cost and "flops" in cost:
            out["xla_flops_per_device_step"] = float(cost["flops"])
    except Exception as e:  # noqa: BLE001
        logging.info("cost_analysis unavailable: %s", e)
    return out


class JaxBench:
    """The compiled train step on its synthetic batches, warmed up: :meth:`timed` runs timed steps
    (one round), :meth:`pipelined` back-to-back steps; :meth:`result` is the measurement."""

    def __init__(self, options: Options):
        o = self.options = options.resolved()
        self.devices = jax.devices()[: o.num_devices] if o.num_devices else jax.devices()
        mesh = parallel.create_mesh(self.devices)
        parallel.check_batch_size(o.batch_size, mesh)
        config = build_config(o)
        # With several seeds, the vmapped program of config.num_seeds (dks_jax.seeds).
        seed_list = [o.seed + i for i in range(o.num_seeds)] if o.num_seeds > 1 else None
        setup = state_lib.create(config, o.num_classes, STEPS_PER_EPOCH, seeds=seed_list)
        self.num_heads, self.num_params = setup.num_heads, setup.num_params
        step_fn = steps.train_step(setup, o.seed)
        state = parallel.replicate(setup.state, mesh)
        del setup
        self.batches = synthetic_batches(o, mesh)
        jax.block_until_ready((state, self.batches))

        jitted = jax.jit(step_fn, donate_argnums=0)
        t0 = time.perf_counter()
        lowered = jitted.lower(state, self.batches[0])
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t0

        self.in_flight = parallel.InFlight()  # unbounded dispatch can hang XLA:CPU (parallel.py)
        for i in range(o.warmup):
            state, metrics = self.compiled(state, self.batches[i % o.num_batches])
            self.in_flight.add(metrics)
        jax.block_until_ready((state, metrics))
        self.loss_first = float(np.mean(metrics["loss"]))
        if not math.isfinite(self.loss_first):
            raise FloatingPointError(f"non-finite loss {self.loss_first} during warm-up")
        self.state, self.metrics = state, metrics
        self.next_batch = 0

    def _batch(self):
        batch = self.batches[self.next_batch % len(self.batches)]
        self.next_batch += 1
        return batch

    def timed(self, n: int) -> list[float]:
        """``n`` steps, each timed from dispatch to ``block_until_ready`` of its loss (seconds)."""
        times = []
        for _ in range(n):
            batch = self._batch()
            start = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, batch)
            self.metrics["loss"].block_until_ready()
            times.append(time.perf_counter() - start)
        jax.block_until_ready(self.state)
        return times

    def pipelined(self, n: int) -> float:
        """Seconds per step of ``n`` steps dispatched back to back, one sync at the end."""
        start = time.perf_counter()
        for _ in range(n):
            self.state, self.metrics = self.compiled(self.state, self._batch())
            self.in_flight.add(self.metrics)
        jax.block_until_ready((self.state, self.metrics))
        return (time.perf_counter() - start) / n

    def result(self, rounds: list[list[float]], pipelined: float) -> dict:
        """The measured fields (module docstring) of the step times of ``rounds``."""
        o, devices = self.options, self.devices
        times = [t for r in rounds for t in r]
        step_s = statistics.median(times)
        seen = o.batch_size * o.num_seeds  # images per step, over all seeds
        assert o.aux is not None  # resolved() fills it in
        comp = models.complexity(o.model, o.num_classes, image_size=o.image_size, aux=o.aux,
                                 branches=o.branches or None)
        macs = int(comp["total"]["macs"])
        kind = devices[0].device_kind
        ref_peak, sheet_peak, peak_source = peak_flops(kind, o.dtype)
        images_per_sec = seen / step_s
        result = {
            "device": kind,
            "platform": devices[0].platform,
            "num_devices": len(devices),
            "model": o.model,
            "aux": o.aux,
            "branches": o.branches,
            "method": o.method,
            "num_heads": self.num_heads,
            "batch_size": o.batch_size,
            "image_size": o.image_size,
            "num_classes": o.num_classes,
            "dtype": o.dtype,
            "bn_group_size": o.bn_group_size,
            "steps": len(rounds[0]),
            "rounds": len(rounds),
            "warmup": o.warmup,
            "num_params": self.num_params,
            "images_per_sec": images_per_sec,
            "step_ms": 1e3 * step_s,
            "step_ms_min": 1e3 * min(times),
            "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
            "step_ms_rounds": [1e3 * statistics.median(r) for r in rounds],
            "pipelined_step_ms": 1e3 * pipelined,
            "pipelined_images_per_sec": seen / pipelined,
            "num_seeds": o.num_seeds,
            "lower_s": self.lower_s,
            "compile_s": self.compile_s,
            "peak_memory_bytes": _memory_peak(devices),
            "macs_per_image": macs,
            "macs_main_per_image": int(comp["main"]["macs"]),
            "train_flops_per_image": 6 * macs,
            "peak_flops_per_device": ref_peak,
            "peak_flops_source": peak_source,
            "mfu": mfu(macs, images_per_sec, ref_peak, len(devices)),
            "mfu_datasheet": mfu(macs, images_per_sec, sheet_peak, len(devices)),
            "loss_first": self.loss_first,
            "loss_last": float(np.mean(self.metrics["loss"])),
        }
        xla = _xla_analysis(self.compiled)
        if "xla_flops_per_device_step" in xla:
            xla["xla_flops_per_image"] = (xla["xla_flops_per_device_step"] * len(devices)
                                          / o.batch_size)
        result.update(xla)
        return result


def measure_jax(options: Options, rounds: int = 1) -> dict:
    """Builds and times the train step: ``rounds`` x ``steps`` timed steps, then the pipelined
    ones; returns the measured fields (see the module docstring)."""
    bench = JaxBench(options)
    times = [bench.timed(bench.options.steps) for _ in range(rounds)]
    return bench.result(times, bench.pipelined(bench.options.steps))


# ---- the PyTorch reference ----------------------------------------------------------------------


def torch_command(options: Options, json_out: str, *, python: str | None = None,
                  compile_mode: str = "auto", serve: bool = False) -> list[str]:
    """The command line of the PyTorch reference (``torch_reference.py``) for the same measurement;
    ``serve``: as the persistent server of :class:`TorchServer` (``json_out`` may be empty)."""
    o = options.resolved()
    if o.model not in TORCH_MODELS:
        raise ValueError(f"the PyTorch reference has models {tuple(TORCH_MODELS)}, not {o.model!r}")
    if o.aux not in TORCH_MODELS[o.model]:
        raise ValueError(f"the PyTorch reference has aux {TORCH_MODELS[o.model]} for {o.model}, "
                         f"not {o.aux!r}")
    if o.method not in TORCH_METHODS:
        raise ValueError(f"the PyTorch reference has methods {TORCH_METHODS}, not {o.method!r}")
    if o.branches:
        raise ValueError("the PyTorch reference builds the default branches only")
    cmd = [
        python or sys.executable, str(TORCH_SCRIPT),
        "--model", o.model, "--aux", o.aux, "--method", o.method,
        "--batch_size", str(o.batch_size), "--image_size", str(o.image_size),
        "--num_classes", str(o.num_classes), "--dtype", o.dtype,
        "--steps", str(o.steps), "--warmup", str(o.warmup), "--num_batches", str(o.num_batches),
        "--seed", str(o.seed), "--compile", compile_mode,
    ]
    if json_out:
        cmd += ["--json_out", json_out]
    return cmd + (["--serve"] if serve else [])


def measure_torch(options: Options, *, python: str | None = None, compile_mode: str = "auto",
                  timeout: float | None = None) -> dict:
    """Runs the PyTorch reference once in a subprocess (``steps`` timed steps, one round); returns
    its result (or ``{"error": ...}``)."""
    if not TORCH_SCRIPT.exists():
        return {"error": f"{TORCH_SCRIPT} not found (run from a checkout of the repository)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = torch_command(options, out, python=python, compile_mode=compile_mode)
        logging.info("PyTorch reference: %s", shlex.join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        with open(out) as f:
            return json.load(f)


class TorchError(RuntimeError):
    """The PyTorch reference failed, exited or did not answer in time."""


class TorchServer:
    """The PyTorch reference as one persistent subprocess (``torch_reference.py --serve``).

    It builds, compiles and warms up once, at start (before the caller initialises JAX), then times
    ``n`` steps on each :meth:`timed`; :meth:`finish` returns its result over every round. Why one
    process for all rounds rather than one per round: each side keeps its warmed-up state across the
    rounds, as the JAX side keeps its compiled program (a process per round would compile again
    with ``torch.compile`` on GPU, a minute or more, and re-import torch); and the device memory
    PyTorch takes while warming up stays its own, claimed before JAX pre-allocates its share of a
    GPU's memory (where both do not fit, lower ``XLA_PYTHON_CLIENT_MEM_FRACTION``). Between its
    rounds it waits on its standard input, using no processor time.

    ``timeout``: seconds to wait for each answer (start-up and warm-up, each round, the result).
    """

    def __init__(self, options: Options, *, python: str | None = None, compile_mode: str = "auto",
                 timeout: float | None = None):
        if not TORCH_SCRIPT.exists():
            raise TorchError(f"{TORCH_SCRIPT} not found (run from a checkout of the repository)")
        self.timeout = timeout
        cmd = torch_command(options, "", python=python, compile_mode=compile_mode, serve=True)
        logging.info("PyTorch reference (server): %s", shlex.join(cmd))
        self._stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True, bufsize=1)
        except OSError as e:
            self._stderr.close()
            raise TorchError(f"cannot start {cmd[0]}: {e}") from None
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        try:
            self.info = self._answer("ready")
        except TorchError:
            self.close()
            raise

    def _read_lines(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output: the process exited

    def _stderr_tail(self, lines: int = 5) -> str:
        self._stderr.seek(0)
        return " | ".join(self._stderr.read().strip().splitlines()[-lines:])

    def _answer(self, event: str) -> dict:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                line = self._lines.get(timeout=wait)
            except queue.Empty:
                self.close()
                raise TorchError(f"no {event!r} answer after {self.timeout} s") from None
            if line is None:
                code = self.proc.wait()
                raise TorchError(f"exit {code}: {self._stderr_tail()}")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                logging.info("PyTorch reference: %s", line.rstrip())
                continue
            if message.get("event") == event:
                message.pop("event")
                return message
            self.close()
            raise TorchError(f"expected {event!r}, got {line.strip()[:200]}")

    def _send(self, command: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            code = self.proc.wait()
            raise TorchError(f"exit {code}: {self._stderr_tail()}") from None

    def timed(self, n: int) -> list[float]:
        """``n`` steps timed in the reference: their seconds, one round of its result."""
        self._send(f"run {n}")
        return [float(t) for t in self._answer("times")["times"]]

    def finish(self) -> dict:
        """The reference's result over every round; the process exits."""
        self._send("done")
        result = self._answer("result")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        self.close()
        return result

    def close(self) -> None:
        """Ends the process (if it still runs)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def interleave(jax_side, torch_side, rounds: int, steps: int):
    """``rounds`` rounds of ``steps`` timed steps per side, alternating: PyTorch, then JAX, in every
    round. ``*_side.timed(n)`` returns the step seconds. Returns ``(jax_rounds, torch_rounds,
    torch_error)``; a PyTorch failure (``TorchError``) ends its side, and JAX's rounds go on;
    ``torch_side=None``: JAX only."""
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be at least 1, got {rounds} and {steps}")
    jax_rounds: list[list[float]] = []
    torch_rounds: list[list[float]] = []
    error = None
    for r in range(rounds):
        if error is None and torch_side is not None:
            try:
                torch_rounds.append(torch_side.timed(steps))
            except TorchError as e:
                error = f"round {r + 1}: {e}"
                logging.warning("The PyTorch reference failed: %s", error)
        jax_rounds.append(jax_side.timed(steps))
        logging.info("round %d/%d: JAX %.2f ms/step%s", r + 1, rounds,
                     1e3 * statistics.median(jax_rounds[-1]),
                     f", PyTorch {1e3 * statistics.median(torch_rounds[-1]):.2f} ms/step"
                     if len(torch_rounds) == r + 1 else "")
    return jax_rounds, torch_rounds, error


def measure_interleaved(options: Options, *, rounds: int = DEFAULT_ROUNDS,
                        python: str | None = None, compile_mode: str = "auto",
                        timeout: float | None = None) -> tuple[dict, dict]:
    """``(jax_result, torch_result)`` of :func:`interleave`: the PyTorch server starts and warms
    up first, then JAX compiles and warms up once, then the rounds alternate; each side's
    ``step_ms`` is the median over all its steps, ``step_ms_rounds`` the median of each round.
    ``torch_result`` is ``{"error": ...}`` if the reference failed (JAX is measured anyway)."""
    o = options.resolved()
    server = None
    error = None
    try:
        server = TorchServer(o, python=python, compile_mode=compile_mode, timeout=timeout)
    except TorchError as e:
        error = f"start: {e}"
        logging.warning("The PyTorch reference failed: %s", error)
    try:
        bench = JaxBench(o)
        jax_rounds, _, torch_error = interleave(bench, server, rounds, o.steps)
        jax_result = bench.result(jax_rounds, bench.pipelined(o.steps))
        if server is not None and torch_error is None:
            try:
                return jax_result, server.finish()
            except TorchError as e:
                torch_error = f"result: {e}"
        return jax_result, {"error": error or torch_error}
    finally:
        if server is not None:
            server.close()


# ---- records ------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_record(result: dict, command: str, torch_result: dict | None = None,
                now: datetime.datetime | None = None) -> dict:
    """The JSON record: environment + the JAX measurement (+ the PyTorch one, prefixed ``torch_``)."""
    import flax
    import jaxlib
    import optax

    now = now or datetime.datetime.now(datetime.UTC)
    record = {
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "python_version": platform.python_version(),
        "host": platform.node(),
        "git_commit": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # A persistent compilation cache would make compile_s a cache read: recorded, never set here.
        # jax.config sets its options as attributes at run time; its class declares none of them.
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir,  # type: ignore[attr-defined]
    }
    record.update(result)
    if torch_result is not None:
        if "error" in torch_result:
            record["torch_error"] = torch_result["error"]
            record["torch_images_per_sec"] = None
        else:
            for k, v in torch_result.items():
                record[k if k.startswith("torch_") else f"torch_{k}"] = v
            record["jax_over_torch"] = record["images_per_sec"] / record["torch_images_per_sec"]
    return record


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def record_path(record: dict, output: str) -> pathlib.Path:
    """``output`` if it ends in .json, else a new file in the folder ``output``."""
    path = pathlib.Path(output)
    if path.suffix == ".json":
        return path
    stamp = record["timestamp"].replace("-", "").replace(":", "")
    name = "_".join([
        stamp, _slug(record["device"]), record["model"], record["aux"], record["method"],
        f"b{record['batch_size']}", f"{record['image_size']}px", record["dtype"],
    ])
    candidate = path / f"{name}.json"
    n = 1
    while candidate.exists():
        candidate = path / f"{name}-{n}.json"
        n += 1
    return candidate


def write_record(record: dict, output: str) -> pathlib.Path:
    path = record_path(record, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def _fmt(value, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None else f"{value / scale:{fmt}}{unit}"


def summary(record: dict) -> str:
    """A few human-readable lines of a record."""
    lines = [
        f"{record['model']} aux={record['aux']} method={record['method']} "
        f"batch={record['batch_size']} {record['image_size']}px {record['dtype']} on "
        f"{record['num_devices']} x {record['device']} (JAX {record['jax_version']})",
        f"  images/s      {record['images_per_sec']:.1f}   (pipelined "
        f"{record['pipelined_images_per_sec']:.1f})",
        f"  step ms       {record['step_ms']:.2f} median, {record['step_ms_min']:.2f} min, "
        f"{record['step_ms_p90']:.2f} p90 over {_steps_text(record)}",
        f"  compile s     {record['compile_s']:.2f} (lower {record['lower_s']:.2f})",
        f"  peak memory   {_fmt(record['peak_memory_bytes'], '.2f', 2**30, ' GiB')}",
        f"  MACs/image    {record['macs_per_image'] / 1e9:.3f} G forward "
        f"({record['train_flops_per_image'] / 1e9:.2f} GFLOP per training image)",
        f"  MFU           {_fmt(record['mfu'], '.1%')} (datasheet peak: "
        f"{_fmt(record['mfu_datasheet'], '.1%')})",
    ]
    if "torch_images_per_sec" in record:
        if record["torch_images_per_sec"] is None:
            lines.append(f"  PyTorch       failed: {record.get('torch_error')}")
        else:
            threads = record.get("torch_num_threads")
            lines.append(
                f"  PyTorch       {record['torch_images_per_sec']:.1f} images/s, "
                f"{record['torch_step_ms']:.2f} ms/step, compile {record['torch_compile_s']:.1f} s"
                + (f", {threads} threads" if threads else "")
                + f" -> JAX / PyTorch = {record['jax_over_torch']:.2f}x"
            )
            if record.get("torch_step_ms_rounds") and record.get("step_ms_rounds"):
                jax_r = ", ".join(f"{t:.2f}" for t in record["step_ms_rounds"])
                torch_r = ", ".join(f"{t:.2f}" for t in record["torch_step_ms_rounds"])
                lines.append(f"  round medians JAX {jax_r} ms; PyTorch {torch_r} ms (alternating, "
                             "PyTorch first)")
    return "\n".join(lines)


def _steps_text(record: dict) -> str:
    rounds = record.get("rounds", 1)
    if rounds == 1:
        return f"{record['steps']} steps"
    return f"{rounds} rounds x {record['steps']} steps"


# ---- command line -------------------------------------------------------------------------------


def define_flags(fv: flags.FlagValues) -> None:
    """Defines the command-line flags on ``fv``."""
    d = Options()
    flags.DEFINE_string("model", d.model, f"Registry name: {', '.join(models.names())}.", flag_values=fv)
    flags.DEFINE_string("aux", None, "Branch design (paper, none, ...); default: none for the "
                        "baseline method, else paper.", flag_values=fv)
    flags.DEFINE_string("method", d.method, "Objective: baseline, ds, dsn, dks, dhm, byot.", flag_values=fv)
    flags.DEFINE_string("branches", d.branches, "Active classifiers, e.g. C1C2C3C4; '' = default.",
                        flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch (split over the devices).", flag_values=fv)
    flags.DEFINE_integer("image_size", d.image_size, "Image side; 0 = the model's design size.",
                         flag_values=fv)
    flags.DEFINE_integer("num_classes", d.num_classes, "0 = 1000 for ImageNet models, else 10.",
                         flag_values=fv)
    flags.DEFINE_enum("dtype", d.dtype, ["auto", *state_lib.DTYPES],
                      "Compute dtype (parameters float32); auto: float32 on the CPU, bfloat16 on "
                      "accelerators.", flag_values=fv)
    flags.DEFINE_integer("steps", d.steps, "Timed steps (median reported).", flag_values=fv)
    flags.DEFINE_integer("warmup", d.warmup, "Untimed steps after compilation.", flag_values=fv)
    flags.DEFINE_integer("num_batches", d.num_batches, "Distinct synthetic batches rotated over.",
                         flag_values=fv)
    flags.DEFINE_integer("bn_group_size", d.bn_group_size, "BatchNorm group; 0 = whole batch.",
                         flag_values=fv)
    flags.DEFINE_integer("num_devices", d.num_devices, "Devices of the mesh; 0 = all.", flag_values=fv)
    flags.DEFINE_integer("num_seeds", d.num_seeds, "Seeds trained at once (vmapped step, one "
                         "batch each; images/s counts every seed's images).", flag_values=fv)
    flags.DEFINE_integer("seed", d.seed, "Seed of the parameters and the synthetic data.", flag_values=fv)
    flags.DEFINE_string("output", DEFAULT_OUTPUT, "Folder for a new record, or a .json path; "
                        "'' writes none.", flag_values=fv)
    flags.DEFINE_bool("compare_torch", False, "Also time the PyTorch reference (a persistent "
                      "subprocess), interleaved with JAX in --rounds rounds, and record "
                      "torch_images_per_sec.", flag_values=fv)
    flags.DEFINE_integer("rounds", DEFAULT_ROUNDS, "With --compare_torch: rounds of --steps timed "
                         "steps per side, alternating PyTorch and JAX (medians over all rounds).",
                         flag_values=fv)
    flags.DEFINE_string("torch_python", None, "Python that runs the PyTorch reference "
                        "(default: this one).", flag_values=fv)
    flags.DEFINE_enum("torch_compile", "auto", ["auto", "on", "off"],
                      "torch.compile in the reference: auto = on for CUDA, off on CPU.", flag_values=fv)
    flags.DEFINE_float("torch_timeout", 1800.0, "Seconds to wait for each answer of the "
                       "reference (start-up and warm-up, each round) before giving it up.",
                       flag_values=fv)


def options_from_flags(flag_values) -> Options:
    fields = {f.name for f in dataclasses.fields(Options)}
    return Options(**{name: flag_values[name].value for name in fields})


def run(options: Options, *, command: str, output: str | None = DEFAULT_OUTPUT,
        compare_torch: bool = False, torch_python: str | None = None,
        torch_compile: str = "auto", torch_timeout: float | None = None,
        rounds: int = DEFAULT_ROUNDS) -> dict:
    """Measures (interleaved with PyTorch when asked: :func:`measure_interleaved`), writes the
    record unless ``output`` is empty. Without ``compare_torch`` JAX times ``steps`` steps once."""
    options = options.resolved()
    if compare_torch and options.num_seeds > 1:
        raise ValueError("--compare_torch times one seed (the PyTorch reference has no vmapped "
                         "seeds): use it with --num_seeds=1")
    if not compare_torch:
        return _finish(make_record(measure_jax(options), command), output)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    torch_command(options, "")  # a model, aux or method the reference lacks: fail before timing
    jax_result, torch_result = measure_interleaved(
        options, rounds=rounds, python=torch_python, compile_mode=torch_compile,
        timeout=torch_timeout)
    if "error" in torch_result:
        logging.warning("The PyTorch reference failed: %s", torch_result["error"])
    record = make_record(jax_result, command, torch_result)
    record["comparison"] = "interleaved"
    return _finish(record, output)


def _finish(record: dict, output: str | None) -> dict:
    if output:
        record["path"] = str(write_record(record, output))
    return record


def record_from_argv(argv: list[str]) -> dict:
    """Runs the measurement of a command line (without the program name); prints the summary;
    returns the record."""
    fv, _ = cli.parse(define_flags, argv, PROG, __doc__)
    command = f"{PROG} " + shlex.join(argv)
    record = run(options_from_flags(fv), command=command.strip(), output=fv.output,
                 compare_torch=fv.compare_torch, torch_python=fv.torch_python,
                 torch_compile=fv.torch_compile, torch_timeout=fv.torch_timeout,
                 rounds=fv.rounds)
    print(summary(record), flush=True)
    if record.get("path"):
        print(f"  record        {record['path']}", flush=True)
    return record


def main(argv: list[str]) -> int:
    logging.getLogger().setLevel(logging.INFO)
    record_from_argv(argv)
    return 0


if __name__ == "__main__":
    cli.run(main)
