"""The grain loader (``config.loader = "grain"``): random access, worker processes, NumPy transforms.

Reads by index from

* image folders and archives, and TFDS data sets small enough for host memory
  (``sources.IndexedSplit``: each example decoded with PIL when it is read), and
* larger TFDS data sets (``sources.SequentialSplit``, e.g. ImageNet) through
  ``builder.as_data_source`` (``tfds.data_source``: ArrayRecord files, random access; the images
  are read encoded and decoded with PIL).

Order: a ``grain.IndexSampler(shuffle=True, seed=config.seed, num_epochs=None)`` over the training
split gives an endless stream of example positions (epoch ``e`` = positions ``[e N, (e + 1) N)``,
each example once); training step ``s`` takes positions ``[s B, (s + 1) B)`` of that stream. The
stream does not drop the remainder of an epoch (a batch may straddle two epochs), and the
permutation is grain's, not ``order.py``'s: with augmentation off the batches hold other examples
than the in-memory and streaming loaders' (same data, other order). Evaluation uses
``order.eval_indices`` like them and gives the same batches.

Per process: process ``p`` reads only its rows (``order.process_rows``) of every global batch
(positions ``s B + rows``), so the global batch does not depend on the number of processes, and
grain's own sharding stays ``NoSharding``. The local batches become global
jax.Arrays as in the streaming loader.

One grain element is one local batch (``TrainBatches`` / ``EvalBatches``: read, decode with PIL,
transform with the NumPy versions in ``augment.py``, stack), so each worker process
(``config.grain_workers``) makes whole batches and grain returns them in step order. Each
example's augmentation draws from ``numpy.random.default_rng([stream, seed, epoch, position])``;
nothing depends on the number of workers (tested: 0 and 2 give the same batches).

Resume: ``train_iterator(B, start_step=s)`` starts at position ``s B``, exactly where an
uninterrupted iterator is after ``s`` steps. The iterator also has ``get_state`` / ``set_state``
(grain's state, plus the step and what the stream depends on), JSON-serialisable.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dks_jax import errors
from dks_jax.data import augment as augment_lib
from dks_jax.data import order, sources

_AUG_STREAM = 0x0DE7
_ENDLESS = 2**62


def import_grain():
    try:
        import grain.python as grain
    except ImportError as e:
        raise errors.ConfigError(
            f"config.loader='grain' needs the grain package ({e}): pip install 'dks_jax[grain]'"
        ) from e
    return grain


# ----------------------------------------------------------------------------- data sources


class IndexedRecords:
    """Random access over an ``IndexedSplit``: ``i`` -> {"image": uint8 [H, W, 3], "label"}."""

    def __init__(self, split: sources.IndexedSplit, labels):
        self.split = split
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return self.split.num_examples

    def __getitem__(self, i):
        i = int(i)
        return {"image": self.split.decode(i), "label": self.labels[i], "key": i}

    def key(self, i: int) -> str:
        return str(self.split.keys[i])

    def __repr__(self):
        return f"IndexedRecords({self.split.description!r})"


class TfdsRecords:
    """Random access over a TFDS split through ``builder.as_data_source`` (ArrayRecord), the
    image left encoded and decoded here; ``offsets`` (label noise) are added modulo ``classes``."""

    def __init__(self, split: sources.SequentialSplit, offsets=None, num_classes: int = 0):
        import tensorflow_datasets as tfds

        self.description = split.description
        self.image_key, self.label_key = split.image_key, split.label_key
        self.source = split.builder.as_data_source(  # type: ignore[attr-defined]
            split.split, decoders={split.image_key: tfds.decode.SkipDecoding()})
        if len(self.source) != split.num_examples:
            raise ValueError(f"{split.description}: the data source has {len(self.source)} "
                             f"examples, the builder info says {split.num_examples}")
        self.offsets = None if offsets is None else np.asarray(offsets, np.int64)
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        i = int(i)
        ex = self.source[i]
        try:
            img = sources.decode_image(bytes(ex[self.image_key]))
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear message
            raise ValueError(sources.unreadable_message(self.key(i), e)) from e
        label = int(ex[self.label_key])
        if self.offsets is not None:
            label = (label + int(self.offsets[i])) % self.num_classes
        return {"image": img, "label": np.int32(label), "key": i}

    def key(self, i: int) -> str:
        return f"{self.description}: example {i}"

    def __repr__(self):
        return f"TfdsRecords({self.description!r})"


class TrainBatches:
    """Grain data source whose element ``step`` is this process's part of training step ``step``:
    positions ``step * B + rows`` of the shuffled stream of ``base`` (a ``grain.IndexSampler``),
    each read, decoded and augmented with an rng seeded from (seed, epoch, position), stacked.

    One grain element is one local batch, so with worker processes each worker makes whole
    batches and grain returns them in step order: the batches do not depend on the worker count.
    """

    def __init__(self, records, base, num_examples: int, global_batch: int, rows, seed: int,
                 settings: dict):
        self.records = records
        self.base = base
        self.n = int(num_examples)
        self.global_batch = int(global_batch)
        self.rows = np.asarray(rows, np.int64)
        self.seed = int(seed)
        self.s = settings

    def __len__(self) -> int:
        return _ENDLESS

    def __getitem__(self, step):
        s = self.s
        images, labels = [], []
        for pos in int(step) * self.global_batch + self.rows:
            el = self.records[self.base[int(pos)].record_key]
            rng = np.random.default_rng([_AUG_STREAM, self.seed % 2**63, int(pos) // self.n,
                                         int(pos)])
            images.append(augment_lib.np_train_transform(
                _check(el, s), rng, augment=s["augment"], size=s["size"],
                resize_mode=s["resize_mode"], cutout=s["cutout"], mean=s["mean"], std=s["std"]))
            labels.append(el["label"])
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}

    def __repr__(self):
        return f"TrainBatches({self.records!r}, {self.base!r}, global_batch={self.global_batch})"


class EvalBatches:
    """Grain data source whose element ``k`` is this process's part of eval batch ``k``:
    ``local`` (int64 [S, b], -1 = padding: zero image, label 0, mask False)."""

    def __init__(self, records, local, settings: dict):
        self.records = records
        self.local = np.asarray(local, np.int64)
        self.s = settings

    def __len__(self) -> int:
        return len(self.local)

    def __getitem__(self, k):
        s = self.s
        size = s["size"]
        images, labels = [], []
        for i in self.local[int(k)]:
            if i < 0:
                images.append(np.zeros((size, size, 3), np.float32))
                labels.append(0)
                continue
            el = self.records[int(i)]
            images.append(augment_lib.np_eval_transform(
                _check(el, s), size=size, resize_mode=s["resize_mode"], mean=s["mean"],
                std=s["std"]))
            labels.append(el["label"])
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32),
                "mask": self.local[int(k)] >= 0}

    def __repr__(self):
        return f"EvalBatches({self.records!r}, {self.local.shape})"


# ----------------------------------------------------------------------------- samplers


class StepSampler:
    """Entries ``start, start + 1, ...`` (``stop`` excluded; None = endless), in order."""

    def __init__(self, start: int = 0, stop: int | None = None):
        self.start = int(start)
        self.stop = stop

    def __len__(self) -> int:
        return (_ENDLESS if self.stop is None else self.stop) - self.start

    def __getitem__(self, k: int):
        from grain._src.python.record import RecordMetadata

        if not 0 <= k < len(self):
            raise IndexError(k)
        return RecordMetadata(index=int(k), record_key=self.start + int(k), rng=None)

    def __repr__(self):
        return f"StepSampler({self.start}, {self.stop})"


def _check(element, s):
    img = element["image"]
    need = s["fixed_hw"]
    if need is not None and img.shape[:2] != need:
        raise ValueError(sources.mixed_sizes_message(
            s["description"], "the first image", (*need, 3), f"example {element['key']}",
            img.shape))
    return img


# ----------------------------------------------------------------------------- the loader


class GrainLoader:
    """grain input pipelines for one Source (see the module docstring).

    Args: as ``StreamingLoader``, plus ``workers`` (grain worker processes; 0 = in-process).
    """

    def __init__(self, source, mesh, *, augment: str, image_size: int, resize_mode: str,
                 cutout: int, mean, std, seed: int, noise=None, workers: int = 0,
                 process_index=None, process_count=None):
        import_grain()
        if augment not in ("cifar", "none", "imagenet_simple", "imagenet_inception"):
            raise errors.ConfigError(
                f"loader='grain' supports augment 'cifar', 'imagenet_simple', "
                f"'imagenet_inception' and 'none', not {augment!r}")
        if workers < 0:
            raise errors.ConfigError(f"config.grain_workers must be >= 0, not {workers}")
        self.source = source
        self.mesh = mesh
        self.augment = augment
        self.size = int(image_size)
        self.resize_mode = resize_mode
        self.cutout = int(cutout)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = int(seed)
        self.noise = noise
        self.workers = int(workers)
        real = (jax.process_index(), jax.process_count())
        self.process_index = real[0] if process_index is None else int(process_index)
        self.process_count = real[1] if process_count is None else int(process_count)
        self.simulated = (self.process_index, self.process_count) != real
        fixed = source.image_shape
        self.fixed_hw = None if fixed is None else (int(fixed[0]), int(fixed[1]))
        if augment == "cifar" and self.fixed_hw != (self.size, self.size):
            raise errors.ConfigError(
                f"augment='cifar' needs images of image_size x image_size = {self.size}x"
                f"{self.size}, the data set's images are "
                f"{'of varying size' if fixed is None else sources._hwc(fixed)}: set "
                "config.image_size, or use augment='imagenet_simple'/'imagenet_inception'")
        self._train_records = self._records(source.train, train=True)
        self._eval_records = self._records(source.eval, train=False)

    def _records(self, split, *, train: bool):
        if isinstance(split, sources.IndexedSplit):
            labels = np.asarray(split.labels, np.int32)
            if train and self.noise is not None:
                labels = self.noise.apply(labels)
            return IndexedRecords(split, labels)
        if train and self.noise is not None:
            return TfdsRecords(split, self.noise.offsets, self.noise.num_classes)
        return TfdsRecords(split)

    def _settings(self, split, *, train: bool) -> dict[str, Any]:
        identity = self.fixed_hw == (self.size, self.size)
        need = (self.augment == "cifar" and train) or identity
        return {"augment": self.augment, "size": self.size, "resize_mode": self.resize_mode,
                "cutout": self.cutout, "mean": self.mean, "std": self.std,
                "fixed_hw": self.fixed_hw if need else None, "description": split.description}

    @property
    def num_train(self) -> int:
        return self.source.train.num_examples

    def rows(self, global_batch: int) -> np.ndarray:
        return order.process_rows(self.mesh, global_batch, self.process_index, self.process_count)

    # -------------------------------------------------------------------- grain pipelines

    def _loader(self, records, sampler, operations):
        grain = import_grain()
        if self.workers:
            from absl import flags

            # grain's workers read absl flags (its own, with defaults); a program that did not
            # parse flags (a notebook, pytest) would fail on the first read.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
        return grain.DataLoader(data_source=records, sampler=sampler, operations=operations,
                                worker_count=self.workers, shard_options=grain.NoSharding())

    def train_loader(self, global_batch: int, start_step: int = 0):
        """The grain ``DataLoader`` of this process's training batches from ``start_step``."""
        grain = import_grain()
        rows = self.rows(global_batch)
        order.steps_per_epoch(self.num_train, global_batch)
        base = grain.IndexSampler(num_records=self.num_train, shuffle=True, seed=self.seed,
                                  num_epochs=None, shard_options=grain.NoSharding())
        batches = TrainBatches(self._train_records, base, self.num_train, global_batch, rows,
                               self.seed, self._settings(self.source.train, train=True))
        return self._loader(batches, StepSampler(start_step), [])

    def eval_loader(self, global_batch: int):
        rows = self.rows(global_batch)
        idx, _ = order.eval_indices(self.source.eval.num_examples, global_batch)
        batches = EvalBatches(self._eval_records, idx[:, rows],
                              self._settings(self.source.eval, train=False))
        return self._loader(batches, StepSampler(0, len(idx)), [])

    # -------------------------------------------------------------------- iterators

    def local_train_batches(self, global_batch: int, *, start_step: int = 0):
        """Endless :class:`GrainIterator` of this process's rows of each global batch (NumPy)."""
        return GrainIterator(self, global_batch, int(start_step), global_arrays=False)

    def local_eval_batches(self, global_batch: int):
        return (_strip(b) for b in self.eval_loader(global_batch))

    def train_iterator(self, global_batch: int, *, start_step: int = 0):
        """Endless :class:`GrainIterator` of global batches (jax.Arrays over ``'data'``)."""
        self._no_simulation()
        return GrainIterator(self, global_batch, int(start_step), global_arrays=True)

    def eval_iterator(self, global_batch: int):
        self._no_simulation()
        return (self.to_global(b, global_batch) for b in self.local_eval_batches(global_batch))

    def _no_simulation(self):
        if self.simulated:
            raise ValueError(
                "process_index/process_count overrides simulate another process (for tests); "
                "global arrays need the real process layout: use local_train_iterator / "
                "local_eval_iterator, or create the data set without the overrides")

    def to_global(self, batch, global_batch: int):
        sharding = NamedSharding(self.mesh, P("data"))
        return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,
                                                                        *v.shape[1:]))
                for k, v in batch.items()}


