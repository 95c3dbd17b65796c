"""The in-memory loader: the whole data set on the accelerators, augmented inside ``jax.jit``.

The images are uint8 arrays ``[N, H, W, C]`` sharded over mesh axis ``'data'`` (each device holds
``N / n`` of them); the labels (small) are replicated. Each step runs one jitted function that

1. takes the step's ``B`` example indices from the epoch's permutation (``order.py``; uploaded
   once per epoch),
2. gathers the examples: each device picks the requested rows it holds (zeros elsewhere), and
   a reduce-scatter over ``'data'`` hands every device its ``B / n`` rows of the global batch
   (``B x H x W x C`` bytes per device and step, sent as uint32 words),
3. augments them (``augment.py``; ``augment='cifar'``: zero-pad 4, random ``H x W`` crop,
   horizontal flip; then per-channel mean/std; optional Cutout, a ``cutout x cutout`` square of
   zeros after normalisation, centred uniformly in the image and clipped at its border).

The random numbers come from ``fold_in(fold_in(key(seed), epoch), step_in_epoch)`` and are drawn
for the whole global batch, so the batch does not depend on the number of devices or processes.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dks_jax.data import order
from dks_jax.data.augment import augment_params, transform


def put_global(x: np.ndarray, mesh, spec: P) -> jax.Array:
    """A host array (identical on every process) as a global array of the same shape and dtype,
    with ``NamedSharding(mesh, spec)``."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-len(x)) % multiple
    if not extra:
        return x
    return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])


class InMemoryLoader:
    """Holds both splits on the devices; builds global batches with one jitted call each.

    Args:
      mesh: the mesh; batches and images are sharded over its axis ``'data'``.
      train, eval: (images uint8 [N, H, W, C], labels int32 [N]) on the host, identical on every
        process (the training labels already with the run's seed's noise, if any).
      augment: ``'cifar'`` or ``'none'``.
      cutout: square size, 0 = off.
      mean, std: per-channel, in [0, 1] units.
      seed: the run's seed (order, augmentation and label noise).
      labels_for_seed: ``seed -> int32 [N]`` training labels of another seed (its own label noise),
        for ``train_batch(..., seed=k)``; None: every seed uses ``train``'s labels.
    """

    def __init__(self, mesh, train, eval, *, augment: str, cutout: int, mean, std, seed: int,
                 labels_for_seed=None):
        if augment not in ("cifar", "none"):
            raise ValueError(
                f"the in_memory loader supports augment='cifar' or 'none', not {augment!r} "
                "(use loader='streaming' for the ImageNet augmentations)"
            )
        self.mesh = mesh
        self.seed = int(seed)
        n = order.data_axis_size(mesh)
        (train_x, train_y), (eval_x, eval_y) = train, eval
        self.num_train, self.num_eval = len(train_x), len(eval_x)
        self.image_shape = tuple(train_x.shape[1:])
        self._train_x = put_global(_pad_rows(train_x, n), mesh, P("data"))
        self._eval_x = put_global(_pad_rows(eval_x, n), mesh, P("data"))
        self._train_y = put_global(np.asarray(train_y, np.int32), mesh, P())
        self._eval_y = put_global(np.asarray(eval_y, np.int32), mesh, P())
        hw = self.image_shape[:2]
        common = dict(mean=tuple(mean), std=tuple(std))
        # Memoised: data sets built alike (e.g. a resumed run) reuse the compiled functions.
        self._train_fn = _batch_fn(mesh, hw, augment=augment, cutout=int(cutout), train=True,
                                   **common)
        self._eval_fn = _batch_fn(mesh, hw, augment="none", cutout=0, train=False, **common)
        self._seed = np.uint32(self.seed % 2**32)
        self._perms: dict[int, tuple[int, jax.Array]] = {}  # seed -> (epoch, permutation on the devices)
        self._labels_for_seed = labels_for_seed
        self._seed_labels = {self.seed: self._train_y}  # seed -> its training labels (replicated)

    def _labels(self, seed: int) -> jax.Array:
        if self._labels_for_seed is None:
            return self._train_y
        if seed not in self._seed_labels:
            y = np.asarray(self._labels_for_seed(seed), np.int32)
            self._seed_labels[seed] = put_global(y, self.mesh, P())
        return self._seed_labels[seed]

    def train_batch(self, global_batch: int, step: int, seed: int | None = None) -> dict:
        """The batch of ``step``: {"image": float32 [B, H, W, C], "label": int32 [B]}, sharded
        over ``'data'``. ``seed`` (default: the run's) picks order, augmentation and label noise,
        so several seeds can share one copy of the images (``config.num_seeds``)."""
        seed = self.seed if seed is None else int(seed)
        spe = order.steps_per_epoch(self.num_train, global_batch)
        epoch, i = divmod(int(step), spe)
        if self._perms.get(seed, (None,))[0] != epoch:
            perm = order.epoch_permutation(seed, epoch, self.num_train)
            self._perms[seed] = (epoch, put_global(perm.astype(np.int32), self.mesh, P()))
        return self._train_fn(self._train_x, self._labels(seed), self._perms[seed][1],
                              np.uint32(seed % 2**32), np.int32(epoch), np.int32(i),
                              global_batch=global_batch)

    def eval_batches(self, global_batch: int):
        """One pass over the eval split: {"image": float32 [B, H, W, C], "label": int32 [B],
        "mask": bool [B]} per batch, sharded over ``'data'``; the last batch padded (mask False,
        zero image, label 0)."""
        idx, _ = order.eval_indices(self.num_eval, global_batch)
        for step_idx in idx:
            yield self._eval_fn(self._eval_x, self._eval_y,
                                put_global(step_idx.astype(np.int32), self.mesh, P()),
                                self._seed, np.int32(0), np.int32(0), global_batch=global_batch)


