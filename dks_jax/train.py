"""``train_and_evaluate(config, workdir)``: wires data, model, objective, optimizer, checkpoints, metrics.

The train state is an explicit pytree of plain arrays::

    {"step": int32[], "params": {...}, "batch_stats": {...}, "opt_state": ..., "best_top1": float32[]}

``nnx.split`` runs once before the loop; the jitted step merges the model from the state, so it is a
pure function ``(state, batch) -> (state, metrics)`` that donates, shards and checkpoints like any
pytree. The state is replicated over the mesh, batches are split over its ``'data'`` axis.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dks_jax import (
    analysis,
    checkpointing,
    config_base,
    data,
    errors,
    losses,
    metrics,
    models,
    optim,
    parallel,
    paths,
    seeds,
)

# A workdir holds one experiment. These config fields may change when a run is resumed (cadence,
# length, paths, verbosity; each change is logged); a change of any other field (method, loss.*,
# seed, data, noise, augmentation, optimizer, schedule, batch size, model, dtype, ...) would blend
# two experiments, so the run stops and names the fields.
RESUMABLE_FIELDS = frozenset({
    "log_every_steps", "eval_every_epochs", "eval_batch_size", "checkpoint_every_epochs", "max_to_keep",
    "async_checkpointing", "profile_steps", "log_grad_consistency", "num_epochs", "data_dir",
    "download", "start_over", "loss.teacher_checkpoint",
})
# After a run stopped on a non-finite loss (``NONFINITE_FILE`` in its workdir), its next resume may
# also change these, to continue from the last good checkpoint with a gentler optimisation.
RESCUE_FIELDS = frozenset({
    "learning_rate", "lr_schedule", "lr_boundaries", "lr_decay_factor", "warmup_epochs",
    "weight_decay", "momentum", "nesterov",
})
NONFINITE_FILE = checkpointing.NONFINITE_FILE
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingDiverged(errors.UserError, FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


# ---- set-up -------------------------------------------------------------------------------------


def validate_config(config) -> None:
    """Fails fast, listing the valid values, on an unknown model, method, dtype or schedule."""
    if config.model not in models.names():
        raise errors.ConfigError(
            f"Unknown config.model={config.model!r}; valid: {', '.join(models.names())}.")
    if config.method not in config_base.METHODS:
        raise errors.ConfigError(
            f"Unknown config.method={config.method!r}; valid: {', '.join(config_base.METHODS)}."
        )
    if config.dtype not in DTYPES:
        raise errors.ConfigError(f"Unknown config.dtype={config.dtype!r}; valid: {', '.join(DTYPES)}.")
    if config.lr_schedule not in optim.SCHEDULES:
        raise errors.ConfigError(
            f"Unknown config.lr_schedule={config.lr_schedule!r}; valid: {', '.join(optim.SCHEDULES)}."
        )
    if config.method == "kd" and not config.loss.teacher_checkpoint:
        raise errors.ConfigError("config.method='kd' needs --config.loss.teacher_checkpoint=<export folder>.")
    if config.num_seeds < 0:
        raise errors.ConfigError("config.num_seeds must be >= 0 (0 or 1: one run).")
    for field, valid in (("dsn_norm", ("inside", "weight_decay")), ("dsn_schedule", ("linear", "step")),
                         ("divergence", ("ce", "kl"))):
        if config.loss[field] not in valid:
            raise errors.ConfigError(
                f"Unknown config.loss.{field}={config.loss[field]!r}; valid: {', '.join(valid)}.")
    if config.branch_alone and config.method not in ("baseline", "kd"):
        raise errors.ConfigError(
            f"config.branch_alone={config.branch_alone!r} trains one branch as a single-head network: "
            f"use method 'baseline' (or 'kd'), not {config.method!r}.")
    for field in ("num_epochs", "batch_size", "learning_rate"):
        value = config[field]
        if not (math.isfinite(value) and value > 0):
            raise errors.ConfigError(f"config.{field}={value!r} must be a positive number.")


def check_workdir_writable(workdir) -> None:
    """A workdir that cannot be created or written is a ConfigError now, not after data loading."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise errors.ConfigError(
            f"--workdir={workdir} cannot be written ({type(e).__name__}: {e}); choose a folder "
            "you can write to."
        ) from e


