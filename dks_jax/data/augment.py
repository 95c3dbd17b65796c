"""The augmentations of both loaders, each one's JAX and tf.data versions side by side.

JAX versions work on a batch inside ``jax.jit`` (the in-memory loader, ``in_memory.py``); tf.data
versions (``tf_*``) work on one example inside a ``tf.data`` map (the streaming loader,
``streaming.py``). ``S = image_size``; ``R = resize_size(S) = round(S * 256 / 224)`` (256 for 224).

* ``cifar``: zero-pad 4, random ``S x S`` crop, horizontal flip (images must be ``S x S``).
  JAX: ``pad_crop_flip``; tf.data: ``tf_pad_crop_flip``.
* ``imagenet_simple`` (tf.data only): resize to ``R x R`` (``resize_mode='both_sides'``, as the
  DKS paper does) or the shorter side to ``R`` (``'shorter_side'``), random ``S x S`` crop, flip.
* ``imagenet_inception`` (tf.data only): Inception-style random-resized crop (area 8%-100% of the
  image, aspect ratio 3/4-4/3, at least 10% of the image covered, 100 attempts, else the whole
  image), resized to ``S x S``, flip.
* ``none`` and evaluation: the image itself if it is ``S x S``, else (tf.data only) resize as
  above and take the central ``S x S`` crop.

Then per-channel mean/std normalisation (``normalise`` / ``tf_normalise``) and, if configured,
Cutout (``apply_cutout`` / ``tf_apply_cutout``: a ``cutout x cutout`` square of zeros after normalisation,
centred uniformly in the image and clipped at its border, as in DeVries & Taylor).

Random numbers: the JAX versions take parameters drawn for a whole global batch from one key
(``augment_params``), so a batch does not depend on the number of devices; the tf.data versions
draw from stateless per-example seeds (``int64 [2]``), so they do not depend on the number of
processes or on ``tf.data`` threading. The two loaders apply the same transformations, but with
different random draws: with augmentation off they give the same batches.

TensorFlow is imported on first use of a ``tf_*`` function (``import_tf``), never when this module
is imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PAD = 4  # the cifar augmentation's zero padding, each side


def import_tf():
    """TensorFlow, imported on first use, with its GPUs hidden (JAX owns the accelerators)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: nothing to do
        pass
    return tf


# ----------------------------------------------------------------------------- normalisation


def normalise(images, mean, std):
    """JAX: uint8 [..., C] -> float32 [..., C], ``(x / 255 - mean) / std`` per channel.

    ``mean``, ``std``: C floats in [0, 1] units.
    """
    scale = np.asarray(1.0 / (255.0 * np.asarray(std)), np.float32)
    bias = np.asarray(-np.asarray(mean) / np.asarray(std), np.float32)
    return images.astype(jnp.float32) * scale + bias


