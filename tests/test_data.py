"""Tests of dks_jax.data: sources, folders, TFDS, both loaders, order/resume, per-process splits, noise."""

import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from dks_jax import config_base, data, errors
from dks_jax.data import augment, folders, noise, order, sources, tfds_data

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_mesh(n, axis_type=jax.sharding.AxisType.Explicit):
    return jax.make_mesh((n,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:n])


def config(dataset, **overrides):
    """``config_base.base()`` (every config starts there) with ``dataset`` and ``overrides``."""
    c = config_base.base()
    c.update(dict(dataset=str(dataset), **overrides))
    return c


def host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def take(iterator, n):
    return [host(next(iterator)) for _ in range(n)]


def assert_batches_equal(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(a[k], b[k], atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def write_image(path, size=(32, 32), seed=0, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def tiny_folder(root, sizes=None, classes=("a", "b"), per_class=3):
    """<root>/{train,test}/<class>/<i>.jpg, 32x32 unless ``sizes`` maps (split, class, i)."""
    sizes = sizes or {}
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                write_image(root / split / c / f"{i}.jpg", sizes.get((split, c, i), (32, 32)),
                            seed=hash((split, c, i)) % 1000)
    return root


# --------------------------------------------------------------------------- real CIFAR-10


@pytest.fixture(scope="module")
def cifar_full(cifar_tar):
    """The whole shared CIFAR-10 archive, read in place and decoded once (about 10 s)."""
    t0 = time.time()
    src = folders.image_folder(cifar_tar, "train", "test", name="cifar10")
    train, test = src.train.decode_all(), src.eval.decode_all()
    return src, train, test, time.time() - t0


def test_real_cifar10_archive(cifar_full, cifar_tar):
    src, train, test, seconds = cifar_full
    print(f"read and decoded 60,000 CIFAR-10 JPEGs in {seconds:.1f} s")
    assert src.class_names == CIFAR10_CLASSES
    assert (src.train.num_examples, src.eval.num_examples) == (50_000, 10_000)
    assert train.shape == (50_000, 32, 32, 3) and test.shape == (10_000, 32, 32, 3)
    assert train.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(src.train.labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(src.eval.labels), [1000] * 10)
    # Label order: examples sorted by class (folder name), then file name.
    np.testing.assert_array_equal(src.train.labels, np.repeat(np.arange(10), 5000))
    np.testing.assert_array_equal(src.eval.labels, np.repeat(np.arange(10), 1000))
    assert src.train.keys[0].endswith("train/airplane/0000.jpg")
    assert src.train.keys[-1].endswith("train/truck/4999.jpg")
    assert train.min() == 0 and train.max() == 255
    # Pixel statistics of real CIFAR-10 (JPEG copy): close to the published mean/std.
    x = train[::10].reshape(-1, 3).astype(np.float32) / 255.0
    np.testing.assert_allclose(x.mean(0), sources.KNOWN_STATS["cifar10"][0], atol=0.01)
    np.testing.assert_allclose(x.std(0), sources.KNOWN_STATS["cifar10"][1], atol=0.01)
    # Through create(): the name "cifar10" finds the archive under data_dir; auto -> in_memory.
    ds = data.create(config("cifar10", data_dir=str(cifar_tar.parent)), make_mesh(8))
    assert ds.loader == "in_memory" and ds.num_classes == 10
    assert (ds.num_train, ds.num_eval, ds.image_shape) == (50_000, 10_000, (32, 32, 3))
    assert ds.steps_per_epoch(128) == 390
    batch = host(next(ds.train_iterator(256)))
    assert batch["image"].shape == (256, 32, 32, 3) and batch["image"].dtype == np.float32
    assert abs(batch["image"].mean()) < 0.3 and 0.7 < batch["image"].std() < 1.3
    counts, total = np.zeros(10, int), 0
    for b in ds.eval_iterator(1024):  # 10 batches, the last one ragged (784 real examples)
        b = host(b)
        counts += np.bincount(b["label"][b["mask"]], minlength=10)
        total += b["mask"].sum()
    assert total == 10_000 and (counts == 1000).all()


def test_cifar_subset_folder(cifar_subset):
    src = data.resolve_source(str(cifar_subset), None, "train", "test")
    assert src.class_names == CIFAR10_CLASSES and src.image_shape == (32, 32, 3)
    assert (src.train.num_examples, src.eval.num_examples) == (400, 200)
    np.testing.assert_array_equal(src.train.labels, np.repeat(np.arange(10), 40))
    x = src.train.decode_all()
    assert x.shape == (400, 32, 32, 3) and x.dtype == np.uint8 and x.max() > 200
    # Generic folder: mean/std estimated from the images, close to CIFAR-10's.
    np.testing.assert_allclose(src.mean, sources.KNOWN_STATS["cifar10"][0], atol=0.05)


def test_tar_is_read_in_place(cifar_subset, tmp_path):
    archive = tmp_path / "subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_subset, arcname="subset")
    before = sorted(os.listdir(tmp_path))
    a = data.resolve_source(str(archive), None, "train", "test")
    b = data.resolve_source(str(cifar_subset), None, "train", "test")
    assert sorted(os.listdir(tmp_path)) == before  # nothing unpacked or cached beside it
    assert a.class_names == b.class_names
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    np.testing.assert_array_equal(a.eval.decode_all(), b.eval.decode_all())


# --------------------------------------------------------------------------- loaders


def test_in_memory_equals_streaming_without_augmentation(cifar_subset):
    mesh = make_mesh(8)
    c = config(cifar_subset, augment="none", seed=7)
    c.loader = "in_memory"
    mem = data.create(c, mesh)
    c.loader = "streaming"
    stream = data.create(c, mesh)
    assert (mem.loader, stream.loader) == ("in_memory", "streaming")
    spe = mem.steps_per_epoch(40)  # 10: steps 8..11 cross the epoch boundary
    a = take(mem.train_iterator(40, start_step=8), 4)
    b = take(stream.train_iterator(40, start_step=8), 4)
    labels = mem.source.train.labels
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_batches_equal(x, y)
        idx = order.train_indices(7, 400, 40, 8 + k)
        np.testing.assert_array_equal(x["label"], labels[idx])
    assert not np.array_equal(a[1]["label"], a[2]["label"]) and spe == 10
    # The examples are the decoded images, normalised.
    raw = mem.source.train.decode_all()[order.train_indices(7, 400, 40, 8)]
    mean, std = np.asarray(mem.source.mean), np.asarray(mem.source.std)
    np.testing.assert_allclose(a[0]["image"], (raw / 255.0 - mean) / std, atol=1e-5)
    for x, y in zip(mem.eval_iterator(48), stream.eval_iterator(48), strict=True):
        assert_batches_equal(host(x), host(y))


def test_batches_are_global_arrays_sharded_over_data(cifar_subset):
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
        mesh = make_mesh(8, axis_type)
        for loader in ("in_memory", "streaming"):
            ds = data.create(config(cifar_subset, loader=loader), mesh)
            batch = next(ds.train_iterator(16))
            assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].dtype == np.int32
            for v in batch.values():
                assert isinstance(v, jax.Array)
                assert v.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), v.ndim)
                assert len(v.addressable_shards) == 8


