"""Entry point: ``python -m dks_jax.main --config=configs/resnet152_dks.py --workdir=DIR``.

Flags only; everything else is in ``train.train_and_evaluate``. ``--config.<field>=<value>``
overrides a field of the (locked) config; an unknown field is an error. On CPU, without a
``XLA_FLAGS`` of the user's, the XNNPACK convolution flags of ``xla_flags`` are set.

The console shows one progress line per log step and a summary at the end; ``--verbose`` brings back
the INFO lines of the libraries (Orbax, absl). A user error (bad config value, missing data,
unusable checkpoint) prints its message and exits with status 2; ``--traceback`` shows where.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from dks_jax import xla_flags

# Before JAX is imported (the flags are read once, when the backend starts).
_SET_CPU_FLAGS = xla_flags.apply_cpu_defaults()

import jax  # noqa: E402

from dks_jax import errors, metrics, paths, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py, optionally ':preset').",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, export (local or gs://).")
flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (Orbax, absl) as well.")
flags.DEFINE_bool("traceback", False, "Show the Python traceback of user errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multiprocess() -> bool:
    """True on a worker of a multi-process job. launch/*.sh set DKS_DISTRIBUTED=1 on TPU pod
    workers and SLURM nodes (TPU VMs set no variable that says so)."""
    if os.environ.get("DKS_DISTRIBUTED") == "1":
        return True
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _configure_logging(verbose: bool) -> None:
    """This project's INFO lines; the libraries' (absl, Orbax) only with ``--verbose``."""
    logging.getLogger().setLevel(logging.INFO)
    if not verbose:
        for name in ("absl", "orbax", "jax._src.xla_bridge", "jax._src.distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def summary(result: dict, workdir, seconds: float) -> str:
    """The end-of-run text: per-head top-1/top-5, wall time and throughput, what the workdir holds."""
    workdir = paths.as_path(workdir)
    lines = []
    took = metrics.format_duration(seconds)
    if "stopped_at_step" in result:
        return (f"Stopped at step {result['stopped_at_step']} after {took}; run the same command "
                "again to resume.")
    heads = sorted({k.split("/", 1)[1] for k in result if k.startswith("eval_top1/")},
                   key=lambda h: (h == "ensemble", h))
    if heads:
        lines.append(f"Test accuracy (%) on {result.get('eval_count', '?')} images:")
        lines.append(f"  {'head':<9}{'top-1':>7}{'top-5':>8}")
        for h in heads:
            lines.append(f"  {h:<9}{result[f'eval_top1/{h}']:>7.2f}"
                         f"{result.get(f'eval_top5/{h}', float('nan')):>8.2f}")
    rates = [r["images_per_sec"] for r in metrics.read_metrics(workdir) if "images_per_sec" in r]
    rate = f", training at {sum(rates) / len(rates):.0f} images/s" if rates else ""
    lines.append(f"Wall time {took} (data loading and compilation included){rate}.")
    lines.append(f"The run folder {workdir} holds:")
    held = [("config.json", "the config of this run"),
            ("checkpoints", "the latest checkpoints and the one of the best main-head (C1) top-1 "
                            "(resume: run the same command again)"),
            ("export", "the main path alone, for inference (dks_jax.load)"),
            ("data.json", "the training data's classes and normalisation (python -m dks_jax.evaluate)"),
            (metrics.METRICS_FILE, "every metric, one JSON line per log step")]
    for name, what in held:
        if (workdir / name).exists():
            lines.append(f"  {name + ('/' if (workdir / name).is_dir() else ''):<15}{what}")
    if (workdir / "tensorboard").exists():
        lines.append(f"  {'tensorboard/':<15}tensorboard --logdir {workdir / 'tensorboard'}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _configure_logging(FLAGS.verbose)
    if _is_multiprocess():
        # Auto-detects TPU pods and SLURM; an explicit JAX_COORDINATOR_ADDRESS with
        # JAX_NUM_PROCESSES / JAX_PROCESS_ID works elsewhere.
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
    logging.info("JAX %s, process %d of %d, %d devices (%d local, %s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.device_count(),
                 jax.local_device_count(), jax.default_backend())
    if _SET_CPU_FLAGS and jax.default_backend() == "cpu":
        logging.info("XLA_FLAGS not set: using %s (XNNPACK convolutions)", os.environ["XLA_FLAGS"])
    start = time.time()
    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except errors.UserError as e:
        if FLAGS.traceback:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if jax.process_index() == 0:
        print(summary(result, FLAGS.workdir, time.time() - start), flush=True)


if __name__ == "__main__":
    app.run(main)
