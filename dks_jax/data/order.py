"""Example order, per-process rows and evaluation padding, shared by both loaders.

The order of training examples is a pure function of ``(seed, epoch, step in epoch)``: epoch ``e``
uses the permutation ``numpy.random.default_rng([stream, seed, e]).permutation(N)`` and step ``i`` of
that epoch takes its entries ``[i * B, (i + 1) * B)``; the last ``N % B`` examples of each permutation
are dropped. Both loaders use these indices, so they serve the same examples, and a run restarted at
step ``s`` sees what a straight run sees.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_ORDER_STREAM = 0x0DE5


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Permutation (int64 [N], read-only) of the training examples for ``epoch``."""
    rng = np.random.default_rng([_ORDER_STREAM, int(seed) % 2**63, int(epoch)])
    perm = rng.permutation(num_examples)
    perm.flags.writeable = False
    return perm


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Whole global batches per epoch (the remainder of each epoch's permutation is dropped)."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(
            f"global batch {global_batch} is larger than the {num_examples} training examples: "
            "set config.batch_size to at most the number of training examples"
        )
    return steps


def train_indices(seed: int, num_examples: int, global_batch: int, step: int) -> np.ndarray:
    """Global example indices (int64 [B]) of training step ``step``."""
    epoch, i = divmod(int(step), steps_per_epoch(num_examples, global_batch))
    return epoch_permutation(seed, epoch, num_examples)[i * global_batch : (i + 1) * global_batch]


def example_seeds(seed: int, step: int, num_examples: int, global_batch: int) -> np.ndarray:
    """Per-example augmentation seeds (int64 [B, 2]) of a global batch: (epoch stream, position).

    The position is the example's place in its epoch, so the seeds do not depend on how the
    batch is split over processes or devices.
    """
    spe = steps_per_epoch(num_examples, global_batch)
    epoch, i = divmod(int(step), spe)
    base = np.random.default_rng([_ORDER_STREAM + 1, int(seed) % 2**63, epoch]).integers(2**62)
    pos = i * global_batch + np.arange(global_batch, dtype=np.int64)
    return np.stack([np.full(global_batch, base, np.int64), pos], axis=1)


def eval_indices(num_examples: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """All eval examples once, in order, padded to whole batches: (indices [S, B], mask [S, B]).

    Padding entries have index -1 and mask False.
    """
    steps = -(-num_examples // global_batch)
    idx = np.arange(steps * global_batch, dtype=np.int64)
    mask = idx < num_examples
    idx = np.where(mask, idx, -1)
    return idx.reshape(steps, global_batch), mask.reshape(steps, global_batch)


def data_axis_size(mesh: jax.sharding.Mesh) -> int:
    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named 'data', it has {mesh.axis_names}")
    return int(mesh.shape["data"])


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh, process_count: int) -> None:
    """Raises ValueError unless ``global_batch`` divides over the 'data' devices and processes."""
    n = data_axis_size(mesh)
    for parts, what in ((n, f"the {n} devices of mesh axis 'data'"), (process_count,
                                                                        f"{process_count} processes")):
        if global_batch <= 0 or global_batch % parts:
            lo = max(parts, global_batch // parts * parts)
            raise ValueError(
                f"global batch {global_batch} does not divide over {what}: set config.batch_size "
                f"(and the eval batch) to a multiple of {parts}, e.g. {lo} or {lo + parts}"
            )


def process_rows(
    mesh: jax.sharding.Mesh,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> np.ndarray:
    """Rows of a global batch that this process supplies (int64, increasing).

    For the real process layout, these are the rows held by this process's devices under
    ``NamedSharding(mesh, P('data'))``, in the order ``jax.make_array_from_process_local_data``
    expects. With ``process_index``/``process_count`` overriding the real values (tests simulate
    several processes in one), process ``p`` of ``P`` gets the contiguous block ``p``.
    """
    real = (jax.process_index(), jax.process_count())
    pi = real[0] if process_index is None else int(process_index)
    pc = real[1] if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} is not in [0, process_count={pc})")
    check_global_batch(global_batch, mesh, pc)
    if (pi, pc) != real:
        per = global_batch // pc
        return np.arange(pi * per, (pi + 1) * per, dtype=np.int64)
    sharding = NamedSharding(mesh, P("data"))
    spans = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        assert index is not None  # a NamedSharding gives every device a slice
        s = index[0]
        spans.add((s.start or 0, global_batch if s.stop is None else s.stop))
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in sorted(spans)])
