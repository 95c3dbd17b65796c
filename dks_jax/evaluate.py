"""Evaluation without training: ``python -m dks_jax.evaluate --workdir=DIR [--from=latest]``.

Evaluates a run's latest checkpoint (``--from=latest``, default), its best one (``--from=best``,
the highest main-head top-1 seen in training) or its export (``--from=export``: the main path
alone) on the run's evaluation split, or on another data set or split given as overrides of the
run's config, e.g. a shifted or relabelled test set in an image folder::

    python -m dks_jax.evaluate --workdir=runs/r32 --from=best
    python -m dks_jax.evaluate --workdir=runs/r32 --config.dataset=/data/cifar10-shifted \\
        --config.eval_split=test

Every head (C1 is the main classifier, C2... the branches), the ensemble of the heads' softmaxes,
top-1 and top-5 in %, exactly as training evaluates (``evaluator.Evaluator``: the same masked sums).
The results are printed as a Markdown table and written to ``<workdir>/eval/<name>.json`` and
``.md`` (``--out``: another folder). Only the evaluation split is read: the training split of an
image folder need not exist. Images are normalised with the training data's statistics
(``<workdir>/data.json``), and the classes must be the training ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

from dks_jax import xla_flags

if __name__ == "__main__":  # the command line: the CPU defaults of dks_jax.main, before JAX starts
    xla_flags.apply_cpu_defaults()

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dks_jax import (  # noqa: E402
    checkpointing,
    cli,
    config_base,
    data,
    errors,
    evaluator,
    export,
    parallel,
    paths,
)
from dks_jax import state as state_lib  # noqa: E402

SOURCES = ("latest", "best", "export")


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's config made to read its evaluation split only: the training split is the
    evaluation split (an image folder need not have another), with no subset and no label noise
    (neither touches the evaluation split)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train_split = config.eval_split
        config.train_examples = 0
        config.label_noise = 0.0
    return config


def training_data(workdir) -> dict:
    """The run's training data as ``Dataset.describe()`` gives it (``<workdir>/data.json``); for a
    run written before that file existed, built again from its config (the data must be there)."""
    path = paths.as_path(workdir) / data.DATA_FILE
    if path.exists():
        return json.loads(path.read_text())
    config = config_base.from_run(workdir)
    source = data.resolve_source(str(config.dataset), config.data_dir or None,
                                 str(config.train_split), str(config.eval_split),
                                 download=bool(config.download))
    return {"class_names": list(source.class_names), "mean": list(source.mean),
            "std": list(source.std)}


def load_model(workdir, config, num_classes: int, source: str, mesh):
    """``(graphdef, state, step)`` of a run's checkpoint (``latest``/``best``) or export, the state
    (``params``, ``batch_stats``) replicated over ``mesh``."""
    workdir = paths.as_path(workdir)
    if source == "export":
        folder = workdir / "export"
        model, meta = export.load_exported_model(folder)
        graphdef, *parts = nnx.split(model, nnx.Param, nnx.BatchStat)
        state = {"params": parts[0].to_pure_dict(), "batch_stats": parts[1].to_pure_dict()}
        return graphdef, parallel.replicate(state, mesh), meta.get("step")
    if config.num_seeds > 1:
        raise errors.ConfigError(
            f"{workdir} trained {config.num_seeds} seeds in one program; its checkpoints hold "
            f"them all. Evaluate one seed's export in a notebook: "
            f"dks_jax.load('{workdir}/export/seed<k>').")
    graphdef, shapes = state_lib.abstract(config, num_classes)
    sharding = parallel.replicated(mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes)
    ckpts = checkpointing.Checkpoints(workdir, async_save=False)
    try:
        step = ckpts.best_step() if source == "best" else ckpts.latest_step()
        if step is None:
            raise checkpointing.CheckpointError(
                f"No {'best ' if source == 'best' else ''}checkpoint in {ckpts.directory}"
                + (" (a best checkpoint is kept when the run evaluates)." if source == "best"
                   else "."))
        restored = ckpts.restore(target, step=step)
    finally:
        ckpts.close()
    assert restored is not None
    step, state = restored
    return graphdef, {"params": state["params"], "batch_stats": state["batch_stats"]}, step


@dataclasses.dataclass
class LoadedRun:
    """A run's model and its evaluation data, as :func:`load_run` gives them.

    config: the evaluation config (:func:`eval_config` of the run's, with the overrides given).
    dataset: the evaluation data (``dataset.eval_iterator(batch_size)``), normalised with the
      training data's statistics.
    graphdef, state: the model (``state``: ``params`` and ``batch_stats``, replicated over the
      mesh); ``nnx.merge(graphdef, state["params"], state["batch_stats"])`` builds it.
    step: the checkpoint's (or the export's) step; source: ``latest``, ``best`` or ``export``;
    batch_size: the evaluation batch.
    """

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    graphdef: nnx.GraphDef
    state: dict
    step: int | None
    source: str
    batch_size: int

    def model(self) -> Any:
        """The model (a registry ``models.Network``) with the run's parameters and BatchNorm
        statistics."""
        return nnx.merge(self.graphdef, self.state["params"], self.state["batch_stats"])


def load_run(workdir, config: ml_collections.ConfigDict | None = None, *,
             source: str = "latest", batch_size: int = 0, mesh=None) -> LoadedRun:
    """A run's checkpoint (``latest``/``best``) or export and its evaluation data
    (:class:`LoadedRun`): what :func:`evaluate` and ``dks_jax.tools.anytime`` start from.

    ``config``: the run's config (default: its ``config.json``), possibly changed to evaluate on
    another data set or split. ``mesh``: default all devices.
    """
    if source not in SOURCES:
        raise errors.ConfigError(f"--from={source!r}; valid: {', '.join(SOURCES)}.")
    trained = training_data(workdir)
    config = eval_config(config if config is not None else config_base.from_run(workdir))
    mesh = mesh or parallel.create_mesh()
    batch = batch_size or config.eval_batch_size or config.batch_size
    parallel.check_batch_size(batch, mesh, name="batch_size")
    dataset = data.create(config, mesh, stats=(trained["mean"], trained["std"]))
    if list(dataset.class_names) != list(trained["class_names"]):
        raise errors.ConfigError(
            f"{config.dataset} has the classes {list(dataset.class_names)[:10]}..., the run was "
            f"trained on {list(trained['class_names'])[:10]}...: a class index would mean another "
            "class. Give a data set with the training classes (folder names).")
    num_classes = config.num_classes or dataset.num_classes
    graphdef, state, step = load_model(workdir, config, num_classes, source, mesh)
    return LoadedRun(config=config, dataset=dataset, graphdef=graphdef, state=state, step=step,
                     source=source, batch_size=batch)


def evaluate(workdir, config: ml_collections.ConfigDict | None = None, *, source: str = "latest",
             batch_size: int = 0, mesh=None) -> dict:
    """Top-1/top-5 (%) of every head and the ensemble of a run (``evaluator.Evaluator``'s keys:
    ``eval_top1/C1``, ..., ``eval_count``), plus ``step``, ``source`` and ``dataset``.

    ``config``: the run's config (default: its ``config.json``), possibly changed to evaluate on
    another data set or split.
    """
    run = load_run(workdir, config, source=source, batch_size=batch_size, mesh=mesh)
    heads = run.model().num_heads
    result = evaluator.Evaluator(run.graphdef, run.dataset, run.batch_size,
                                 grad_consistency=heads > 1)(run.state)
    result.update(step=run.step, source=source, dataset=str(run.config.dataset),
                  split=str(run.config.eval_split))
    return result


def to_markdown(result: dict, title: str = "") -> str:
    """A table: one row per head (C1 first, the ensemble last), top-1 and top-5 in %."""
    heads = sorted({k.split("/", 1)[1] for k in result if k.startswith("eval_top1/")},
                   key=lambda h: (h == "ensemble", len(h), h))
    lines = [f"## {title}", ""] if title else []
    lines += [f"{result['source']} (step {result.get('step', '?')}) on {result['dataset']}, "
              f"split {result['split']}, {result['eval_count']} images.", "",
              "| head | top-1 % | top-5 % |", "|---|---|---|"]
    lines += [f"| {h} | {result[f'eval_top1/{h}']:.2f} | {result[f'eval_top5/{h}']:.2f} |"
              for h in heads]
    return "\n".join(lines) + "\n"


def _name(result: dict) -> str:
    dataset = paths.as_path(result["dataset"]).name.split(".")[0] or "data"
    return f"{result['source']}-step{result.get('step', 'x')}-{dataset}-{result['split']}"


def write(result: dict, out_dir) -> tuple:
    """``<out_dir>/<source>-step<k>-<data set>-<split>.json`` and ``.md``; returns both paths."""
    out_dir = paths.as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _name(result)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=True))
    md_path.write_text(to_markdown(result, title=name))
    return json_path, md_path


def main(argv: Sequence[str]) -> int:
    """``argv`` without the program name; ``--config.<field>=<value>`` change the run's config."""
    overrides = [a for a in argv if a.startswith("--config.")]
    own = [a for a in argv if a not in overrides]

    def define(fv):
        flags.DEFINE_string("workdir", None, "the run folder", flag_values=fv, required=True)
        flags.DEFINE_enum("from", "latest", list(SOURCES), "what to evaluate", flag_values=fv)
        flags.DEFINE_integer("batch_size", 0, "0: the run's eval_batch_size (or batch_size)",
                             flag_values=fv)
        flags.DEFINE_string("out", "", "folder for the JSON and Markdown (default <workdir>/eval)",
                            flag_values=fv)

    fv, _ = cli.parse(define, own, "python -m dks_jax.evaluate", __doc__)
    logging.getLogger().setLevel(logging.INFO)
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = config_base.override(config_base.from_run(fv.workdir), overrides)
    result = evaluate(fv.workdir, config, source=str(fv["from"].value), batch_size=fv.batch_size)
    if jax.process_index() == 0:
        json_path, md_path = write(result, fv.out or paths.as_path(fv.workdir) / "eval")
        print(to_markdown(result), flush=True)
        print(f"Wrote {json_path} and {md_path}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