def tf_normalise(x, mean, std):
    """tf.data: float32 [H, W, C] in [0, 255] -> float32 [H, W, C], ``(x / 255 - mean) / std``."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    bias = (-mean / std).astype(np.float32)
    return x * scale + bias


# ----------------------------------------------------------------------------- cifar


def pad_crop_flip(images, offset, flip):
    """JAX: uint8 [b, H, W, C] -> uint8 [b, H, W, C]: zero-pad ``PAD``, crop ``H x W`` at
    ``offset`` (int32 [b, 2], each in [0, 2 * PAD]), mirror left-right where ``flip`` (bool [b])."""
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offset)
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def tf_pad_crop_flip(img, size: int, seeds):
    """tf.data: uint8 [S, S, 3] -> float32 [S, S, 3] in [0, 255]: zero-pad ``PAD``, random
    ``S x S`` crop (seed ``seeds[0]``), flip (``seeds[1]``); ``seeds``: int64 [>= 2, 2]."""
    tf = import_tf()
    img = tf.pad(img, [[PAD, PAD], [PAD, PAD], [0, 0]])
    x = tf.cast(tf.image.stateless_random_crop(img, [size, size, 3], seed=seeds[0]), tf.float32)
    return tf.image.stateless_random_flip_left_right(x, seed=seeds[1])


# ----------------------------------------------------------------------------- imagenet_simple


def resize_size(image_size: int) -> int:
    """``R``: the side images are resized to before an ``image_size`` crop (256 for 224)."""
    return int(round(image_size * 256 / 224))


def tf_resize(img, size: int, resize_mode: str):
    """tf.data: uint8 [H, W, 3] -> float32 [R, R, 3] (``'both_sides'``) or float32 [H', W', 3]
    with the shorter side ``R`` (``'shorter_side'``); bilinear, antialiased. ``R = resize_size(size)``.
    """
    tf = import_tf()
    r = resize_size(size)
    if resize_mode == "both_sides":
        new = tf.constant([r, r])
    else:
        hw = tf.cast(tf.shape(img)[:2], tf.float32)
        new = tf.cast(tf.round(hw * r / tf.reduce_min(hw)), tf.int32)
        new = tf.maximum(new, r)
    return tf.image.resize(img, new, method="bilinear", antialias=True)


def tf_resize_crop_flip(img, size: int, resize_mode: str, seeds):
    """tf.data: uint8 [H, W, 3] -> float32 [S, S, 3] in [0, 255]: ``tf_resize``, random ``S x S``
    crop (seed ``seeds[0]``), flip (``seeds[1]``)."""
    tf = import_tf()
    x = tf.image.stateless_random_crop(tf_resize(img, size, resize_mode), [size, size, 3],
                                       seed=seeds[0])
    return tf.image.stateless_random_flip_left_right(x, seed=seeds[1])


# ----------------------------------------------------------------------------- imagenet_inception


def tf_inception_window(shape, seed):
    """tf.data: the Inception-style random crop window of an image of ``shape`` (int32 [3]):
    ``(begin, size)`` (int32 [3] each), at least 8% of the area, aspect ratio 3/4 to 4/3."""
    tf = import_tf()
    begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=100, use_image_if_no_bounding_boxes=True)
    return begin, box


def tf_decode_inception_crop(data, seed):
    """tf.data: encoded image -> uint8 [h, w, 3], the Inception-style crop window (seed ``seed``).

    A JPEG decodes only that window (``tf.image.decode_and_crop_jpeg``, as the flax ImageNet
    example does): the pixels of decoding the whole image and slicing it, except in the window's
    first or last column, where libjpeg's chroma upsampling lacks the neighbour outside the
    window. Other formats decode whole, then slice.
    """
    tf = import_tf()

    def jpeg():
        begin, box = tf_inception_window(tf.io.extract_jpeg_shape(data), seed)
        window = tf.stack([begin[0], begin[1], box[0], box[1]])
        return tf.image.decode_and_crop_jpeg(data, window, channels=3,
                                             dct_method="INTEGER_ACCURATE")

    def other():
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        begin, box = tf_inception_window(tf.shape(img), seed)
        return tf.slice(img, begin, box)

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def tf_inception_crop_flip(data, size: int, seeds):
    """tf.data: encoded image -> float32 [S, S, 3] in [0, 255]: Inception-style random-resized
    crop (seed ``seeds[0]``; only the window is decoded), resized to ``S x S``, flip
    (``seeds[1]``)."""
    tf = import_tf()
    x = tf.image.resize(tf_decode_inception_crop(data, seeds[0]), [size, size], method="bilinear",
                        antialias=True)
    return tf.image.stateless_random_flip_left_right(x, seed=seeds[1])


# ----------------------------------------------------------------------------- none / evaluation


def tf_central_crop(x, size: int):
    """tf.data: float32 [H, W, C] with H, W >= S -> its central float32 [S, S, C]."""
    tf = import_tf()
    hw = tf.shape(x)[:2]
    return tf.slice(x, tf.stack([(hw[0] - size) // 2, (hw[1] - size) // 2, 0]), [size, size, 3])


# ----------------------------------------------------------------------------- cutout


def cutout_mask(centre, hw, size: int):
    """JAX: float32 [b, H, W]: 0 inside the square [c - size//2, c - size//2 + size), else 1.

    ``centre``: int32 [b, 2] (row, column); ``hw``: (H, W).
    """
    lo = centre - size // 2
    ys = jnp.arange(hw[0])[None, :]
    xs = jnp.arange(hw[1])[None, :]
    in_y = (ys >= lo[:, :1]) & (ys < lo[:, :1] + size)
    in_x = (xs >= lo[:, 1:]) & (xs < lo[:, 1:] + size)
    return 1.0 - (in_y[:, :, None] & in_x[:, None, :]).astype(jnp.float32)


def apply_cutout(x, centre, size: int):
    """JAX: float32 [b, H, W, C] -> float32 [b, H, W, C], zero on each image's ``size x size``
    square around ``centre`` (int32 [b, 2]; see ``cutout_mask``)."""
    return x * cutout_mask(centre, x.shape[1:3], size)[..., None]


def tf_apply_cutout(x, image_size: int, size: int, seed):
    """tf.data: float32 [S, S, C] (``S = image_size``) -> float32 [S, S, C], zero on a
    ``size x size`` square whose centre is uniform in the image (seed: int64 [2])."""
    tf = import_tf()
    s = image_size
    c = tf.random.stateless_uniform([2], seed, minval=0, maxval=s, dtype=tf.int32)
    lo = c - size // 2
    ys, xs = tf.range(s)[:, None], tf.range(s)[None, :]
    inside = ((ys >= lo[0]) & (ys < lo[0] + size)
              & (xs >= lo[1]) & (xs < lo[1] + size))
    return x * (1.0 - tf.cast(inside, tf.float32))[:, :, None]


# ----------------------------------------------------------------------------- whole transforms: JAX


def augment_params(key, global_batch: int, hw: tuple[int, int], *, augment: str,
                   cutout: int) -> dict:
    """JAX: the random parameters of one global batch of ``B`` images of size ``hw`` (replicated;
    tiny): ``offset`` int32 [B, 2] and ``flip`` bool [B] for ``augment='cifar'``, ``centre`` int32
    [B, 2] for Cutout; none for what is off."""
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    params = {}
    if augment == "cifar":
        params["offset"] = jax.random.randint(k_crop, (global_batch, 2), 0, 2 * PAD + 1)
        params["flip"] = jax.random.bernoulli(k_flip, 0.5, (global_batch,))
    if cutout:
        params["centre"] = jnp.stack(
            [jax.random.randint(jax.random.fold_in(k_cut, i), (global_batch,), 0, hw[i])
             for i in range(2)], axis=1)
    return params


def transform(images, params, *, augment: str, cutout: int, mean, std):
    """JAX: uint8 [b, H, W, C] -> normalised float32 [b, H, W, C] with the given random
    parameters (``augment_params``, or this device's rows of them). ``augment``: ``'cifar'`` or
    ``'none'``; ``cutout``: square side, 0 = off."""
    if augment == "cifar":
        images = pad_crop_flip(images, params["offset"], params["flip"])
    x = normalise(images, mean, std)
    if cutout:
        x = apply_cutout(x, params["centre"], cutout)
    return x


# ----------------------------------------------------------------------------- whole transforms: tf.data


def tf_decode(data):
    """tf.data: encoded image (string scalar) -> uint8 [H, W, 3]; JPEG with the exact-DCT decoder
    (bit-identical to PIL), other formats with ``decode_image``."""
    tf = import_tf()
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )


def tf_check_size(img, hw: tuple[int, int]):
    """tf.data: ``img`` (uint8 [H, W, 3]) unchanged; an error when (H, W) is not ``hw``."""
    tf = import_tf()
    h, w = hw
    ok = tf.debugging.assert_equal(
        tf.shape(img)[:2], tf.constant([h, w]),
        message=f"an image is not {h}x{w} (mixed sizes; the 'cifar'/'none' augmentations "
                "need one size)")
    with tf.control_dependencies([ok]):
        return tf.identity(img)


def tf_eval_transform(data, *, size: int, resize_mode: str, mean, std, fixed_hw):
    """tf.data: encoded image -> normalised float32 [S, S, 3] for evaluation (and
    ``augment='none'``): the image itself when the data set's fixed size ``fixed_hw`` is
    ``S x S`` (checked), else ``tf_resize`` and the central crop."""
    tf = import_tf()
    img = tf_decode(data)
    if fixed_hw == (size, size):
        x = tf.cast(tf_check_size(img, fixed_hw), tf.float32)
    else:
        x = tf_central_crop(tf_resize(img, size, resize_mode), size)
    return tf_normalise(x, mean, std)


def tf_train_transform(data, seed, *, augment: str, size: int, resize_mode: str, cutout: int,
                       mean, std, fixed_hw):
    """tf.data: encoded image, per-example seed (int64 [2]) -> augmented, normalised float32
    [S, S, 3] for training. ``fixed_hw``: the data set's fixed (H, W), or None."""
    tf = import_tf()
    seeds = tf.random.experimental.stateless_split(seed, 4)
    if augment == "none":
        return tf_eval_transform(data, size=size, resize_mode=resize_mode, mean=mean, std=std,
                                 fixed_hw=fixed_hw)
    if augment == "imagenet_inception":
        x = tf_inception_crop_flip(data, size, seeds)  # decodes the crop window only
    elif augment == "cifar":
        x = tf_pad_crop_flip(tf_check_size(tf_decode(data), fixed_hw), size, seeds)
    else:  # imagenet_simple
        x = tf_resize_crop_flip(tf_decode(data), size, resize_mode, seeds)
    x = tf_normalise(x, mean, std)
    if cutout:
        x = tf_apply_cutout(x, size, cutout, seeds[2])
    return x


# ----------------------------------------------------------------------------- NumPy (grain)
#
# The grain loader (``grain_loader.py``) transforms one decoded example at a time in NumPy and PIL,
# in its worker processes. ``rng`` is a ``numpy.random.Generator`` seeded per example from
# (seed, epoch, position in the epoch), so the result does not depend on the number of workers.
# Same transformations as above; resizing is PIL's bilinear (antialiased, as tf.image.resize with
# antialias=True, to rounding: PIL resizes uint8), the Inception-style window is drawn as
# torchvision's RandomResizedCrop draws it (10 attempts, else the central crop of allowed ratio).


def np_normalise(img, mean, std):
    """NumPy: uint8 or float [H, W, C] in [0, 255] -> float32, ``(x / 255 - mean) / std``."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    bias = (-mean / std).astype(np.float32)
    return np.asarray(img, np.float32) * scale + bias


def np_pad_crop_flip(img, rng):
    """NumPy: uint8 [H, W, C] -> uint8 [H, W, C]: zero-pad ``PAD``, random crop, random flip."""
    h, w, _ = img.shape
    padded = np.pad(img, ((PAD, PAD), (PAD, PAD), (0, 0)))
    dy, dx = rng.integers(0, 2 * PAD + 1, 2)
    out = padded[dy:dy + h, dx:dx + w]
    return out[:, ::-1] if rng.random() < 0.5 else out


def np_resize(img, size: int, resize_mode: str):
    """NumPy/PIL: uint8 [H, W, 3] -> uint8 [R, R, 3] (``'both_sides'``) or the shorter side
    ``R`` (``'shorter_side'``); bilinear, antialiased. ``R = resize_size(size)``."""
    from PIL import Image

    r = resize_size(size)
    h, w = img.shape[:2]
    if resize_mode == "both_sides":
        new_hw = (r, r)
    else:
        new_hw = (max(r, round(h * r / min(h, w))), max(r, round(w * r / min(h, w))))
    if (h, w) == new_hw:
        return img
    return np.asarray(Image.fromarray(img).resize((new_hw[1], new_hw[0]),
                                                  Image.Resampling.BILINEAR))


def np_central_crop(img, size: int):
    """NumPy: [H, W, C] with H, W >= S -> its central [S, S, C]."""
    h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return img[y:y + size, x:x + size]


def np_resize_crop_flip(img, size: int, resize_mode: str, rng):
    """NumPy: uint8 [H, W, 3] -> uint8 [S, S, 3]: ``np_resize``, random ``S x S`` crop, flip."""
    x = np_resize(img, size, resize_mode)
    h, w = x.shape[:2]
    dy, dx = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    x = x[dy:dy + size, dx:dx + size]
    return x[:, ::-1] if rng.random() < 0.5 else x


def np_inception_window(h: int, w: int, rng) -> tuple[int, int, int, int]:
    """The Inception-style crop window ``(y, x, height, width)`` of an ``h x w`` image: area 8%
    to 100%, aspect ratio 3/4 to 4/3 (log-uniform), 10 attempts, else a central crop."""
    area = h * w
    log_ratio = np.log([3 / 4, 4 / 3])
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif ratio > 4 / 3:
        ch, cw = h, int(round(h * 4 / 3))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def np_inception_crop_flip(img, size: int, rng):
    """NumPy/PIL: uint8 [H, W, 3] -> uint8 [S, S, 3]: Inception-style random-resized crop
    (``np_inception_window``), resized to ``S x S`` (bilinear, antialiased), flip."""
    from PIL import Image

    y, x, ch, cw = np_inception_window(img.shape[0], img.shape[1], rng)
    out = np.asarray(Image.fromarray(np.ascontiguousarray(img[y:y + ch, x:x + cw])).resize(
        (size, size), Image.Resampling.BILINEAR))
    return out[:, ::-1] if rng.random() < 0.5 else out


def np_apply_cutout(x, size: int, rng):
    """NumPy: float32 [S, S, C] -> float32 [S, S, C], zero on a ``size x size`` square whose
    centre is uniform in the image, clipped at the border."""
    s0, s1 = x.shape[:2]
    cy, cx = int(rng.integers(0, s0)), int(rng.integers(0, s1))
    x = x.copy()
    x[max(cy - size // 2, 0):max(cy - size // 2 + size, 0),
      max(cx - size // 2, 0):max(cx - size // 2 + size, 0)] = 0
    return x


def np_eval_transform(img, *, size: int, resize_mode: str, mean, std):
    """NumPy: decoded uint8 [H, W, 3] -> normalised float32 [S, S, 3] for evaluation (and
    ``augment='none'``): the image itself when it is ``S x S``, else ``np_resize`` and the central
    crop (as ``tf_eval_transform``)."""
    if img.shape[:2] != (size, size):
        img = np_central_crop(np_resize(img, size, resize_mode), size)
    return np_normalise(img, mean, std)


def np_train_transform(img, rng, *, augment: str, size: int, resize_mode: str, cutout: int,
                       mean, std):
    """NumPy: decoded uint8 [H, W, 3], ``numpy.random.Generator`` -> augmented, normalised
    float32 [S, S, 3] (``augment='cifar'`` needs ``S x S`` images; the caller checks)."""
    if augment == "none":
        return np_eval_transform(img, size=size, resize_mode=resize_mode, mean=mean, std=std)
    if augment == "cifar":
        img = np_pad_crop_flip(img, rng)
    elif augment == "imagenet_simple":
        img = np_resize_crop_flip(img, size, resize_mode, rng)
    elif augment == "imagenet_inception":
        img = np_inception_crop_flip(img, size, rng)
    else:
        raise ValueError(f"unknown augment {augment!r}")
    x = np_normalise(img, mean, std)
    if cutout:
        x = np_apply_cutout(x, cutout, rng)
    return x
