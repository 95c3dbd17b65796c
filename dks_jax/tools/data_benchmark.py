"""Images per second of the input pipelines on this machine (printed, not a test).

    python -m dks_jax.tools.data_benchmark [--data_dir=../shared/data] [--seconds=8]

Measures, on the default JAX devices (the host CPU unless an accelerator is present):

* reading + decoding the CIFAR-10 JPEG archive (the in-memory loader's start-up),
* the in-memory loader (gather + pad/crop/flip + normalise inside jit; and without augmentation),
* the streaming loader on the same images (tf.data decode + augmentation),
* the streaming loader on mock ImageNet (``tfds.testing.mock_data``, 500x375 JPEGs) at 224x224,
  with the "simple" (resize 256x256, random crop 224, flip) and Inception-style augmentations,
  and evaluation (resize + central crop),
* the grain loader (``loader=grain``, 0 and 2 worker processes) on the same mock ImageNet through
  ``tfds.data_source`` (mocked: in-memory records), PIL decode and NumPy/PIL augmentation.

Each figure is global images per second after a warm-up (compilation, pipeline start).
"""

from __future__ import annotations

import io
import os
import pathlib
import platform
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from dks_jax import cli, config_base, data

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data_dir", str(DEFAULT_DATA_DIR), "folder holding cifar10-jpeg.tar.gz",
                        flag_values=fv)
    flags.DEFINE_float("seconds", 8.0, "time per measurement", flag_values=fv)
    flags.DEFINE_integer("batch", 128, "CIFAR global batch", flag_values=fv)
    flags.DEFINE_integer("imagenet_batch", 32, "ImageNet global batch", flag_values=fv)
    flags.DEFINE_bool("decode_crop_only", False, "only the Inception crop's decode: the crop "
                      "window alone vs the whole image, interleaved", flag_values=fv)


def decode_crop_rates(seconds: float, rounds: int = 3, num_images: int = 256) -> dict:
    """Images/s of the Inception-style crop + resize to 224 on 500x375 JPEGs (one thread, no
    batching), decoding only the crop window vs decoding the whole image then slicing; the two
    alternate ``rounds`` times. Returns the median rate of each."""
    import io as io_lib

    from PIL import Image

    from dks_jax.data import augment

    tf = augment.import_tf()
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(num_images):
        img = np.cumsum(np.cumsum(rng.integers(0, 9, (375, 500, 3)), 0), 1) % 256
        buf = io_lib.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())

    def whole(data, seed):
        img = augment.tf_decode(data)
        begin, box = augment.tf_inception_window(tf.shape(img), seed)
        return tf.image.resize(tf.slice(img, begin, box), [224, 224], antialias=True)

    def window(data, seed):
        return tf.image.resize(augment.tf_decode_inception_crop(data, seed), [224, 224],
                               antialias=True)

    seeds = np.stack([np.arange(num_images), np.zeros(num_images)], 1).astype(np.int64)
    results: dict[str, list[float]] = {"whole image": [], "crop window": []}
    for _ in range(rounds):
        for name, fn in (("whole image", whole), ("crop window", window)):
            ds = tf.data.Dataset.from_tensor_slices((jpegs, seeds)).map(fn).repeat()
            options = tf.data.Options()
            options.threading.private_threadpool_size = 1
            ds = ds.with_options(options)
            it = iter(ds)
            for _ in range(8):
                next(it)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                next(it)
                n += 1
            results[name].append(n / (time.perf_counter() - start))
    return {k: float(np.median(v)) for k, v in results.items()}


def _config(**kw):
    config = config_base.base()
    config.update(dict(dataset="cifar10", data_dir="", train_split="train", eval_split="test",
                       loader="auto", augment="cifar", image_size=32, resize_mode="both_sides",
                       cutout=0, label_noise=0.0, seed=0))
    config.update(kw)
    return config


