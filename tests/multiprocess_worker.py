"""One process of the two-process test (tests/test_multiprocess.py): trains a tiny config on CPU.

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_ROOT WORKDIR STOP_AT OUT_JSON
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=1200")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    pid, nproc, port, data_root, workdir, stop_at, out = sys.argv[1:]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=int(nproc),
                               process_id=int(pid))
    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import tiny_config

    from dks_jax import train

    config = tiny_config(data_root, method="dks", num_epochs=4 * 16 / 400)
    result = train.train_and_evaluate(config, workdir, stop_at_step=int(stop_at) or None)
    with open(out, "w") as f:
        json.dump({"process_index": jax.process_index(), "devices": jax.device_count(),
                   "result": result}, f)


if __name__ == "__main__":
    main()