def test_in_memory_batch_independent_of_device_count(cifar_subset):
    c = config(cifar_subset, loader="in_memory", augment="cifar", cutout=8, seed=3)
    one = take(data.create(c, make_mesh(1)).train_iterator(16, start_step=5), 1)[0]
    eight = take(data.create(c, make_mesh(8)).train_iterator(16, start_step=5), 1)[0]
    assert_batches_equal(one, eight, atol=1e-6)


@pytest.mark.parametrize("loader", ["in_memory", "streaming"])
def test_resume_is_exact(cifar_subset, loader):
    mesh = make_mesh(8)
    c = config(cifar_subset, loader=loader, augment="cifar", cutout=8, seed=11)
    straight = take(data.create(c, mesh).train_iterator(40), 12)
    resumed = take(data.create(c, mesh).train_iterator(40, start_step=9), 3)
    for x, y in zip(straight[9:], resumed, strict=True):
        assert_batches_equal(x, y, atol=0)
    # Augmentation is on: the same examples twice in different epochs look different.
    assert not np.allclose(straight[0]["image"], straight[1]["image"])
    c.seed = 12
    other = take(data.create(c, mesh).train_iterator(40), 1)[0]
    assert not np.array_equal(other["label"], straight[0]["label"])
    # Cutout zeroes a square of the normalised image.
    assert (np.abs(straight[0]["image"]).max(axis=-1) == 0).sum() >= 40 * 16


@pytest.mark.parametrize("loader", ["in_memory", "streaming", "grain"])
@pytest.mark.parametrize("n_dev", [1, 8])
def test_eval_counts_every_example_once(cifar_subset, loader, n_dev):
    if loader == "grain":
        pytest.importorskip("grain")
    ds = data.create(config(cifar_subset, loader=loader), make_mesh(n_dev))
    batches = [host(b) for b in ds.eval_iterator(48)]  # 200 = 4 * 48 + 8
    assert len(batches) == ds.eval_steps(48) == 5
    assert [int(b["mask"].sum()) for b in batches] == [48, 48, 48, 48, 8]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, ds.source.eval.labels)
    last = batches[-1]
    assert (last["image"][~last["mask"]] == 0).all() and (last["label"][~last["mask"]] == 0).all()


