"""Entry point: ``python -m dks_jax.main --config=configs/resnet152_dks.py --workdir=DIR``.

Flags only; everything else is in ``train.train_and_evaluate``. ``--config.<field>=<value>``
overrides a field of the (locked) config; an unknown field is an error.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py, optionally ':preset').",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, export (local or gs://).")
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    if _is_multiprocess():
        # Auto-detects TPU pods and SLURM; an explicit JAX_COORDINATOR_ADDRESS with
        # JAX_NUM_PROCESSES / JAX_PROCESS_ID works elsewhere.
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
    logging.getLogger().setLevel(logging.INFO)
    logging.info("JAX %s, process %d of %d, %d devices (%d local)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.device_count(),
                 jax.local_device_count())
    from dks_jax import train

    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print("Final:", {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
    app.run(main)
