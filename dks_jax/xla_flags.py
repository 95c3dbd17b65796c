"""XLA:CPU settings that the command-line tools apply when the user has not set ``XLA_FLAGS``.

XNNPACK's convolutions train the small CIFAR networks faster on XLA:CPU than XLA's default
convolution path, with results equal to float tolerance (``tests/test_main.py``). The flags name
the CPU backend only, so they change nothing on GPUs and TPUs. They must be in the environment
before JAX is imported.
"""

from __future__ import annotations

import os

CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_cpu_experimental_xnn_fusion_type=+individual_convolution",
)


def apply_cpu_defaults(environ=os.environ) -> bool:
    """Sets ``XLA_FLAGS`` to :data:`CPU_FLAGS` unless the user has set it; True if it did."""
    if environ.get("XLA_FLAGS"):
        return False
    environ["XLA_FLAGS"] = " ".join(CPU_FLAGS)
    return True