def test_per_process_splits_are_disjoint_and_covering(cifar_subset):
    mesh = make_mesh(8)
    c = config(cifar_subset, loader="streaming", augment="cifar", label_noise=0.3, seed=5)
    full = data.create(c, mesh)
    parts = [data.create(c, mesh, process_index=p, process_count=2) for p in range(2)]
    assert all(p.label_noise_report == full.label_noise_report for p in parts)
    rows = [order.process_rows(mesh, 40, p, 2) for p in range(2)]
    assert set(rows[0]).isdisjoint(rows[1]) and set(rows[0]) | set(rows[1]) == set(range(40))
    want = take(full.train_iterator(40, start_step=3), 2)
    got = [[next(it) for _ in range(2)]
           for it in (p.local_train_iterator(40, start_step=3) for p in parts)]
    for k in range(2):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([got[0][k][key], got[1][k][key]]), want[k][key])
    want_eval = [host(b) for b in full.eval_iterator(48)]
    got_eval = [list(p.local_eval_iterator(48)) for p in parts]
    assert len(got_eval[0]) == len(got_eval[1]) == len(want_eval)
    for w, a, b in zip(want_eval, *got_eval, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])
    with pytest.raises(ValueError, match="simulate"):
        next(parts[0].train_iterator(40))


def test_global_batch_must_divide(cifar_subset):
    ds = data.create(config(cifar_subset, loader="in_memory"), make_mesh(8))
    with pytest.raises(ValueError, match="multiple of 8"):
        ds.train_iterator(36)
    with pytest.raises(ValueError, match="multiple of 8"):
        ds.eval_iterator(20)
    with pytest.raises(ValueError, match="larger than the 400"):
        ds.train_iterator(800)
    with pytest.raises(ValueError, match="3 processes"):
        data.create(config(cifar_subset, loader="streaming"), make_mesh(8), process_index=0,
                    process_count=3).local_train_iterator(16)


def test_jax_augmentations():
    """The in-memory loader's pad-crop-flip and Cutout (augment.py), on known parameters."""
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    pad = augment.PAD
    offset = np.array([[pad, pad], [pad, pad], [0, 2 * pad]], np.int32)
    out = np.asarray(augment.pad_crop_flip(images, offset, np.array([False, True, False])))
    np.testing.assert_array_equal(out[0], images[0])  # centred crop, no flip: the image
    np.testing.assert_array_equal(out[1], images[1][:, ::-1])
    np.testing.assert_array_equal(out[2, :pad], 0)  # shifted down and left: zero padding shows
    np.testing.assert_array_equal(out[2, pad:, :-pad], images[2, :-pad, pad:])
    mask = np.asarray(augment.cutout_mask(np.array([[4, 3], [0, 0]]), (8, 6), 4))
    assert mask.shape == (2, 8, 6) and mask[0].sum() == 48 - 16 and mask[1].sum() == 48 - 4
    assert (mask[0, 2:6, 1:5] == 0).all()
    x = np.asarray(augment.transform(images, {}, augment="none", cutout=0, mean=(0.5,) * 3,
                                     std=(0.25,) * 3))
    np.testing.assert_allclose(x, (images / 255.0 - 0.5) / 0.25, atol=1e-5)


# --------------------------------------------------------------------------- label noise


def test_label_noise_fraction_and_determinism():
    a = noise.label_noise(1000, 10, 0.37, seed=1)
    assert a.num_changed == 370 and a.realised == 0.37
    assert a.report() == {"requested": 0.37, "realised": 0.37, "num_changed": 370,
                          "num_examples": 1000, "seed": 1}
    clean = np.arange(1000) % 10
    noisy = a.apply(clean)
    assert ((noisy != clean).sum()) == 370 and noisy.min() >= 0 and noisy.max() <= 9
    np.testing.assert_array_equal(noise.label_noise(1000, 10, 0.37, seed=1).offsets, a.offsets)
    assert not np.array_equal(noise.label_noise(1000, 10, 0.37, seed=2).offsets, a.offsets)
    # The new classes are spread over all the other classes.
    assert len(np.unique(noisy[noisy != clean] - clean[noisy != clean])) > 10
    assert noise.label_noise(1000, 10, 0.0, seed=1).num_changed == 0
    assert noise.label_noise(7, 3, 1.0, seed=0).realised == 1.0
    with pytest.raises(ValueError, match="fraction"):
        noise.label_noise(10, 10, 1.5, seed=0)


def test_label_noise_through_both_loaders(cifar_subset):
    mesh = make_mesh(8)
    c = config(cifar_subset, augment="none", label_noise=0.25, seed=4)
    c.loader = "in_memory"
    mem = data.create(c, mesh)
    c.loader = "streaming"
    stream = data.create(c, mesh)
    report = mem.label_noise_report
    assert report == stream.label_noise_report
    assert report["num_changed"] == 100 and report["realised"] == 0.25
    noisy = noise.label_noise(400, 10, 0.25, seed=4).apply(mem.source.train.labels)
    a, b = host(next(mem.train_iterator(40))), host(next(stream.train_iterator(40)))
    np.testing.assert_array_equal(a["label"], noisy[order.train_indices(4, 400, 40, 0)])
    np.testing.assert_array_equal(a["label"], b["label"])
    # Evaluation labels stay clean.
    ev = host(next(mem.eval_iterator(200)))
    np.testing.assert_array_equal(ev["label"], mem.source.eval.labels)
    assert data.create(config(cifar_subset, loader="in_memory"), mesh).label_noise_report == {}