def _rate(iterator, batch, seconds, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(next(iterator))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        out = next(iterator)
        n += 1
        if n % 8 == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return n * batch / (time.perf_counter() - t0)


def _mock_imagenet(tmp, num_train, num_eval):
    """Context manager: mock TFDS imagenet2012 with realistic 500x375 JPEGs."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(32):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    shards = {"train": [num_train // 2, num_train - num_train // 2], "validation": [num_eval]}
    builder = tfds.builder("imagenet2012", data_dir=tmp)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=v, num_bytes=0) for s, v in shards.items()]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        instructions = list(self.info.splits[split].file_instructions)
        ids, labels, blobs = [], [], []
        for fi in instructions:
            for r in range(fi.skip, fi.skip + fi.take):
                ids.append(f"{os.path.basename(fi.filename)}__{r}")
                labels.append(r % 1000)
                blobs.append(images[r % len(images)])
        ex = {"image": tf.constant(blobs), "label": tf.constant(labels, tf.int64)}
        if read_config is not None and read_config.add_tfds_id:
            ex["tfds_id"] = tf.constant(ids)
        return tf.data.Dataset.from_tensor_slices(ex)

    def as_data_source(self, split, decoders=None, **kwargs):  # tfds.data_source stand-in
        n = int(self.info.splits[split].num_examples)
        return [{"image": images[i % len(images)], "label": i % 1000} for i in range(n)]

    return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=tmp,
                                  as_dataset_fn=as_dataset, as_data_source_fn=as_data_source)


def main(argv) -> list:
    """``argv`` without the program name; returns the rows ``(name, value, unit)``."""
    from dks_jax.data import folders, sources

    args, _ = cli.parse(define_flags, argv, "python -m dks_jax.tools.data_benchmark", __doc__)

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,), devices=devices)
    print(f"# dks_jax input pipeline benchmark — {platform.node()}, {os.cpu_count()} CPU cores, "
          f"JAX {jax.__version__} on {len(devices)} x {devices[0].device_kind}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}; each figure: global images/s after warm-up")
    rows = []

    def report(name, value, unit="images/s"):
        rows.append((name, value, unit))
        number = f"{value:>9.2f}" if unit == "x" else f"{value:>9,.0f}"
        print(f"{name:<70} {number} {unit}", flush=True)

    if args.decode_crop_only:
        rates = decode_crop_rates(args.seconds)
        for name, rate in rates.items():
            report(f"Inception crop of 500x375 JPEGs -> 224, 1 thread: decode {name}", rate)
        report("  speed-up of decoding the crop window", rates["crop window"] /
               rates["whole image"], "x")
        return rows

    archive = folders.find_folder_copy("cifar10", args.data_dir, "train")
    if archive is None:
        print(f"no CIFAR-10 copy under {args.data_dir}: skipping the CIFAR-10 figures")
    else:
        t0 = time.perf_counter()
        src = folders.image_folder(archive, "train", "test", name="cifar10")
        t1 = time.perf_counter()
        # An image folder is served by index.
        assert isinstance(src.train, sources.IndexedSplit) and isinstance(src.eval, sources.IndexedSplit)
        src.train.decode_all()
        src.eval.decode_all()
        t2 = time.perf_counter()
        report("CIFAR-10: read archive in place (60,000 JPEGs)", 60_000 / (t1 - t0))
        report("CIFAR-10: decode with PIL (in-memory start-up)", 60_000 / (t2 - t1))
        b = args.batch
        cases: list[tuple[str, dict[str, Any]]] = [
            ("in_memory, augment=cifar (pad-crop-flip, normalise)", dict(augment="cifar")),
            ("in_memory, augment=cifar + cutout 16", dict(augment="cifar", cutout=16)),
            ("in_memory, augment=none", dict(augment="none")),
            ("streaming, augment=cifar", dict(augment="cifar", loader="streaming")),
            ("streaming, augment=none", dict(augment="none", loader="streaming")),
        ]
        for name, kw in cases:
            kw.setdefault("loader", "in_memory")
            ds = data.create(_config(data_dir=args.data_dir, **kw), mesh)
            report(f"CIFAR-10 train B={b}: {name}", _rate(ds.train_iterator(b), b, args.seconds))
        ds = data.create(_config(data_dir=args.data_dir, loader="streaming"), mesh)
        t0 = time.perf_counter()
        n = sum(int(np.asarray(x["mask"]).sum()) for x in ds.eval_iterator(500))
        report("CIFAR-10 eval B=500 (10,000 images, one pass): streaming",
               n / (time.perf_counter() - t0))

    b = args.imagenet_batch
    with tempfile.TemporaryDirectory() as tmp, _mock_imagenet(tmp, 4096, 512):
        for augment in ("imagenet_simple", "imagenet_inception"):
            c = _config(dataset="imagenet2012", data_dir=tmp, eval_split="validation",
                        augment=augment, image_size=224)
            ds = data.create(c, mesh)
            report(f"mock ImageNet 500x375 JPEG -> 224 B={b}: {augment}",
                   _rate(ds.train_iterator(b), b, args.seconds))
            for workers in (0, 2):
                c.loader, c.grain_workers = "grain", workers
                ds = data.create(c, mesh)
                report(f"mock ImageNet -> 224 B={b}: grain ({workers} workers), {augment}",
                       _rate(ds.train_iterator(b), b, args.seconds))
        c = _config(dataset="imagenet2012", data_dir=tmp, eval_split="validation",
                    augment="imagenet_simple", image_size=224, resize_mode="shorter_side")
        ds = data.create(c, mesh)
        report(f"mock ImageNet -> 224 B={b}: imagenet_simple, shorter_side",
               _rate(ds.train_iterator(b), b, args.seconds))
        t0 = time.perf_counter()
        n = sum(int(np.asarray(x["mask"]).sum()) for x in ds.eval_iterator(b))
        report(f"mock ImageNet eval B={b} (resize, central 224 crop)",
               n / (time.perf_counter() - t0))
    return rows


def _command(argv) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    cli.run(_command)
