"""The device mesh and the shardings of the train state and batches (DESIGN.md: jit + NamedSharding).

One mesh axis, ``'data'``, spans every device of every process. The state is replicated, batches are
split along their leading axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    # axis_types is passed explicitly: its default changed across JAX versions (DESIGN.md).
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
        raise ValueError(
            f"config.{name}={global_batch} does not divide over the {n} devices of the mesh "
            f"({jax.process_count()} process(es)): the global batch must be a multiple of {n}; "
            f"set --config.{name}={lower} or {lower + n}."
        )


def replicate(tree, mesh: Mesh):
    """Places a pytree of host or device arrays, equal on every process, on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))