def test_train_examples_is_a_fixed_balanced_subset(cifar_subset):
    mesh = make_mesh(8)
    full = data.create(config(cifar_subset, loader="in_memory", augment="none"), mesh)
    sub = data.create(config(cifar_subset, loader="in_memory", augment="none",
                             train_examples=100, label_noise=0.2, seed=3), mesh)
    assert (sub.num_train, sub.num_eval) == (100, full.num_eval)
    labels = np.asarray(full.source.train.labels)
    keep = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])
    keep.sort()
    np.testing.assert_array_equal(sub.source.train.labels, labels[keep])
    np.testing.assert_array_equal(sub.source.train.decode_all(),
                                  full.source.train.decode_all()[keep])
    assert sub.label_noise_report["num_changed"] == 20
    batch = host(next(sub.train_iterator(24)))
    noisy = noise.label_noise(100, 10, 0.2, seed=3).apply(labels[keep])
    np.testing.assert_array_equal(batch["label"], noisy[order.train_indices(3, 100, 24, 0)])
    for bad, words in ((105, "multiple of the 10 classes"), (500, "has 40")):
        with pytest.raises(errors.ConfigError, match=words):
            data.create(config(cifar_subset, loader="in_memory", train_examples=bad), mesh)


def test_label_noise_is_per_seed_with_several_seeds(cifar_subset):
    """``train_iterator(seed=k)`` of a seed-4 data set serves exactly a seed-k run's batch,
    noisy labels included (config.num_seeds shares one copy of the images)."""
    mesh = make_mesh(8)
    shared = data.create(config(cifar_subset, loader="in_memory", augment="none",
                                label_noise=0.5, seed=4), mesh)
    own = data.create(config(cifar_subset, loader="in_memory", augment="none", label_noise=0.5,
                             seed=5), mesh)
    for step in (0, 12):  # two epochs (10 steps of 40 each)
        a = host(next(shared.train_iterator(40, start_step=step, seed=5)))
        b = host(next(own.train_iterator(40, start_step=step)))
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    c = host(next(shared.train_iterator(40, seed=4)))
    noisy4 = noise.label_noise(400, 10, 0.5, seed=4).apply(shared.source.train.labels)
    np.testing.assert_array_equal(c["label"], noisy4[order.train_indices(4, 400, 40, 0)])