def _strip(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


class GrainIterator:
    """Training batches from a grain ``DataLoader``; ``step`` is the step of the next batch.

    ``get_state()`` -> a JSON-serialisable dict (the grain iterator's own state, the step, and
    what the stream depends on); ``set_state(state)`` continues from there. Equivalent to
    ``train_iterator(B, start_step=state["step"])``.
    """

    def __init__(self, loader: GrainLoader, global_batch: int, start_step: int, *,
                 global_arrays: bool):
        self._loader = loader
        self.global_batch = int(global_batch)
        self.start_step = int(start_step)
        self.step = int(start_step)
        self._global = global_arrays
        self._it = iter(loader.train_loader(self.global_batch, self.start_step))

    def __iter__(self):
        return self

    def __next__(self):
        batch = _strip(next(self._it))
        self.step += 1
        if self._global:
            return self._loader.to_global(batch, self.global_batch)
        return batch

    def get_state(self) -> dict:
        return {"loader": "grain", "seed": self._loader.seed, "global_batch": self.global_batch,
                "num_train": self._loader.num_train, "start_step": self.start_step,
                "step": self.step, "grain": json.loads(self._it.get_state().decode())}

    def set_state(self, state: dict) -> None:
        want = {"seed": self._loader.seed, "global_batch": self.global_batch,
                "num_train": self._loader.num_train}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise ValueError(f"grain iterator state of another stream: {got}, this one {want}")
        self.start_step = int(state["start_step"])
        self._it = iter(self._loader.train_loader(self.global_batch, self.start_step))
        self._it.set_state(json.dumps(state["grain"]).encode())
        self.step = int(state["step"])