def _reduce_scatter_bytes(rows):
    """uint8 [B, ...] -> this device's [B / n, ...] of the sum over 'data' (one non-zero each).

    The bytes travel as uint32 words (4 per word), a type every backend reduces, at the cost
    of uint8: the sum is exact because each row is non-zero on exactly one device.
    """
    b, shape = rows.shape[0], rows.shape[1:]
    flat = rows.reshape(b, -1)
    size = flat.shape[1]
    flat = jnp.pad(flat, ((0, 0), (0, (-size) % 4)))
    words = jax.lax.bitcast_convert_type(flat.reshape(b, -1, 4), jnp.uint32)
    words = jax.lax.psum_scatter(words, "data", scatter_dimension=0, tiled=True)
    out = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(words.shape[0], -1)
    return out[:, :size].reshape(words.shape[0], *shape)


@functools.lru_cache(maxsize=16)
def _batch_fn(mesh, hw, *, augment, cutout, mean, std, train):
    """jit(fn(images, labels, idx_source, seed, epoch, i, *, global_batch)) -> dict of arrays.

    ``train``: ``idx_source`` is the epoch's permutation, the batch is entries [i*B, (i+1)*B);
    eval: ``idx_source`` is the batch's indices, -1 = padding (mask False, zero image, label 0).
    """

    def per_device(shard, labels, idx, params):
        n_local = shard.shape[0]
        d = jax.lax.axis_index("data")
        rel = idx - d * n_local
        mine = (idx >= 0) & (rel >= 0) & (rel < n_local)
        rows = jnp.take(shard, jnp.clip(rel, 0, n_local - 1), axis=0)
        rows = jnp.where(mine[:, None, None, None], rows, jnp.zeros((), rows.dtype))
        local = _reduce_scatter_bytes(rows)
        b = local.shape[0]
        part = lambda a: jax.lax.dynamic_slice_in_dim(a, d * b, b, axis=0)
        my_idx = part(idx)
        valid = my_idx >= 0
        label = jnp.where(valid, labels[jnp.clip(my_idx, 0, labels.shape[0] - 1)], 0)
        x = transform(local, jax.tree.map(part, params), augment=augment, cutout=cutout,
                      mean=mean, std=std)
        x = jnp.where(valid[:, None, None, None], x, 0.0)
        return x, label.astype(jnp.int32), valid

    gather = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("data"), P(), P(), P()),
        out_specs=(P("data"), P("data"), P("data")),
    )

    @functools.partial(jax.jit, static_argnames=("global_batch",))
    def fn(images, labels, idx_source, seed, epoch, i, *, global_batch):
        if train:
            idx = jax.lax.dynamic_slice_in_dim(idx_source, i * global_batch, global_batch)
        else:
            idx = idx_source
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), i)
        params = augment_params(key, global_batch, hw, augment=augment, cutout=cutout)
        x, label, valid = gather(images, labels, idx, params)
        out = {"image": x, "label": label}
        if not train:
            out["mask"] = valid
        return out

    return fn
