"""The inference export of a run: the main path's parameters and BatchNorm statistics, and metadata.

``<workdir>/export/`` (one per seed under ``export/seed<k>/`` for vmapped seeds) holds what a
notebook, a KD teacher or a deployment needs: no optimizer state and no auxiliary branch (for a
branch trained alone, that branch's network). :func:`load_exported_model` gives the model back.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dks_jax import checkpointing, models, paths


def export(graphdef: nnx.GraphDef, state: dict, directory, config, num_classes: int) -> None:
    """Writes the main path's parameters and BN statistics (``models.export_state``) and metadata."""
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    model = nnx.merge(graphdef, host["params"], host["batch_stats"])
    main = models.export_state(model).to_pure_dict()
    meta = {"model": config.model, "num_classes": num_classes, "dataset": config.dataset,
            "image_size": config.image_size, "method": config.method}
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
    shape = {"aux": meta["aux"], "alone": meta["alone"]} if meta.get("alone") else {"aux": "none"}
    model = models.create(meta["model"], meta["num_classes"], rngs=nnx.Rngs(0), dtype=dtype,
                          **shape)
    graphdef, tstate = nnx.split(model)
    target = jax.tree.map(np.asarray, tstate.to_pure_dict())
    _, pure = checkpointing.load_export(directory, target=target)
    return nnx.merge(graphdef, pure), meta