def create_model(config, num_classes: int, *, aux: str | None = None, seed: int | None = None):
    """The config's model; ``aux`` overrides ``config.aux`` (and then no branch is trained alone),
    ``seed`` ``config.seed``."""
    kwargs = {}
    if config.dropout:
        kwargs["dropout"] = config.dropout
    if config.zero_init_residual:
        kwargs["zero_init_residual"] = True
    return models.create(
        config.model,
        num_classes,
        aux=config.aux if aux is None else aux,
        rngs=nnx.Rngs(config.seed if seed is None else seed),
        feature_adapters=config.method == "byot" and (config.aux if aux is None else aux) != "none",
        alone=config.branch_alone if aux is None else "",
        dtype=DTYPES[config.dtype],
        branches=config.branches or None,
        bn_group_size=config.bn_group_size or None,
        **kwargs,
    )


def objective_spec(config, num_heads: int, steps_per_epoch: int, total_steps: int):
    loss = config.loss
    return losses.ObjectiveSpec(
        method=config.method,
        num_heads=num_heads,
        alpha=loss.alpha,
        beta=loss.beta,
        pairs=loss.pairs,
        temperature=loss.temperature,
        divergence=loss.divergence,
        label_smoothing=loss.label_smoothing,
        gamma=loss.gamma,
        dsn_companion=loss.dsn_companion,
        dsn_zero_fraction=loss.dsn_zero_fraction,
        dsn_schedule=loss.dsn_schedule,
        dsn_norm=loss.dsn_norm,
        byot_alpha=loss.byot_alpha,
        byot_lambda=loss.byot_lambda,
        mimic_prob=loss.mimic_prob,
        kd_weight=loss.kd_weight,
        kd_heads=tuple(loss.kd_heads),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def _pure(state) -> dict:
    return state.to_pure_dict()


def initial_state(model, tx) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, state)`` of a freshly initialised model and optimizer."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = _pure(params), _pure(batch_stats)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "best_top1": jnp.full((), -1.0, jnp.float32),
    }
    return graphdef, state


def load_teacher(config, num_classes: int):
    """The KD teacher: ``(graphdef, state)`` from an export written by this code, read-only."""
    path = paths.as_path(config.loss.teacher_checkpoint)
    if (path / "export").exists():
        path = path / "export"
    teacher, meta = load_exported_model(path, dtype=DTYPES[config.dtype])
    if config.loss.teacher_model and config.loss.teacher_model != meta["model"]:
        raise errors.ConfigError(
            f"config.loss.teacher_model={config.loss.teacher_model!r} but the export at {path} "
            f"holds {meta['model']!r}."
        )
    if meta["num_classes"] != num_classes:
        raise errors.ConfigError(
            f"The teacher at {path} has {meta['num_classes']} classes, the data set {num_classes}."
        )
    graphdef, state = nnx.split(teacher)
    return graphdef, _pure(state)


# ---- the step -----------------------------------------------------------------------------------


