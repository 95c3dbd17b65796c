"""``train_and_evaluate(config, workdir)``: the training loop.

The loop wires the pieces: data (``data.create``), the train state (``state.create``: model,
objective, optimizer), the jitted step (``steps.train_step``), evaluation (``evaluator.Evaluator``),
checkpoints (``checkpointing``), metrics (``metrics``) and the export (``export``). The state is
replicated over the mesh, batches are split over its ``'data'`` axis (``parallel``). Here live what
belongs to a run rather than to a step: the config and workdir checks (one experiment per workdir),
logging cadence, divergence handling, preemption and resumption.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time

import jax
import numpy as np

from dks_jax import (
    attach,
    checkpointing,
    config_base,
    data,
    errors,
    evaluator,
    export,
    metrics,
    models,
    optim,
    parallel,
    paths,
    seeds,
    steps,
)
from dks_jax import state as state_lib

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


class TrainingDiverged(errors.UserError, FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


# ---- set-up -------------------------------------------------------------------------------------


def validate_config(config) -> None:
    """Fails fast, listing the valid values, on an unknown model, method, dtype or schedule."""
    if attach.is_factory(config.model):
        _validate_factory(config)
    elif config.model not in models.names():
        raise errors.ConfigError(
            f"Unknown config.model={config.model!r}; valid: {', '.join(models.names())}, or a "
            "factory 'module:function' (docs/models.md).")
    if config.method not in config_base.METHODS:
        raise errors.ConfigError(
            f"Unknown config.method={config.method!r}; valid: {', '.join(config_base.METHODS)}."
        )
    if config.dtype not in state_lib.DTYPES:
        raise errors.ConfigError(
            f"Unknown config.dtype={config.dtype!r}; valid: {', '.join(state_lib.DTYPES)}.")
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


def _validate_factory(config) -> None:
    """A factory model (``config.model = "module:function"``): it imports, its taps parse, and the
    registry-only fields are unset."""
    attach.load_factory(config.model)
    taps = attach.parse_taps(config.taps)
    registry_only = {"branches": "", "branch_alone": "", "dropout": 0.0,
                     "zero_init_residual": False, "bn_group_size": 0}
    set_ = [f"{k}={config[k]!r}" for k, default in registry_only.items() if config[k] != default]
    if set_:
        raise errors.ConfigError(
            f"config.model={config.model!r} is a factory model: {', '.join(set_)} apply to the "
            "registry's models only (unset them; the factory owns its architecture).")
    if not taps and config.aux != "none" and config.method not in ("baseline", "kd"):
        raise errors.ConfigError(
            f"config.method={config.method!r} trains auxiliary branches: name where they attach "
            f"to {config.model!r}, e.g. --config.taps='blocks.2=tokens_cls,blocks.4=tokens_cls' "
            f"(designs: {', '.join(attach.DESIGNS)}).")
    if config.method == "byot" and config.aux != "none" and not config.classifier:
        raise errors.ConfigError(
            "config.method='byot' on a factory model needs config.classifier: the path of its "
            "classifier submodule (e.g. 'head'), whose input is the feature BYOT's hints match.")


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


def experiment_changes(saved: dict, config, extra_allowed=frozenset()) -> tuple[dict, dict]:
    """``(other_experiment, allowed)``: the fields whose values differ, ``{field: (saved, now)}``,
    split by :data:`RESUMABLE_FIELDS` plus ``extra_allowed`` (after a divergence:
    :data:`RESCUE_FIELDS`). A field the saved config lacks (an older version wrote it) counts as
    allowed."""
    old, new = config_base.flatten(saved), config_base.flatten(config_base.to_dict(config))
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
    # config.num_seeds > 1: that many runs (seeds config.seed, config.seed + 1, ...) in one program,
    # the train state stacked along a leading seed axis and the step vmapped over it (seeds.py).
    seed_list = [config.seed + i for i in range(config.num_seeds)] if config.num_seeds > 1 else None
    if seed_list and dataset.loader != "in_memory":
        raise errors.ConfigError(
            "config.num_seeds > 1 needs the in-memory loader (--config.loader=in_memory).")
    setup = state_lib.create(config, num_classes, steps_per_epoch, seeds=seed_list)
    total_steps = setup.spec.total_steps
    every = lambda epochs: max(1, int(round(epochs * steps_per_epoch)))
    eval_every, ckpt_every = every(config.eval_every_epochs), every(config.checkpoint_every_epochs)
    teacher_graphdef, teacher_state = None, None
    if config.method == "kd":
        teacher_graphdef, teacher_state = state_lib.load_teacher(config, num_classes)
        teacher_state = parallel.replicate(teacher_state, mesh)

    ckpts = checkpointing.Checkpoints(workdir, max_to_keep=config.max_to_keep,
                                      async_save=config.async_checkpointing)
    ckpts = _check_workdir(config, workdir, ckpts)
    state = parallel.replicate(setup.state, mesh)
    restored = ckpts.restore(checkpointing.abstract(state))
    if restored is not None:
        state = restored[1]
        logging.info("Resumed from step %d in %s", restored[0], ckpts.directory)
    start_step = int(np.ravel(jax.device_get(state["step"]))[0])
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        (workdir / data.DATA_FILE).write_text(json.dumps(dataset.describe(), indent=2))

    writer = metrics.create_writer(workdir)
    summary = {"num_params": setup.num_params, "num_heads": setup.num_heads,
               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
               "num_devices": mesh.devices.size, "num_train": dataset.num_train,
               "num_eval": dataset.num_eval, "num_seeds": len(seed_list or [config.seed])}
    summary.update({f"label_noise/{k}": v for k, v in dataset.label_noise_report.items()})
    logging.info("Run: %s", summary)
    if start_step == 0:
        writer.write_scalars(0, summary)
        writer.write_hparams(config_base.flatten(config_base.to_dict(config)))
    if jax.process_index() == 0:
        params = jax.tree.map(lambda x: x[0], setup.state["params"]) if seed_list else \
            setup.state["params"]
        logging.info("Parameters (clu.parameter_overview counts):\n%s",
                     metrics.parameter_table(params))
        for feature in metrics.features_off():
            logging.warning("Off in this installation: %s.", feature)

    train_step = jax.jit(steps.train_step(setup, config.seed, teacher_graphdef), donate_argnums=0)
    teacher_args = (teacher_state,) if teacher_graphdef is not None else ()
    in_flight = parallel.InFlight()
    # Gradient consistency (DKS supplement, Proposition 1) is logged at every evaluation on the
    # first evaluation batch; with several seeds, the mean over seeds.
    evaluate = evaluator.Evaluator(
        setup.graphdef, dataset, eval_batch, seeds=setup.seeds, in_flight=in_flight,
        grad_consistency=setup.num_heads > 1 and config.log_grad_consistency)
    log = _TrainLog(config, workdir, ckpts, writer, start_step, steps_per_epoch, total_steps)
    profile = _Profile(workdir / "tensorboard", config.profile_steps,
                       first=min(start_step + config.log_every_steps, total_steps))

    final = {}
    step = start_step
    with _Preemption() as preemption:
        batches = _batches(dataset, config, start_step, seed_list, mesh, in_flight)
        while step < total_steps:
            state, step_metrics = train_step(state, next(batches), *teacher_args)
            log.add(step_metrics)
            in_flight.add(step_metrics, launches=1 if seed_list else 2)  # (the batch and) the step
            step += 1
            profile(step, state)
            if step % config.log_every_steps == 0 or step == total_steps:
                log.flush(step)
            if step % eval_every == 0 or step == total_steps:
                log.flush(step)
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
                log.flush(step)
                ckpts.save(step, state, force=True)
            if stopping:
                profile.close(step, state)
                ckpts.wait()
                ckpts.close()
                writer.flush()
                logging.warning("Stopped at step %d: checkpoint saved in %s; run the same "
                                "command again to resume.", step, ckpts.directory)
                return {"stopped_at_step": step}
    profile.close(step, state)
    ckpts.wait()
    if restored is not None and step == start_step and not final:
        final = evaluate(state)  # the run was already complete
    if seed_list:
        for i, s in enumerate(seed_list):
            export.export(setup.graphdef, seeds.unstack(state, i), workdir / "export" / f"seed{s}",
                          config, dataset)
    else:
        export.export(setup.graphdef, state, workdir / "export", config, dataset)
    ckpts.close()
    writer.flush()
    return final


def _batches(dataset, config, start_step: int, seed_list, mesh, in_flight):
    """The training batches from ``start_step`` on; with several seeds, each seed's own batch,
    stacked along a leading seed axis."""
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


class _Profile:
    """A ``jax.profiler`` trace of ``num_steps`` steps from step ``first`` (``config.profile_steps``)
    into ``logdir/plugins/profile/`` (TensorBoard's profile tab), on process 0; no TensorFlow."""

    def __init__(self, logdir, num_steps: int, *, first: int):
        self.logdir, self.num_steps, self.first = str(logdir), int(num_steps), int(first)
        self.enabled = self.num_steps > 0 and jax.process_index() == 0
        self.running = False

    def __call__(self, step: int, state) -> None:
        """Called after ``step`` steps have been dispatched."""
        if not self.enabled:
            return
        if step == self.first and not self.running:
            jax.block_until_ready(state)  # the trace holds the profiled steps' work only
            jax.profiler.start_trace(self.logdir)
            self.running = True
        elif self.running and step >= self.first + self.num_steps:
            self.close(step, state)

    def close(self, step: int, state) -> None:
        """Ends a trace still running (the run ended or stopped inside the profiled steps)."""
        if self.running:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.running, self.enabled = False, False
            logging.info("Profile of steps %d-%d written to %s/plugins/profile/", self.first + 1,
                         step, self.logdir)


class _TrainLog:
    """The train metrics of the steps since the last log, kept on the devices (no host sync per
    step) until :meth:`flush` averages and writes them, and stops on a non-finite loss."""

    def __init__(self, config, workdir, ckpts, writer, start_step: int, steps_per_epoch: int,
                 total_steps: int) -> None:
        self.config, self.workdir, self.ckpts, self.writer = config, workdir, ckpts, writer
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.first_step = start_step
        self.items: list = []
        self.last = (time.time(), start_step)
        # elapsed_s: the run's training time over all its segments (resumes continue it).
        self.elapsed_before, self.started = metrics.time_so_far(workdir), time.time()

    def add(self, step_metrics: dict) -> None:
        self.items.append(step_metrics)

    def flush(self, step: int) -> None:
        """Averages and writes the pending train metrics; stops on a NaN/Inf loss or gradient."""
        if not self.items:
            return
        host = jax.device_get(self.items)
        for i, m in enumerate(host):
            if not (np.all(np.isfinite(m["loss"])) and np.all(np.isfinite(m["grad_norm"]))):
                self.diverged(self.first_step + i, m)
        averaged = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.time()
        rate = (step - self.last[1]) / max(now - self.last[0], 1e-9)
        averaged["images_per_sec"] = rate * self.config.batch_size
        averaged["epoch"] = step / self.steps_per_epoch
        averaged["eta_min"] = (self.total_steps - step) / max(rate, 1e-9) / 60.0
        averaged["elapsed_s"] = self.elapsed_before + now - self.started
        self.writer.write_scalars(step, averaged)
        self.items.clear()
        self.first_step = step
        self.last = (now, step)

    def diverged(self, bad: int, m: dict):
        """Stops on a non-finite loss or gradient computed on the state after ``bad`` steps.

        That state and every later one are not good: their checkpoints (saved before this check)
        move to ``checkpoints/nonfinite-<step>``, so the latest checkpoint left is one whose own
        loss and gradient were finite, and the next run resumes there. ``nonfinite.json`` records
        the failure and lets that resume change the optimisation (:data:`RESCUE_FIELDS`).
        """
        config, ckpts = self.config, self.ckpts
        moved = ckpts.discard_from(bad)
        good = ckpts.latest_step()
        record = {"step": bad, "loss": np.asarray(m["loss"]).tolist(),
                  "grad_norm": np.asarray(m["grad_norm"]).tolist(), "set_aside": moved,
                  "resume_from": good, "learning_rate": config.learning_rate}
        if jax.process_index() == 0:
            (self.workdir / NONFINITE_FILE).write_text(json.dumps(record, indent=2))
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
