"""The inference export of a run: the main path's parameters and BatchNorm statistics, and metadata.

``<workdir>/export/`` (one per seed under ``export/seed<k>/`` for vmapped seeds) holds what a
notebook, a KD teacher or a deployment needs: no optimizer state and no auxiliary branch (for a
branch trained alone, that branch's network). Its ``model.json`` records the model, the class
names, the training model's head names, the step, and the preprocessing of evaluation (image size,
resize rule, per-channel mean and std).

:func:`load_exported_model` gives the model back; :func:`load` (also ``dks_jax.load``) a
:class:`Predictor` that applies the recorded preprocessing::

    predictor = dks_jax.load("runs/r32/export")
    probabilities = predictor(uint8_images)          # [N, H, W, 3] -> float32 [N, K]
    predictor.class_names[int(probabilities[0].argmax())]
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dks_jax import attach, checkpointing, errors, models, paths
from dks_jax.data.augment import resize_size


def export(graphdef: nnx.GraphDef, state: dict, directory, config, dataset) -> None:
    """Writes the main path's parameters and BN statistics (``models.export_state``) and metadata:
    the model, the classes of ``dataset`` (a ``data.Dataset``), the heads, the step and the
    evaluation preprocessing."""
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"],
                           "step": state["step"]})
    model = nnx.merge(graphdef, host["params"], host["batch_stats"])
    main = models.export_state(model).to_pure_dict()
    num_classes = config.num_classes or dataset.num_classes
    meta = {"model": config.model, "num_classes": num_classes, "dataset": config.dataset,
            "image_size": config.image_size, "method": config.method,
            "step": int(np.ravel(host["step"])[0]),
            "class_names": list(dataset.class_names), "heads": list(model.head_names),
            "preprocess": {"image_size": int(dataset.image_shape[0]),
                           "resize_mode": config.resize_mode,
                           "resize_size": resize_size(int(dataset.image_shape[0])),
                           "mean": list(dataset.source.mean), "std": list(dataset.source.std)}}
    if config.branch_alone:  # the exported network is that branch's (DKS Table 5)
        meta.update(aux=config.aux, alone=config.branch_alone)
    checkpointing.save_export(directory, main, meta)


def load_exported_model(directory, *, dtype=jnp.float32) -> tuple[nnx.Module, dict]:
    """``(model, meta)``: an ``aux="none"`` model (or, for a branch trained alone, that network)
    holding an export's parameters: for inference and as a KD teacher."""
    directory = paths.as_path(directory)
    meta_path = directory / checkpointing.EXPORT_META
    if not meta_path.exists():
        raise checkpointing.CheckpointError(
            f"{directory} holds no export of dks_jax ({checkpointing.EXPORT_META} missing): point "
            "to the export/ folder of a finished run."
        )
    meta = json.loads(meta_path.read_text())
    if attach.is_factory(meta["model"]):  # the factory's model, without branches
        model: nnx.Module = attach.create(meta["model"], meta["num_classes"], taps={},
                                          rngs=nnx.Rngs(0), image_size=meta["image_size"],
                                          dtype=dtype)
    else:
        shape = {"aux": meta["aux"], "alone": meta["alone"]} if meta.get("alone") else {
            "aux": "none"}
        model = models.create(meta["model"], meta["num_classes"], rngs=nnx.Rngs(0), dtype=dtype,
                              **shape)
    graphdef, tstate = nnx.split(model)
    target = jax.tree.map(np.asarray, tstate.to_pure_dict())
    _, pure = checkpointing.load_export(directory, target=target)
    return nnx.merge(graphdef, pure), meta


class Predictor:
    """An exported model with its preprocessing: uint8 images in, class probabilities out.

    ``predictor(images)``: ``images`` uint8 ``[N, H, W, 3]`` (or a list of ``[H, W, 3]`` arrays of
    different sizes) -> float32 ``[N, K]``, the softmax of the main head. Preprocessing as in
    evaluation: images of the model's size ``S x S`` are only normalised; others are resized
    (bilinear, antialiased: the shorter side to ``R``, or both sides, as the run's
    ``resize_mode``), centre-cropped to ``S x S`` and normalised with the training images'
    per-channel mean and std.
    """

    def __init__(self, model: nnx.Module, meta: dict):
        if "preprocess" not in meta:
            raise errors.ConfigError(
                "This export records no preprocessing (written by an older version): use "
                "load_exported_model and normalise the images as its training did.")
        self.model, self.meta = model, meta
        self.class_names = tuple(meta.get("class_names") or range(meta["num_classes"]))
        p = meta["preprocess"]
        self.image_size, self.resize_size = int(p["image_size"]), int(p["resize_size"])
        self.resize_mode = p["resize_mode"]
        self._scale = (1.0 / (255.0 * np.asarray(p["std"], np.float32))).astype(np.float32)
        self._bias = (-np.asarray(p["mean"], np.float32) / np.asarray(p["std"], np.float32))
        graphdef, weights = nnx.split(model)

        def probabilities(weights, x):
            return jax.nn.softmax(nnx.merge(graphdef, weights)(x, train=False)[0].astype(
                jnp.float32), axis=-1)

        self._weights, self._probabilities = weights, jax.jit(probabilities)

    def preprocess(self, images) -> jax.Array:
        """uint8 ``[N, H, W, 3]`` (or a list of ``[H, W, 3]``) -> float32 ``[N, S, S, 3]``."""
        if isinstance(images, (list, tuple)):
            return jnp.concatenate([self.preprocess(np.asarray(x)[None]) for x in images])
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"predict wants uint8 images [N, H, W, 3], got {images.dtype} "
                             f"{images.shape}")
        x = jnp.asarray(images, jnp.float32)
        s, (h, w) = self.image_size, images.shape[1:3]
        if (h, w) != (s, s):
            r = self.resize_size
            new = (r, r) if self.resize_mode == "both_sides" else (
                max(r, round(h * r / min(h, w))), max(r, round(w * r / min(h, w))))
            x = jax.image.resize(x, (x.shape[0], *new, 3), "linear", antialias=True)
            top, left = (new[0] - s) // 2, (new[1] - s) // 2
            x = x[:, top:top + s, left:left + s]
        return x * self._scale + self._bias

    def __call__(self, images) -> jax.Array:
        return self._probabilities(self._weights, self.preprocess(images))

    predict = __call__


def load(directory) -> Predictor:
    """A :class:`Predictor` of the export in ``directory`` (a run folder or its ``export/``)."""
    directory = paths.as_path(directory)
    if (directory / "export" / checkpointing.EXPORT_META).exists():
        directory = directory / "export"
    return Predictor(*load_exported_model(directory))