def make_train_step(graphdef, tx, schedule, spec, seed: int, teacher_graphdef=None):
    """The pure training step ``(state, batch[, teacher_state]) -> (state, metrics)``."""
    base_key = jax.random.key(seed)
    dropout_base = jax.random.fold_in(base_key, 1)
    objective_key = jax.random.fold_in(base_key, 2)  # constant: objective folds in the epoch

    def step_fn(state, batch, teacher_state=None):
        step = state["step"]
        images, labels = batch["image"], batch["label"]
        teacher_logits = None
        if teacher_graphdef is not None:
            teacher = nnx.merge(teacher_graphdef, teacher_state)
            teacher_logits = jax.lax.stop_gradient(teacher(images, train=False)[0])

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["batch_stats"])
            rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_base, step))
            extra = {}
            if spec.method == "byot":
                logits, extra["features"] = model(images, train=True, rngs=rngs,
                                                  return_features=True)
            else:
                logits = model(images, train=True, rngs=rngs)
            if spec.method == "dsn" and spec.dsn_norm == "inside":  # DSN Eq. 3: ||w||^2 inside
                extra["classifier_sq_norms"] = tuple(
                    jnp.sum(jnp.square(b.fc.kernel.get_value())) for b in model.branches)
            loss, terms = losses.objective(
                logits, labels, spec=spec, step=step, rng=objective_key,
                teacher_logits=teacher_logits, **extra,
            )
            return loss, (terms, logits, _pure(nnx.state(model, nnx.BatchStat)))

        (loss, (terms, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(state, step=step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
        out = {"loss": loss, "lr": schedule(step), "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}
        out.update({f"loss/{k}": v for k, v in terms.items()})
        for i, z in enumerate(logits):
            out[f"train_top1/{head_name(i)}"] = jnp.mean(jnp.argmax(z, -1) == labels)
        return new_state, out

    return step_fn


def head_name(i: int) -> str:
    """Head ``i`` in the DKS paper's names: C1 is the main classifier, C2... the auxiliaries."""
    return f"C{i + 1}"


def make_eval_step(graphdef):
    """Sums over a masked batch: correct top-1/top-5 of every head and of the ensemble, and count."""

    def eval_fn(state, batch):
        model = nnx.merge(graphdef, state["params"], state["batch_stats"])
        logits = model(batch["image"], train=False)
        labels, mask = batch["label"], batch["mask"]
        heads = {head_name(i): z for i, z in enumerate(logits)}
        if len(logits) > 1:
            heads["ensemble"] = jnp.log(jnp.mean(jnp.stack([jax.nn.softmax(z) for z in logits]), 0))
        sums = {"count": jnp.sum(mask)}
        for name, z in heads.items():
            top5 = jax.lax.top_k(z, min(5, z.shape[-1]))[1]
            sums[f"top1/{name}"] = jnp.sum((top5[:, 0] == labels) & mask)
            sums[f"top5/{name}"] = jnp.sum(jnp.any(top5 == labels[:, None], -1) & mask)
        return sums

    return eval_fn


# ---- the loop -----------------------------------------------------------------------------------


class _Preemption:
    """SIGTERM (a preemption notice on most clusters) sets a flag; the loop saves and exits.

    Single process only: with several processes JAX's own handler must see the signal, so that
    every process reaches the same preemption sync point (``Checkpoints.reached_preemption``).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("Received signal %d: saving a checkpoint and exiting.", signum)
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Pending:
    """Metrics of the steps since the last log, still on the devices (no host sync per step)."""

    first_step: int
    items: list = dataclasses.field(default_factory=list)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def experiment_changes(saved: dict, config, extra_allowed=frozenset()) -> tuple[dict, dict]:
    """``(other_experiment, allowed)``: the fields whose values differ, ``{field: (saved, now)}``,
    split by :data:`RESUMABLE_FIELDS` plus ``extra_allowed`` (after a divergence:
    :data:`RESCUE_FIELDS`). A field the saved config lacks (an older version wrote it) counts as
    allowed."""
    old, new = _flat(saved), _flat(_jsonable(config))
    diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)}
    allowed = {k: v for k, v in diff.items()
               if k in RESUMABLE_FIELDS or k in extra_allowed or k not in old}
    return {k: v for k, v in diff.items() if k not in allowed}, allowed


def _check_workdir(config, workdir, ckpts: checkpointing.Checkpoints) -> checkpointing.Checkpoints:
    """Refuses a workdir holding another experiment unless ``start_over`` (then moves it aside)."""
    saved = workdir / "config.json"
    has_run = bool(ckpts.all_steps()) or (workdir / metrics.METRICS_FILE).exists()
    diverged = workdir / NONFINITE_FILE
    rescue = RESCUE_FIELDS if diverged.exists() and not config.start_over else frozenset()
    if has_run and saved.exists():
        other, allowed = experiment_changes(json.loads(saved.read_text()), config, rescue)
        if other and not config.start_over:
            changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in other.items())
            raise checkpointing.CheckpointError(
                f"{workdir} holds a different experiment ({changes}). Use another --workdir, or "
                "set --config.start_over=True to move the old run aside (kept under "
                "previous-N/) and start anew."
            )
        if not other:
            for k, (a, b) in allowed.items():
                logging.warning("Resuming %s with %s changed: %r -> %r", workdir, k, a, b)
    checkpointing.barrier("rescue_checked")  # every process has read the allowance
    if rescue and jax.process_index() == 0:
        # This resume uses the rescue allowance once; the record stays, renamed.
        record = json.loads(diverged.read_text())
        logging.warning("%s stopped on a non-finite loss at step %s before; resuming from its last "
                        "good checkpoint.", workdir, record.get("step"))
        diverged.rename(workdir / f"nonfinite-{record.get('step', 'x')}.json")
    if config.start_over and has_run:
        ckpts.close()
        moved = checkpointing.move_aside(workdir)
        logging.warning("start_over: moved the previous run to %s", moved)
        return checkpointing.Checkpoints(workdir, max_to_keep=config.max_to_keep,
                                         async_save=config.async_checkpointing)
    return ckpts


def _jsonable(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def train_and_evaluate(config, workdir, *, mesh=None, stop_at_step: int | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Returns the final evaluation metrics (top-1/top-5 in %, per head and ensemble). ``mesh``: the
    devices to use (default: every device of every process, ``parallel.create_mesh()``).
    ``stop_at_step`` stops as a preemption would at that step (a checkpoint is saved): for tests and
    debugging.
    """
    validate_config(config)
    workdir = paths.as_path(workdir)
    if jax.process_index() == 0:
        check_workdir_writable(workdir)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
    # One run per workdir: a second one stops here (process 0 holds the lock for all).
    with checkpointing.workdir_lock(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir, mesh, stop_at_step)


def _train_and_evaluate(config, workdir, mesh, stop_at_step) -> dict:
    mesh = mesh or parallel.create_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    eval_batch = config.eval_batch_size or config.batch_size
    parallel.check_batch_size(eval_batch, mesh, name="eval_batch_size")

    dataset = data.create(config, mesh)
    num_classes = config.num_classes or dataset.num_classes
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    total_steps = optim.total_steps(config, steps_per_epoch)
    every = lambda epochs: max(1, int(round(epochs * steps_per_epoch)))
    eval_every, ckpt_every = every(config.eval_every_epochs), every(config.checkpoint_every_epochs)

    tx, schedule = optim.create_optimizer(config, steps_per_epoch)
    # config.num_seeds > 1: that many runs (seeds config.seed, config.seed + 1, ...) in one program,
    # the train state stacked along a leading seed axis and the step vmapped over it (seeds.py).
    seed_list = [config.seed + i for i in range(config.num_seeds)] if config.num_seeds > 1 else None
    if seed_list and dataset.loader != "in_memory":
        raise errors.ConfigError(
            "config.num_seeds > 1 needs the in-memory loader (--config.loader=in_memory).")
    if seed_list:
        graphdef, state = seeds.init_states(config, num_classes, seed_list, tx)
    else:
        graphdef, state = initial_state(create_model(config, num_classes), tx)
    num_heads = nnx.merge(graphdef, state["params"], state["batch_stats"]).num_heads
    spec = objective_spec(config, num_heads, steps_per_epoch, total_steps)
    teacher_graphdef, teacher_state = None, None
    if config.method == "kd":
        teacher_graphdef, teacher_state = load_teacher(config, num_classes)
        teacher_state = parallel.replicate(teacher_state, mesh)

    ckpts = checkpointing.Checkpoints(workdir, max_to_keep=config.max_to_keep,
                                      async_save=config.async_checkpointing)
    ckpts = _check_workdir(config, workdir, ckpts)
    state = parallel.replicate(state, mesh)
    restored = ckpts.restore(checkpointing.abstract(state))
    if restored is not None:
        state = restored[1]
        logging.info("Resumed from step %d in %s", restored[0], ckpts.directory)
    start_step = int(np.ravel(jax.device_get(state["step"]))[0])
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))

    writer = metrics.create_writer(workdir)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    summary = {"num_params": n_params, "num_heads": num_heads, "steps_per_epoch": steps_per_epoch,
               "total_steps": total_steps, "num_devices": mesh.devices.size,
               "num_train": dataset.num_train, "num_eval": dataset.num_eval,
               "num_seeds": len(seed_list or [config.seed])}
    summary.update({f"label_noise/{k}": v for k, v in dataset.label_noise_report.items()})
    logging.info("Run: %s", summary)
    if start_step == 0:
        writer.write_scalars(0, summary)

    make_step = lambda seed: make_train_step(graphdef, tx, schedule, spec, seed, teacher_graphdef)
    if seed_list:
        train_step = jax.jit(seeds.vmap_seeded_step(make_step, seed_list), donate_argnums=0)
        eval_sums = seeds.vmap_eval(make_eval_step(graphdef))
    else:
        train_step = jax.jit(make_step(config.seed), donate_argnums=0)
        eval_sums = make_eval_step(graphdef)
    # The running totals are added inside the jitted step: two launches per evaluation batch.
    eval_step = jax.jit(lambda state, batch, totals: jax.tree.map(
        jnp.add, totals, eval_sums(state, batch)))
    in_flight = parallel.InFlight()
    # Gradient consistency (DKS supplement, Proposition 1), logged at every evaluation on the first
    # evaluation batch: cosine between the main and each auxiliary CE gradient at the shared map.
    # With several seeds it is computed for each (vmapped); the result holds their mean.
    consistency = None
    if num_heads > 1 and config.log_grad_consistency:
        consistency = functools.partial(analysis.gradient_consistency, graphdef)
        if seed_list:
            consistency = jax.vmap(consistency, in_axes=(0, 0, None, None, None))
        consistency = jax.jit(consistency)
        probe = next(iter(dataset.eval_iterator(eval_batch)))

    def evaluate(state) -> dict:
        """Top-1/top-5 (%) of every head and the ensemble; with seeds, their mean and ``per_seed``."""
        totals = None
        for batch in dataset.eval_iterator(eval_batch):
            if totals is None:
                totals = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                      jax.eval_shape(eval_sums, state, batch))
            totals = eval_step(state, batch, totals)
            in_flight.add(totals, launches=2)  # the batch and the step
        totals = jax.device_get(totals)
        count = np.asarray(totals.pop("count"))
        values = {f"eval_{k}": 100.0 * np.asarray(v, np.float64) / count for k, v in totals.items()}
        result = {k: float(np.mean(v)) for k, v in values.items()}
        result["eval_count"] = int(np.ravel(count)[0])
        if consistency is not None:
            cos = consistency(state["params"], state["batch_stats"], probe["image"], probe["label"],
                              probe["mask"])
            cos = {k: np.asarray(v, np.float64) for k, v in jax.device_get(cos).items()}
            values.update(cos)  # per seed below, if several
            result.update({k: float(np.mean(v)) for k, v in cos.items()})
        if seed_list:
            result["per_seed"] = [
                {"seed": s, "eval_count": result["eval_count"],
                 **{k: float(v[i]) for k, v in values.items()}} for i, s in enumerate(seed_list)]
        return result

    def next_batches():
        if not seed_list:
            yield from dataset.train_iterator(config.batch_size, start_step=start_step)
        its = [dataset.train_iterator(config.batch_size, start_step=start_step, seed=s)
               for s in seed_list]
        sharding = seeds.stacked_batch_sharding(mesh)
        while True:
            per_seed = []
            for it in its:
                per_seed.append(next(it))
                in_flight.add(per_seed[-1])
            stacked = jax.device_put(seeds.stack(per_seed), sharding)
            in_flight.add(stacked, launches=2 * len(jax.tree.leaves(stacked)))
            yield stacked

    def diverged(bad: int, m: dict):
        """Stops on a non-finite loss or gradient computed on the state after ``bad`` steps.

        That state and every later one are not good: their checkpoints (saved before this check)
        move to ``checkpoints/nonfinite-<step>``, so the latest checkpoint left is one whose own
        loss and gradient were finite, and the next run resumes there. ``nonfinite.json`` records
        the failure and lets that resume change the optimisation (:data:`RESCUE_FIELDS`).
        """
        moved = ckpts.discard_from(bad)
        good = ckpts.latest_step()
        record = {"step": bad, "loss": np.asarray(m["loss"]).tolist(),
                  "grad_norm": np.asarray(m["grad_norm"]).tolist(), "set_aside": moved,
                  "resume_from": good, "learning_rate": config.learning_rate}
        if jax.process_index() == 0:
            (workdir / NONFINITE_FILE).write_text(json.dumps(record, indent=2))
        where = (f"The last good checkpoint is step {good} in {ckpts.directory} (its own loss and "
                 f"gradient were finite); running again resumes from it, and that resume may change "
                 f"{', '.join(sorted(RESCUE_FIELDS))} (e.g. --config.learning_rate="
                 f"{config.learning_rate / 10:g})" if good is not None else
                 "No good checkpoint was saved: start again with a lower learning rate "
                 "(--config.start_over=True, or another --workdir)")
        aside = f" Checkpoints {moved} were moved to nonfinite-<step>." if moved else ""
        raise TrainingDiverged(
            f"Non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) computed on the "
            f"state after {bad} steps (learning rate {config.learning_rate:g}); stopping.{aside} "
            f"{where}. Or check the data."
        )

    pending = _Pending(first_step=start_step)
    last_log = (time.time(), start_step)

    def flush(step: int):
        """Averages and writes the pending train metrics; stops on a NaN/Inf loss or gradient."""
        nonlocal last_log
        if not pending.items:
            return
        host = jax.device_get(pending.items)
        for i, m in enumerate(host):
            if not (np.all(np.isfinite(m["loss"])) and np.all(np.isfinite(m["grad_norm"]))):
                diverged(pending.first_step + i, m)
        averaged = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.time()
        steps_done = step - last_log[1]
        rate = steps_done / max(now - last_log[0], 1e-9)
        averaged["images_per_sec"] = rate * config.batch_size
        averaged["epoch"] = step / steps_per_epoch
        averaged["eta_min"] = (total_steps - step) / max(rate, 1e-9) / 60.0
        writer.write_scalars(step, averaged)
        pending.items.clear()
        pending.first_step = step
        last_log = (now, step)

    # clu periodic actions (they import TensorFlow): progress notes, and a profile on request.
    hooks = []
    if jax.process_index() == 0 and metrics.tensorflow_available():
        from clu import periodic_actions

        hooks.append(periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
            every_secs=None))
        if config.profile_steps:
            hooks.append(periodic_actions.Profile(
                logdir=str(workdir), num_profile_steps=config.profile_steps,
                first_profile=min(start_step + config.log_every_steps, total_steps)))

    final = {}
    step = start_step
    with _Preemption() as preemption:
        batches = next_batches()
        while step < total_steps:
            batch = next(batches)
            if teacher_graphdef is not None:
                state, step_metrics = train_step(state, batch, teacher_state)
            else:
                state, step_metrics = train_step(state, batch)
            pending.items.append(step_metrics)
            in_flight.add(step_metrics, launches=1 if seed_list else 2)  # (the batch and) the step
            step += 1
            for hook in hooks:
                hook(step)
            if step % config.log_every_steps == 0 or step == total_steps:
                flush(step)
            if step % eval_every == 0 or step == total_steps:
                flush(step)
                final = evaluate(state)
                writer.write_scalars(step, {k: v for k, v in final.items() if k != "per_seed"})
                best = np.asarray(jax.device_get(state["best_top1"]))
                if final["eval_top1/C1"] > float(np.mean(best)):  # the mean over seeds, if several
                    state["best_top1"] = parallel.replicate(
                        np.full(best.shape, final["eval_top1/C1"], np.float32), mesh)
                    ckpts.save_best(step, state, final["eval_top1/C1"])
            stopping = preemption.requested or step == stop_at_step or (
                jax.process_count() > 1 and ckpts.reached_preemption(step))
            if step % ckpt_every == 0 or step == total_steps or stopping:
                flush(step)
                ckpts.save(step, state, force=True)
            if stopping:
                ckpts.wait()
                ckpts.close()
                writer.flush()
                logging.warning("Stopped at step %d: checkpoint saved in %s; run the same "
                                "command again to resume.", step, ckpts.directory)
                return {"stopped_at_step": step}
    ckpts.wait()
    if restored is not None and step == start_step and not final:
        final = evaluate(state)  # the run was already complete
    if seed_list:
        for i, s in enumerate(seed_list):
            export(graphdef, seeds.unstack(state, i), workdir / "export" / f"seed{s}", config,
                   num_classes)
    else:
        export(graphdef, state, workdir / "export", config, num_classes)
    ckpts.close()
    writer.flush()
    return final


def export(graphdef, state, directory, config, num_classes: int) -> None:
    """Writes the main path's parameters and BN statistics (``models.export_state``) and metadata."""
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    model = nnx.merge(graphdef, host["params"], host["batch_stats"])
    main = _pure(models.export_state(model))
    meta = {"model": config.model, "num_classes": num_classes, "dataset": config.dataset,
            "image_size": config.image_size, "method": config.method}
    if config.branch_alone:  # the exported network is that branch's (DKS Table 5)
        meta.update(aux=config.aux, alone=config.branch_alone)
    checkpointing.save_export(directory, main, meta)


def load_exported_model(directory, *, dtype=jnp.float32):
    """An ``aux="none"`` model (or, for a branch trained alone, that network) holding an export's
    parameters: for inference and as a KD teacher."""
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
    _, pure = checkpointing.load_export(directory, target=jax.tree.map(np.asarray, _pure(tstate)))
    return nnx.merge(graphdef, pure), meta


