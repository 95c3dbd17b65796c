"""The streaming loader: ``tf.data`` on host CPU threads, per-process splits, prefetch to device.

TensorFlow is imported lazily (first use), and hidden from the GPUs so it leaves them to JAX.

Two ways of reading, chosen by the source:

* **By index** (image folders and small TFDS data sets, see ``sources.py``): every process takes
  its rows of each global batch from the same permutation as the in-memory loader
  (``order.py``), then reads, decodes (JPEG with the exact-DCT decoder, bit-identical to PIL) and
  transforms the examples in parallel. With augmentation off both loaders give the same batches.
* **Sequentially** (large TFDS data sets such as ImageNet): process ``p`` of ``P`` reads examples
  ``[p N / P, (p + 1) N / P)`` of the split; each epoch shuffles the files and a 10,000-example
  buffer with a seed from ``(seed, epoch, p)``, and every process yields ``N // B`` batches. A
  run resumed at step ``s`` skips the epoch's first ``s % steps_per_epoch`` local batches (records
  are read but not decoded). The order is a pure function of (seed, epoch, step), but not the
  permutation of ``order.py``.

Transforms: the tf.data versions in ``augment.py`` (``tf_train_transform``,
``tf_eval_transform``), which documents them. Random numbers are stateless, seeded per example
from (seed, epoch, position in the epoch), so they do not depend on the number of processes or on
``tf.data`` threading.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dks_jax.data import augment as augment_lib
from dks_jax.data import order, sources
from dks_jax.data.augment import import_tf

SHUFFLE_BUFFER = 10_000
_MAX_STEPS = 2**62
T = TypeVar("T")


class StreamingLoader:
    """tf.data input pipelines for one Source.

    Args:
      source: a ``sources.Source``.
      mesh: batches are sharded over its axis ``'data'``.
      augment, image_size, resize_mode, cutout, mean, std, seed: see the module docstring.
      noise: ``noise.LabelNoise`` for the training split, or None.
      process_index, process_count: override the real values to simulate a process (tests);
        then only the ``local_*`` methods work.
    """

    def __init__(self, source, mesh, *, augment: str, image_size: int, resize_mode: str,
                 cutout: int, mean, std, seed: int, noise=None, process_index=None,
                 process_count=None):
        if augment not in ("cifar", "none", "imagenet_simple", "imagenet_inception"):
            raise ValueError(f"unknown augment {augment!r}: use 'cifar', 'imagenet_simple', "
                             "'imagenet_inception' or 'none'")
        if resize_mode not in ("both_sides", "shorter_side"):
            raise ValueError(f"unknown resize_mode {resize_mode!r}: use 'both_sides' or "
                             "'shorter_side'")
        self.source = source
        self.mesh = mesh
        self.augment = augment
        self.size = int(image_size)
        self.resize_mode = resize_mode
        self.cutout = int(cutout)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.seed = int(seed)
        self.noise = noise
        real = (jax.process_index(), jax.process_count())
        self.process_index = real[0] if process_index is None else int(process_index)
        self.process_count = real[1] if process_count is None else int(process_count)
        self.simulated = (self.process_index, self.process_count) != real
        fixed = source.image_shape
        self.fixed_hw = None if fixed is None else tuple(fixed[:2])
        if augment == "cifar" and self.fixed_hw != (self.size, self.size):
            raise ValueError(
                f"augment='cifar' needs images of image_size x image_size = {self.size}x"
                f"{self.size}, the data set's images are "
                f"{'of varying size' if fixed is None else sources._hwc(fixed)}: set "
                "config.image_size, or use augment='imagenet_simple'/'imagenet_inception'"
            )
        train = source.train
        if isinstance(train, sources.IndexedSplit) and noise is not None:
            self._train_labels = noise.apply(train.labels)
        elif isinstance(train, sources.IndexedSplit):
            self._train_labels = np.asarray(train.labels, np.int32)
        self._tensors: dict[str, Any] = {}  # name -> TF constant or table, built on first use

    # -------------------------------------------------------------------- public

    @property
    def num_train(self) -> int:
        return self.source.train.num_examples

    @property
    def num_eval(self) -> int:
        return self.source.eval.num_examples

    def rows(self, global_batch: int) -> np.ndarray:
        """This process's rows (int64 [B / P]) of each global batch of ``global_batch``."""
        return order.process_rows(self.mesh, global_batch, self.process_index, self.process_count)

    def local_train_batches(self, global_batch: int, *, start_step: int = 0):
        """Endless iterator of this process's rows of each global batch, as NumPy dicts:
        {"image": float32 [b, S, S, 3], "label": int32 [b]} with ``b = B / P``."""
        rows = self.rows(global_batch)
        order.steps_per_epoch(self.num_train, global_batch)
        if isinstance(self.source.train, sources.IndexedSplit):
            ds = self._indexed_train(global_batch, rows, start_step)
            diagnose = lambda k: self._diagnose(
                self.source.train,
                order.train_indices(self.seed, self.num_train, global_batch, start_step + k)[rows],
                train=True)
            return _numpy_batches(ds, diagnose, f"{self.source.train.description} (training)")
        return self._sequential_train(global_batch, len(rows), start_step)

    def local_eval_batches(self, global_batch: int):
        """One pass over the eval split: this process's rows of each padded global batch, as
        NumPy dicts {"image": float32 [b, S, S, 3], "label": int32 [b], "mask": bool [b]}
        (mask False on padding, which has a zero image and label 0)."""
        rows = self.rows(global_batch)
        split = self.source.eval
        if isinstance(split, sources.IndexedSplit):
            idx, _ = order.eval_indices(split.num_examples, global_batch)
            local = idx[:, rows]
            ds = self._indexed_eval(local.reshape(-1), len(rows))
            diagnose = lambda k: self._diagnose(split, local[k][local[k] >= 0], train=False)
            return _numpy_batches(ds, diagnose, f"{split.description} (evaluation)")
        return self._sequential_eval(global_batch, len(rows))

    def train_iterator(self, global_batch: int, *, start_step: int = 0):
        """``local_train_batches`` as global jax.Arrays [B, ...] sharded over ``'data'``."""
        return self._to_global(self.local_train_batches(global_batch, start_step=start_step),
                               global_batch)

    def eval_iterator(self, global_batch: int):
        """``local_eval_batches`` as global jax.Arrays [B, ...] sharded over ``'data'``."""
        return self._to_global(self.local_eval_batches(global_batch), global_batch)

    # -------------------------------------------------------------------- global arrays

    def _to_global(self, local_batches, global_batch: int):
        if self.simulated:
            raise ValueError(
                "process_index/process_count overrides simulate another process (for tests); "
                "global arrays need the real process layout: use local_train_iterator / "
                "local_eval_iterator, or create the data set without the overrides"
            )
        sharding = NamedSharding(self.mesh, P("data"))

        def put(batch):
            return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,
                                                                            *v.shape[1:]))
                    for k, v in batch.items()}

        return prefetch(map(put, local_batches), size=2)

    # -------------------------------------------------------------------- by index

    def _tensor(self, name, make):
        if name not in self._tensors:
            self._tensors[name] = make()
        return self._tensors[name]

    def _reader(self, split, which):
        """tf function: int64 index -> encoded bytes."""
        tf = import_tf()
        if split.blobs is not None:
            blobs = self._tensor(f"{which}/blobs",
                                 lambda: tf.constant(np.asarray(split.blobs, dtype=object)))
            return lambda i: tf.gather(blobs, i)
        paths = self._tensor(f"{which}/paths", lambda: tf.constant(list(split.paths)))
        return lambda i: tf.io.read_file(tf.gather(paths, i))

    def _indexed_train(self, global_batch, rows, start_step):
        tf = import_tf()
        split = self.source.train
        n, seed = split.num_examples, self.seed
        read = self._reader(split, "train")
        labels = self._tensor("train/labels", lambda: tf.constant(self._train_labels))
        b = len(rows)

        def step_fn(step):
            step = int(step)
            idx = order.train_indices(seed, n, global_batch, step)[rows]
            seeds = order.example_seeds(seed, step, n, global_batch)[rows]
            return idx.astype(np.int64), seeds.astype(np.int64)

        def load(i, s):
            return {"image": self._train_transform(read(i), s), "label": tf.gather(labels, i)}

        ds = tf.data.Dataset.range(start_step, _MAX_STEPS)
        ds = ds.map(lambda s: tuple(tf.numpy_function(step_fn, [s], [tf.int64, tf.int64],
                                                      stateful=False)))
        ds = ds.map(lambda i, s: (tf.ensure_shape(i, [b]), tf.ensure_shape(s, [b, 2])))
        ds = ds.unbatch()
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        return ds.with_options(_options(tf)).prefetch(tf.data.AUTOTUNE)

    def _indexed_eval(self, local_idx, b):
        tf = import_tf()
        split = self.source.eval
        read = self._reader(split, "eval")
        labels = self._tensor("eval/labels", lambda: tf.constant(np.asarray(split.labels,
                                                                            np.int32)))

        def load(i):
            valid = i >= 0
            j = tf.maximum(i, 0)
            x = self._eval_transform(read(j))
            return {"image": tf.where(valid, x, tf.zeros_like(x)),
                    "label": tf.where(valid, tf.gather(labels, j), 0), "mask": valid}

        ds = tf.data.Dataset.from_tensor_slices(local_idx.astype(np.int64))
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        return ds.with_options(_options(tf)).prefetch(tf.data.AUTOTUNE)

    def _diagnose(self, split, indices, *, train: bool):
        """Finds the unreadable or wrongly sized image among ``indices`` (PIL), or None."""
        need = self._needs_fixed(train)
        for i in indices:
            img = split.decode(int(i))  # raises ValueError naming an unreadable file
            if need and img.shape[:2] != self.fixed_hw:
                assert self.fixed_hw is not None  # need: fixed_hw == (size, size)
                return sources.mixed_sizes_message(split.description, split.keys[0],
                                                   (*self.fixed_hw, 3), split.keys[int(i)],
                                                   img.shape)
        return None

    # -------------------------------------------------------------------- sequential (TFDS)

    def _process_range(self, n):
        p, pc = self.process_index, self.process_count
        return p * n // pc, (p + 1) * n // pc

    def _tfds_read(self, split, lo, hi, *, shuffle_seed):
        import tensorflow_datasets as tfds

        tf = import_tf()
        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed,
            add_tfds_id=True,
            try_autocache=False,
            interleave_cycle_length=16 if shuffle_seed is not None else 1,
            options=_options(tf),
        )
        return split.builder.as_dataset(
            split=split.subsplit(lo, hi),
            shuffle_files=shuffle_seed is not None,
            decoders={split.image_key: tfds.decode.SkipDecoding()},
            read_config=read_config,
        )

    def _global_index(self, split):
        """tf function: tfds_id -> index of the example in the split."""
        tf = import_tf()

        def make():
            keys = tf.constant(list(split.file_offsets))
            vals = tf.constant(list(split.file_offsets.values()), tf.int64)
            return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, vals), -1)

        table = self._tensor("train/id_table", make)

        def index(tfds_id):
            prefix, record = tf.unstack(tf.strings.split(tfds_id, "__", maxsplit=1), 2)
            return table.lookup(prefix) + tf.strings.to_number(record, tf.int64)

        return index

    def _sequential_train(self, global_batch, b, start_step):
        tf = import_tf()
        split = self.source.train
        n = split.num_examples
        spe = order.steps_per_epoch(n, global_batch)
        lo, hi = self._process_range(n)
        k = split.label_key
        if self.noise is not None:
            offsets = tf.constant(self.noise.offsets)
            gindex = self._global_index(split)
            num_classes = self.noise.num_classes
        epoch, first = divmod(int(start_step), spe)
        while True:
            seed = int(np.random.default_rng([order._ORDER_STREAM, self.seed % 2**63, epoch,
                                              self.process_index]).integers(2**62))
            base = order.example_seeds(self.seed, epoch * spe, n, global_batch)[0, 0]
            first_pos = self.process_index * (n + 1)

            def load(pos, ex, base=base, first_pos=first_pos):
                seed2 = tf.stack([tf.constant(base, tf.int64), first_pos + pos])
                label = tf.cast(ex[k], tf.int32)
                if self.noise is not None:
                    g = gindex(ex["tfds_id"])
                    label = (label + tf.gather(offsets, g)) % num_classes
                return {"image": self._train_transform(ex[split.image_key], seed2),
                        "label": label}

            ds = self._tfds_read(split, lo, hi, shuffle_seed=seed % 2**31)
            ds = ds.shuffle(min(SHUFFLE_BUFFER, hi - lo), seed=seed % 2**31,
                            reshuffle_each_iteration=False)
            ds = ds.take(spe * b).enumerate().skip(first * b)
            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from _numpy_batches(ds, lambda _: None,
                                      f"{split.description} (training, epoch {epoch})")
            epoch, first = epoch + 1, 0

    def _sequential_eval(self, global_batch, b):
        tf = import_tf()
        split = self.source.eval
        n = split.num_examples
        lo, hi = self._process_range(n)
        per_process = -(-n // self.process_count)  # ceil(N / P): the same on every process
        steps = -(-per_process // b)
        k = split.label_key

        def load(ex):
            return {"image": self._eval_transform(ex[split.image_key]),
                    "label": tf.cast(ex[k], tf.int32), "mask": tf.constant(True)}

        ds = self._tfds_read(split, lo, hi, shuffle_seed=None).map(
            load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        pad = {"image": tf.zeros([self.size, self.size, 3], tf.float32),
               "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(steps * b - (hi - lo)))
        ds = ds.batch(b, drop_remainder=True).with_options(_options(tf)).prefetch(
            tf.data.AUTOTUNE)
        return _numpy_batches(ds, lambda _: None, f"{split.description} (evaluation)")

    # -------------------------------------------------------------------- transforms

    def _needs_fixed(self, train: bool) -> bool:
        return (self.augment == "cifar" and train) or self._identity_eval()

    def _identity_eval(self) -> bool:
        return self.fixed_hw == (self.size, self.size)

    def _eval_transform(self, data):
        """Encoded image -> normalised float32 [S, S, 3] (``augment.tf_eval_transform``)."""
        return augment_lib.tf_eval_transform(
            data, size=self.size, resize_mode=self.resize_mode, mean=self.mean, std=self.std,
            fixed_hw=self.fixed_hw)

    def _train_transform(self, data, seed):
        """Encoded image, seed int64 [2] -> augmented float32 [S, S, 3]
        (``augment.tf_train_transform``)."""
        return augment_lib.tf_train_transform(
            data, seed, augment=self.augment, size=self.size, resize_mode=self.resize_mode,
            cutout=self.cutout, mean=self.mean, std=self.std, fixed_hw=self.fixed_hw)


def _options(tf):
    options = tf.data.Options()
    options.deterministic = True
    return options


def _numpy_batches(ds, diagnose, description):
    """Iterates ``ds`` as NumPy; a TensorFlow error becomes a ValueError naming the bad file."""
    tf = import_tf()
    it = ds.as_numpy_iterator()
    for k in itertools.count():
        try:
            batch = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            found = diagnose(k)
            raise ValueError(found or f"reading {description} failed: {e.message}") from e
        yield batch


def prefetch(iterator: Iterable[T], size: int = 2) -> Iterator[T]:
    """Keeps ``size`` items of ``iterator`` computed ahead (device transfers overlap the step)."""
    queue: collections.deque[T] = collections.deque()
    iterator = iter(iterator)
    queue.extend(itertools.islice(iterator, size))
    while queue:
        yield queue.popleft()
        queue.extend(itertools.islice(iterator, 1))