# --------------------------------------------------------------------------- TFDS (mocked)


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def mock_tfds(tmp_path, name, shards, make_image):
    """tfds.testing.mock_data for ``name``, with split metadata and examples by index.

    ``shards``: {split: [examples per shard]}. Example ``i`` of a split has label ``i`` and
    image ``make_image(split, i)`` (encoded). Slicing, file shuffling and tfds ids behave like
    TFDS's reader, so per-process reads can be checked.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=list(v), num_bytes=0)
        for s, v in shards.items()]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        base = str(split).split("[")[0]
        files = [os.path.basename(f.filename) for f in self.info.splits[base].file_instructions]
        starts = np.cumsum([0, *shards[base]])
        instructions = list(self.info.splits[split].file_instructions)
        if shuffle_files:
            rng = np.random.default_rng(read_config.shuffle_seed)
            instructions = [instructions[i] for i in rng.permutation(len(instructions))]
        images, labels, ids = [], [], []
        for fi in instructions:
            f = os.path.basename(fi.filename)
            for r in range(fi.skip, fi.skip + fi.take):
                i = int(starts[files.index(f)] + r)
                images.append(make_image(base, i))
                labels.append(i)
                ids.append(f"{f}__{r}")
        ex = {"image": tf.constant(images, tf.string), "label": tf.constant(labels, tf.int64)}
        if read_config is not None and read_config.add_tfds_id:
            ex["tfds_id"] = tf.constant(ids)
        return tf.data.Dataset.from_tensor_slices(ex)

    def as_data_source(self, split, decoders=None, **kwargs):
        # tfds.data_source (ArrayRecord) stand-in: example i of the split, image encoded.
        base = str(split).split("[")[0]
        n = int(self.info.splits[split].num_examples)
        start = int(tfds.core.ReadInstruction.from_spec(str(split)).to_absolute(
            self.info.splits)[0].from_ or 0)
        return [{"image": make_image(base, start + i), "label": start + i} for i in range(n)]

    return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES,
                                  data_dir=str(tmp_path), as_dataset_fn=as_dataset,
                                  as_data_source_fn=as_data_source)


def test_mock_cifar100_streaming(tmp_path):
    def image(split, i):
        rng = np.random.default_rng([split == "train", i])
        return _encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG")

    mesh = make_mesh(8)
    with mock_tfds(tmp_path, "cifar100", {"train": [40, 40], "test": [25]}, image):
        c = config("cifar100", data_dir=str(tmp_path), loader="streaming", seed=2)
        ds = data.create(c, mesh)
        c.loader, c.augment = "in_memory", "none"
        mem = data.create(c, mesh)
        c.loader = "streaming"
        plain = data.create(c, mesh)
    assert (ds.num_classes, ds.num_train, ds.num_eval) == (100, 80, 25)
    assert ds.source.kind == "tfds" and ds.source.mean == sources.KNOWN_STATS["cifar100"][0]
    assert mem.loader == "in_memory"
    batch = host(next(ds.train_iterator(16)))
    assert batch["image"].shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(batch["label"], order.train_indices(2, 80, 16, 0))
    # Small TFDS data sets are served by index: the two loaders agree.
    assert_batches_equal(host(next(mem.train_iterator(16, start_step=6))),
                         host(next(plain.train_iterator(16, start_step=6))))
    ev = [host(b) for b in ds.eval_iterator(8)]  # 25 = 3 * 8 + 1
    assert [int(b["mask"].sum()) for b in ev] == [8, 8, 8, 1]
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in ev]),
                                  np.arange(25))


def test_mock_imagenet_streaming_sequential(tmp_path):
    def image(split, i):
        rng = np.random.default_rng([split == "train", i])
        h, w = rng.integers(40, 90, 2)
        return _encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG")

    mesh = make_mesh(8)
    shards = {"train": [30, 34], "validation": [21]}
    with mock_tfds(tmp_path, "imagenet2012", shards, image):
        c = config("imagenet2012", data_dir=str(tmp_path), eval_split="validation",
                   augment="imagenet_simple", image_size=224, label_noise=0.25, seed=1)
        ds = data.create(c, mesh)
        assert ds.loader == "streaming" and ds.num_classes == 1000
        assert isinstance(ds.source.train, sources.SequentialSplit)
        assert (ds.num_train, ds.num_eval, ds.image_shape) == (64, 21, (224, 224, 3))
        batch = host(next(ds.train_iterator(8)))
        assert batch["image"].shape == (8, 224, 224, 3)
        assert np.isfinite(batch["image"]).all() and batch["image"].std() > 0.5
        ev = [host(b) for b in ds.eval_iterator(8)]  # 21 = 2 * 8 + 5
        assert len(ev) == ds.eval_steps(8) == 3
        assert sorted(np.concatenate([b["label"][b["mask"]] for b in ev])) == list(range(21))

        c.image_size, c.augment = 32, "imagenet_inception"
        full = data.create(c, mesh)
        spe = full.steps_per_epoch(8)
        straight = [b["label"] for b in take(full.train_iterator(8), spe + 2)]
        # One epoch holds every example once, with the noisy labels chosen from the seed.
        offsets = noise.label_noise(64, 1000, 0.25, seed=1).offsets
        assert sorted(np.concatenate(straight[:spe])) == sorted((np.arange(64) + offsets) % 1000)
        assert not np.array_equal(straight[0], straight[spe])  # reshuffled next epoch
        again = [b["label"] for b in take(full.train_iterator(8, start_step=spe - 1), 3)]
        for x, y in zip(straight[spe - 1:], again, strict=True):
            np.testing.assert_array_equal(x, y)
        a = take(full.train_iterator(8, start_step=3), 1)[0]
        b = take(full.train_iterator(8, start_step=3), 1)[0]
        assert_batches_equal(a, b, atol=0)

        # Two simulated processes: disjoint halves, each example once per epoch and in eval.
        c.label_noise = 0.0
        parts = [data.create(c, mesh, process_index=p, process_count=2) for p in range(2)]
        seen = [np.concatenate([next(it)["label"] for _ in range(spe)])
                for it in (p.local_train_iterator(8) for p in parts)]
        assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(64))
        ev_parts = [list(p.local_eval_iterator(8)) for p in parts]
        assert len(ev_parts[0]) == len(ev_parts[1]) == parts[0].eval_steps(8)
        labels = [e["label"][e["mask"]] for part in ev_parts for e in part]
        assert sorted(np.concatenate(labels)) == list(range(21))


# --------------------------------------------------------------------------- bad input


def test_missing_data_sets(tmp_path):
    mesh = make_mesh(1)
    with pytest.raises(data.DataNotFoundError, match=r"train/<class>/<image>"):
        data.create(config(str(tmp_path / "nowhere")), mesh)
    with pytest.raises(data.DataNotFoundError, match=r"tfds build cifar100"):
        data.create(config("cifar100", data_dir=str(tmp_path), download=False), mesh)
    with pytest.raises(data.DataNotFoundError, match="downloads/manual"):
        data.create(config("imagenet2012", data_dir=str(tmp_path)), mesh)
    root = tiny_folder(tmp_path / "f")
    with pytest.raises(data.DataNotFoundError, match=r"no split 'val'.*found splits \['test'\]"):
        data.create(config(root, eval_split="val"), mesh)


class _FakeBuilder:
    """An unprepared TFDS builder that records download_and_prepare."""

    def __init__(self, error=None):
        self.info = type("Info", (), {"splits": {}})()
        self.data_dir, self.error, self.calls = "", error, 0

    def download_and_prepare(self):
        self.calls += 1
        if self.error:
            raise self.error


def test_missing_tfds_data_set_is_downloaded(tmp_path, monkeypatch):
    """No archive, network at hand: the download path is taken (faked here: no network in tests)."""
    import tensorflow_datasets as tfds

    fake = _FakeBuilder()
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: fake)
    monkeypatch.setattr(tfds_data, "_reachable", lambda host, **kw: True)
    # After the (fake) download the builder is asked again; still no splits -> "not prepared".
    with pytest.raises(data.DataNotFoundError, match="not prepared"):
        data.create(config("cifar10", data_dir=str(tmp_path)), make_mesh(1))
    assert fake.calls == 1
    fake.calls = 0
    with pytest.raises(data.DataNotFoundError):
        data.create(config("cifar10", data_dir=str(tmp_path), download=False), make_mesh(1))
    assert fake.calls == 0


@pytest.mark.parametrize("reachable", [False, True])
def test_missing_tfds_data_set_without_network_names_both_ways_out(tmp_path, monkeypatch,
                                                                   reachable):
    import tensorflow_datasets as tfds

    fake = _FakeBuilder(error=ConnectionError("Name or service not known"))
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: fake)
    monkeypatch.setattr(tfds_data, "_reachable", lambda host, **kw: reachable)
    with pytest.raises(data.DataNotFoundError) as info:
        data.create(config("cifar10", data_dir=str(tmp_path)), make_mesh(1))
    message = str(info.value)
    assert "DATA_DIR=" in message and "internet" in message and "cifar10-jpeg.tar.gz" in message
    assert fake.calls == int(reachable)  # unreachable host: no download tried, no waiting


def test_folder_without_classes(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        data.create(config(tmp_path), make_mesh(1))
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match=r"without images.*\['cat'\]"):
        data.create(config(tmp_path), make_mesh(1))


def test_mixed_image_sizes(tmp_path):
    root = tiny_folder(tmp_path, sizes={("train", "b", 1): (40, 36)})
    with pytest.raises(ValueError, match=r"mixed sizes.*b/1.jpg is 36x40x3"):
        data.create(config(root, loader="in_memory"), make_mesh(1))
    ds = data.create(config(root, loader="streaming", augment="cifar"), make_mesh(1))
    with pytest.raises(ValueError, match=r"mixed sizes.*b/1.jpg is 36x40x3"):
        take(ds.train_iterator(6), 1)
    # The ImageNet augmentations resize: mixed sizes are fine there.
    ds = data.create(config(root, augment="imagenet_simple", image_size=24), make_mesh(1))
    assert ds.loader == "streaming" and host(next(ds.train_iterator(6)))["image"].shape[1] == 24


def test_truncated_archive_is_an_error(cifar_subset, tmp_path):
    """A plain .tar cut at a member boundary (95% in) reads as a shorter data set unless its
    missing end-of-archive blocks are noticed."""
    archive = tmp_path / "subset.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(cifar_subset, arcname="subset")
    assert data.resolve_source(str(archive), None, "train", "test").eval.num_examples == 200
    with tarfile.open(archive) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    cut = offsets[int(len(offsets) * 0.95)]  # the header of a member: a clean member boundary
    short = tmp_path / "short.tar"
    short.write_bytes(archive.read_bytes()[:cut])
    with tarfile.open(short) as tar:  # what made it silent: tarfile itself reads it without error
        assert 0 < len(tar.getmembers()) < len(offsets)
    with pytest.raises(sources.DataNotFoundError, match="end-of-archive blocks.*truncated"):
        data.resolve_source(str(short), None, "train", "test")


def test_eval_split_missing_classes_is_an_error(tmp_path):
    root = tiny_folder(tmp_path, classes=("a", "b", "c"))
    for f in (root / "test" / "c").iterdir():
        f.unlink()
    with pytest.raises(sources.DataNotFoundError, match=r"test has no images of 1 of the 3 "
                                                        r"classes of train: c\b"):
        data.create(config(root), make_mesh(1))


def test_short_copy_of_a_named_data_set_is_an_error(cifar_subset, tmp_path):
    """A folder found as the copy of cifar10 must have cifar10's split sizes and classes."""
    copy = tmp_path / "cifar10"
    shutil.copytree(cifar_subset, copy)
    with pytest.raises(sources.DataNotFoundError,
                       match=r"train has 400 images, but cifar10's train split has 50,000 \(5,000 "
                             r"per class; differing: airplane \(40\)"):
        data.resolve_source("cifar10", str(tmp_path), "train", "test")
    shutil.rmtree(copy / "train" / "truck")
    shutil.rmtree(copy / "test" / "truck")
    with pytest.raises(sources.DataNotFoundError, match="cifar10, which has 10 classes, but it has 9"):
        data.resolve_source("cifar10", str(tmp_path), "train", "test")
    # Named by its path, the same folder is a data set of its own: no sizes to match.
    assert data.resolve_source(str(copy), None, "train", "test").num_classes == 9


