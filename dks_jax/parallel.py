"""The device mesh and the shardings of the train state and batches (docs/design.md: jit + NamedSharding).

One mesh axis, ``'data'``, spans every device of every process. The state is replicated, batches are
split along their leading axis.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dks_jax import errors

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    # axis_types is passed explicitly: its default changed across JAX versions (docs/design.md).
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, *, name: str = "batch_size") -> None:
    """Raises ValueError when ``global_batch`` does not split evenly over the mesh's devices."""
    n = mesh.devices.size
    if global_batch <= 0 or global_batch % n:
        lower = max(n, global_batch // n * n)
        raise errors.ConfigError(
            f"config.{name}={global_batch} does not divide over the {n} devices of the mesh "
            f"({jax.process_count()} process(es)): the global batch must be a multiple of {n}; "
            f"set --config.{name}={lower} or {lower + n}."
        )


def replicate(tree, mesh: Mesh):
    """Places a pytree of host or device arrays, equal on every process, on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))



# XLA:CPU's PJRT client admits at most 32 launches in flight per device, and the thread that finds
# that limit reached blocks inside the client's thread pool, which has one thread per device when
# the devices outnumber the cores (fake CPU devices). A collective launched meanwhile then lacks a
# thread for one participant: seven threads wait in its rendezvous, the eighth in the limit, and
# the process hangs (tests/test_parallel.py reproduces it). Loops that dispatch without reading
# results therefore keep far fewer launches in flight; a few steps ahead keep the devices busy.
MAX_LAUNCHES_IN_FLIGHT = 8


class InFlight:
    """Bounds how far the host runs ahead of the devices, counted in launched programs.

    ``add(outputs, launches)`` after dispatching ``launches`` programs whose results include
    ``outputs`` (any pytree of arrays, not donated later); once more than ``max_launches`` are
    pending it waits for the oldest. ``wait()`` waits for all.
    """

    def __init__(self, max_launches: int = MAX_LAUNCHES_IN_FLIGHT):
        if max_launches < 1:
            raise ValueError(f"max_launches must be >= 1, got {max_launches}")
        self.max_launches = max_launches
        self._pending: collections.deque[tuple[Any, int]] = collections.deque()  # (outputs, launches)
        self._count = 0

    def add(self, outputs, launches: int = 1) -> None:
        self._pending.append((outputs, launches))
        self._count += launches
        while self._count > self.max_launches:
            self._pop()

    def wait(self) -> None:
        while self._pending:
            self._pop()

    def _pop(self) -> None:
        outputs, launches = self._pending.popleft()
        jax.block_until_ready(outputs)
        self._count -= launches
