"""Classify CIFAR-10 test JPEGs with a trained export: ``dks_jax.load(path)(uint8_images)``.

Run after ``make demo`` (it leaves ``workdirs/quickstart/export``)::

    python examples/classify_cifar_jpegs.py [--export=workdirs/quickstart] \\
        [--archive=../shared/data/cifar10-jpeg.tar.gz] [--count=8]

The predictor applies the preprocessing recorded in the export (the model's image size, resize rule
and the training images' mean and std), so it takes the JPEGs' pixels as they are.
"""

import argparse
import io
import pathlib
import sys
import tarfile

import numpy as np
from PIL import Image

import dks_jax


def test_jpegs(archive, count: int):
    """The first ``count`` test images of the archive: ``(uint8 [N, H, W, 3], true class names)``."""
    images, names = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if member.isfile() and member.name.endswith(".jpg") and len(parts) >= 3 and parts[-3] == "test":
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                names.append(parts[-2])
                if len(images) == count:
                    break
    return np.stack(images), names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="workdirs/quickstart")
    parser.add_argument("--archive", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)
    if not pathlib.Path(args.export).exists():
        print(f"{args.export} does not exist: run `make demo` first (or pass --export).")
        return 1
    predictor = dks_jax.load(args.export)
    images, truth = test_jpegs(args.archive, args.count)
    probabilities = np.asarray(predictor(images))
    for p, name in zip(probabilities, truth, strict=True):
        guess = predictor.class_names[int(p.argmax())]
        print(f"{name:>12} -> {guess:<12} ({100 * p.max():.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