def test_unreadable_image_is_an_error(tmp_path):
    root = tiny_folder(tmp_path)
    ds = data.create(config(root, loader="streaming"), make_mesh(1))
    (root / "train" / "a" / "1.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"cannot decode image .*a/1.jpg"):
        data.create(config(root, loader="in_memory"), make_mesh(1))
    with pytest.raises(ValueError, match=r"cannot decode image .*a/1.jpg"):
        take(ds.train_iterator(6), 1)  # the streaming loader finds it when it reads it
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="cannot read the archive"):
        data.create(config(broken), make_mesh(1))


def test_bad_config_values(cifar_subset):
    mesh = make_mesh(1)
    with pytest.raises(ValueError, match="config.loader"):
        data.create(config(cifar_subset, loader="gpu"), mesh)
    with pytest.raises(ValueError, match="config.augment"):
        data.create(config(cifar_subset, augment="heavy"), mesh)
    with pytest.raises(ValueError, match="in_memory' is not possible"):
        data.create(config(cifar_subset, loader="in_memory", augment="imagenet_simple"), mesh)
    with pytest.raises(ValueError, match="needs images of image_size"):
        data.create(config(cifar_subset, image_size=28), mesh)


def test_in_memory_path_does_not_need_tensorflow(cifar_subset):
    """Importing dks_jax.data and the in-memory loader work with TensorFlow unavailable."""
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "import jax, numpy as np\n"
        "from dks_jax import config_base, data\n"
        "mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))\n"
        f"c = config_base.base(); c.dataset = {str(cifar_subset)!r}; c.augment = 'cifar'\n"
        "ds = data.create(c, mesh)\n"
        "b = next(ds.train_iterator(8))\n"
        "assert ds.loader == 'in_memory' and b['image'].shape == (8, 32, 32, 3)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_inception_crop_decodes_only_the_window_with_the_same_pixels(cifar_subset):
    """decode_and_crop_jpeg gives the pixels of the whole decode, sliced (PNG: exactly; JPEG: all
    but the window's first or last column, where chroma upsampling lacks its outside neighbour)."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.integers(0, 9, (375, 500, 3)), 0), 1) % 256
    encoded = []
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(smooth.astype(np.uint8)).save(buf, format=fmt, quality=90)
        encoded.append(buf.getvalue())
    encoded.append(next((cifar_subset / "train").rglob("*.jpg")).read_bytes())  # 32x32 JPEG
    for blob in encoded:
        whole = augment.tf_decode(tf.constant(blob))
        for k in range(6):
            seed = tf.constant([k, 7], tf.int64)
            begin, box = augment.tf_inception_window(tf.shape(whole), seed)
            want = tf.slice(whole, begin, box).numpy()
            got = augment.tf_decode_inception_crop(tf.constant(blob), seed).numpy()
            assert got.shape == want.shape and got.shape[0] * got.shape[1] >= 0.08 * \
                whole.shape[0] * whole.shape[1] * 0.99
            inner = (slice(None), slice(1, -1))
            np.testing.assert_array_equal(got[inner], want[inner])
            if blob[:4] == b"\x89PNG":
                np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- grain loader


def _grain(cifar_subset, **kw):
    pytest.importorskip("grain")
    return data.create(config(cifar_subset, loader="grain", **kw), make_mesh(8))


def test_grain_matches_in_memory_without_augmentation(cifar_subset):
    g = _grain(cifar_subset, augment="none", seed=7)
    mem = data.create(config(cifar_subset, loader="in_memory", augment="none", seed=7),
                      make_mesh(8))
    assert g.loader == "grain"
    # One epoch (400 = 10 x 40): every example once, the same images and labels as in memory,
    # in grain's order.
    batches = take(g.train_iterator(40), 10)
    raw = mem.source.train.decode_all()
    mean, std = np.asarray(mem.source.mean), np.asarray(mem.source.std)
    want = ((raw / 255.0 - mean) / std).astype(np.float32)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    # Find each image among the decoded ones (its pixels, normalisation undone), then compare.
    index = {raw[i].tobytes(): i for i in range(len(raw))}
    pixels = np.round((images * std + mean) * 255).astype(np.uint8)
    found = [index.get(x.tobytes()) for x in pixels]
    assert None not in found and sorted(found) == list(range(400))
    np.testing.assert_allclose(images, want[found], atol=1e-5)
    np.testing.assert_array_equal(labels, mem.source.train.labels[found])
    # Evaluation: the same batches as the in-memory loader, exactly.
    for x, y in zip(mem.eval_iterator(48), g.eval_iterator(48), strict=True):
        assert_batches_equal(host(x), host(y))


def test_grain_resume_and_state_are_exact(cifar_subset):
    ds = _grain(cifar_subset, augment="cifar", cutout=8, seed=11)
    it = ds.train_iterator(40)
    straight = take(it, 12)
    assert it.get_state()["step"] == 12
    resumed = take(ds.train_iterator(40, start_step=9), 3)
    for x, y in zip(straight[9:], resumed, strict=True):
        assert_batches_equal(x, y, atol=0)
    # get_state / set_state: a JSON state after 5 steps continues with step 5.
    it = ds.train_iterator(40)
    take(it, 5)
    import json
    state = json.loads(json.dumps(it.get_state()))
    other = ds.train_iterator(40, start_step=2)
    other.set_state(state)
    assert other.step == 5
    for x, y in zip(straight[5:8], take(other, 3), strict=True):
        assert_batches_equal(x, y, atol=0)
    # Augmentation is on and differs between epochs; cutout zeroes a square.
    assert not np.allclose(straight[0]["image"], straight[1]["image"])
    assert (np.abs(straight[0]["image"]).max(axis=-1) == 0).sum() >= 40 * 16


def test_grain_simulated_processes_cover_the_global_batch(cifar_subset):
    pytest.importorskip("grain")
    mesh = make_mesh(8)
    c = config(cifar_subset, loader="grain", augment="cifar", label_noise=0.3, seed=5)
    full = data.create(c, mesh)
    parts = [data.create(c, mesh, process_index=p, process_count=2) for p in range(2)]
    want = take(full.train_iterator(40, start_step=3), 2)
    got = [[next(it) for _ in range(2)]
           for it in (p.local_train_iterator(40, start_step=3) for p in parts)]
    for k in range(2):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([got[0][k][key], got[1][k][key]]), want[k][key])
    want_eval = [host(b) for b in full.eval_iterator(48)]
    got_eval = [list(p.local_eval_iterator(48)) for p in parts]
    for w, a, b in zip(want_eval, *got_eval, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])


@pytest.mark.slow
def test_grain_workers_do_not_change_the_batches(cifar_subset):
    zero = take(_grain(cifar_subset, augment="cifar", seed=3).train_iterator(40, start_step=8), 3)
    two = _grain(cifar_subset, augment="cifar", seed=3, grain_workers=2)
    for x, y in zip(zero, take(two.train_iterator(40, start_step=8), 3), strict=True):
        assert_batches_equal(x, y, atol=0)
    ev0 = [host(b) for b in _grain(cifar_subset, seed=3).eval_iterator(48)]
    for x, y in zip(ev0, two.eval_iterator(48), strict=True):
        assert_batches_equal(x, host(y), atol=0)


def test_numpy_augmentations():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = augment.np_pad_crop_flip(img, np.random.default_rng(1))
    assert out.shape == img.shape
    big = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    for aug in ("imagenet_simple", "imagenet_inception"):
        x = augment.np_train_transform(big, np.random.default_rng(2), augment=aug, size=32,
                                       resize_mode="shorter_side", cutout=0, mean=(0.5,) * 3,
                                       std=(0.25,) * 3)
        assert x.shape == (32, 32, 3) and x.dtype == np.float32
    y, x0, h, w = augment.np_inception_window(60, 90, np.random.default_rng(3))
    assert 0 <= y and y + h <= 60 and 0 <= x0 and x0 + w <= 90 and 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1
    ev = augment.np_eval_transform(big, size=32, resize_mode="both_sides", mean=(0,) * 3,
                                   std=(1,) * 3)
    assert ev.shape == (32, 32, 3)


def test_grain_tfds_data_source(tmp_path):
    pytest.importorskip("grain")

    def image(split, i):
        rng = np.random.default_rng([split == "train", i])
        h, w = rng.integers(40, 90, 2)
        return _encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG")

    mesh = make_mesh(8)
    with mock_tfds(tmp_path, "imagenet2012", {"train": [30, 34], "validation": [21]}, image):
        c = config("imagenet2012", data_dir=str(tmp_path), eval_split="validation",
                   loader="grain", augment="imagenet_simple", image_size=32, seed=1)
        ds = data.create(c, mesh)
        assert ds.loader == "grain" and isinstance(ds.source.train, sources.SequentialSplit)
        spe = ds.steps_per_epoch(8)
        labels = np.concatenate([b["label"] for b in take(ds.train_iterator(8), spe)])
        assert sorted(labels) == list(range(64))  # one epoch: every example once
        a = take(ds.train_iterator(8, start_step=3), 1)[0]
        assert a["image"].shape == (8, 32, 32, 3) and np.isfinite(a["image"]).all()
        ev = [host(b) for b in ds.eval_iterator(8)]  # 21 = 2 * 8 + 5
        assert len(ev) == ds.eval_steps(8) == 3
        np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in ev]),
                                      np.arange(21))
        c.augment = "imagenet_inception"
        b = take(data.create(c, mesh).train_iterator(8, start_step=3), 1)[0]
        np.testing.assert_array_equal(a["label"], b["label"])
