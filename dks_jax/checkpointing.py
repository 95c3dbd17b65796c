"""Checkpoints and exports, behind one module so that an Orbax API change is a one-file change.

Run folder layout (docs/design.md): ``checkpoints/<step>/`` holds the latest ``max_to_keep``
checkpoints and the one with the best evaluation top-1 (one Orbax ``CheckpointManager``, kept by
its preservation policies: a step is written once even when it is both); ``export/`` the main path
only, for inference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from dks_jax import errors, paths

# Written by a run that stopped on a non-finite loss (train.py); it belongs to that run.
NONFINITE_FILE = "nonfinite.json"


class _UnevaluatedSaveNote(logging.Filter):
    """Orbax warns at every save without metrics when a best checkpoint is tracked; here a save
    between evaluations is expected (it is kept as one of the latest, never as the best)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_UnevaluatedSaveNote())


class CheckpointError(errors.UserError, RuntimeError):
    """No usable checkpoint could be restored, or the workdir holds another run's checkpoints."""


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class Checkpoints:
    """Saves every process's share of the train state; restores into an abstract, sharded target.

    One ``CheckpointManager`` keeps the latest ``max_to_keep`` checkpoints and the best one (the
    highest ``top1`` given to :meth:`save_best`). Every process calls every method (Orbax
    coordinates the processes). Saving is asynchronous: ``save`` returns once the arrays are copied
    off the devices; ``wait`` blocks until written.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, async_save: bool = True):
        workdir = paths.as_path(workdir)
        self.directory = workdir / "checkpoints"
        policy = preservation.AnyPreservationPolicy([
            preservation.LatestN(n=max_to_keep),
            preservation.BestN(get_metric_fn=lambda m: m["top1"], n=1,
                               keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write each step's metrics, so that the best is known after a restart.
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=async_save, preservation_policy=policy,
            best_fn=lambda m: m["top1"], best_mode="max")
        # The handler named up front: a fresh manager can then read a step's tree (item_metadata)
        # before restoring it.
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())
        # Runs of older versions kept their best checkpoint apart, in best/<step>/: read only.
        self._older_best = workdir / "best"

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, *, force: bool = False, top1: float | None = None) -> bool:
        """Saves ``state`` as ``step`` unless that step is saved already (e.g. as the best);
        ``top1``: its evaluation, which makes it a candidate for the best checkpoint."""
        if step in self._manager.all_steps():
            return False
        metrics = None if top1 is None else {"top1": float(top1)}
        return self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                                  force=force)

    def save_best(self, step: int, state, top1: float) -> bool:
        """Saves ``state`` with its evaluation ``top1``; the best one stays (preservation policy)."""
        return self.save(step, state, force=True, top1=top1)

    def best_step(self) -> int | None:
        """The step of the best checkpoint kept (highest ``top1``), or None."""
        scored = {}
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and np.isfinite(metrics.get("top1", np.nan)):
                scored[step] = metrics["top1"]
        if scored:
            return max(scored, key=lambda s: (scored[s], s))
        older = self._older_best_steps()
        return older[-1] if older else None

    def _older_best_steps(self) -> list[int]:
        if not self._older_best.is_dir():
            return []
        return sorted(int(p.name) for p in self._older_best.iterdir() if p.name.isdigit())

    def _restore_older_best(self, step: int, target):
        manager = ocp.CheckpointManager(self._older_best,
                                        item_handlers=ocp.StandardCheckpointHandler())
        try:
            saved = manager.item_metadata(step)
            differences = tree_differences(getattr(saved, "tree", saved), target)
            if differences:
                raise CheckpointError(
                    f"The checkpoint at {self._older_best / str(step)} does not match this run's "
                    f"model and optimizer state ({'; '.join(differences[:5])}).")
            return manager.restore(step, args=ocp.args.StandardRestore(target))
        finally:
            manager.close()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the runtime has seen a preemption notice (multi-process)."""
        return self._manager.reached_preemption(step)

    def restore(self, target, step: int | None = None) -> tuple[int, Any] | None:
        """Restores the latest readable checkpoint (or ``step``) into ``target`` (abstract arrays
        with shardings).

        Returns ``(step, state)``, or None when there is no checkpoint. The checkpoint's tree
        (paths, shapes) is compared with ``target`` first: a different model or optimizer state is
        a CheckpointError naming the differences. A checkpoint that cannot be read (corrupt,
        partial) is renamed ``corrupt-<step>`` so nothing is lost, and the previous one is tried;
        the log says so. Raises CheckpointError when every checkpoint fails.
        """
        if step is not None and step not in self.all_steps() and step in self._older_best_steps():
            return step, self._restore_older_best(step, target)
        steps = self.all_steps() if step is None else [step]
        errors = []
        for step in reversed(steps):
            read_error: Exception | None = None
            try:
                saved = self._manager.item_metadata(step)
                if saved is None:
                    raise ValueError("no metadata (not a checkpoint of a train state)")
            except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable data
                saved, read_error = None, e
            if saved is not None:
                differences = tree_differences(getattr(saved, "tree", saved), target)
                if differences:
                    raise CheckpointError(
                        f"The checkpoint at {self.directory / str(step)} does not match this "
                        f"run's model and optimizer state ({'; '.join(differences[:5])}"
                        f"{'; ...' if len(differences) > 5 else ''}). It belongs to a different "
                        "configuration: use another --workdir, or set --config.start_over=True to "
                        "move the old checkpoints aside and start anew.")
            try:
                if read_error is not None:
                    raise read_error
                state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable data
                errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
                logging.warning(
                    "Checkpoint at step %d is unreadable (%s); moving it to corrupt-%d and falling "
                    "back to the previous one.", step, errors[-1], step,
                )
                self._set_aside(step)
                continue
            if errors:
                logging.warning("Restored step %d after skipping: %s", step, "; ".join(errors))
            return step, state
        if errors:
            raise CheckpointError(
                f"No checkpoint in {self.directory} could be restored: {'; '.join(errors)}. "
                "Set --config.start_over=True to start from scratch (old checkpoints are kept)."
            )
        return None

    def discard_from(self, step: int) -> list[int]:
        """Moves every checkpoint of ``step`` or later to ``nonfinite-<step>`` (kept, never restored
        again): states whose own loss or gradient was not finite. Returns the moved steps."""
        self.wait()
        moved = [s for s in self.all_steps() if s >= step]
        for s in moved:
            self._set_aside(s, "nonfinite")
        return moved

    def _set_aside(self, step: int, why: str = "corrupt") -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                src.rename(self.directory / f"{why}-{step}")
        barrier(f"set_aside_{why}_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _flat_shapes(tree) -> dict[str, tuple | None]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): (
        tuple(leaf.shape) if hasattr(leaf, "shape") else None) for path, leaf in leaves}


def tree_differences(saved, target) -> list[str]:
    """How a checkpoint's tree (Orbax metadata) differs from ``target``: paths only in one of
    them, and shapes that differ; empty when they match."""
    a, b = _flat_shapes(saved), _flat_shapes(target)
    out = [f"only in the checkpoint: {k}" for k in sorted(a.keys() - b.keys())]
    out += [f"only in this run: {k}" for k in sorted(b.keys() - a.keys())]
    out += [f"{k}: shape {a[k]} in the checkpoint, {b[k]} in this run"
            for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return out


def barrier(name: str) -> None:
    """Waits for every process (multi-process runs; nothing to wait for otherwise)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def move_aside(workdir) -> epath.Path | None:
    """Renames a previous run (checkpoints, export, config, data description, metrics, TensorBoard
    events, evaluations; ``best`` of older versions) to
    ``previous-<n>/``: nothing is lost, and nothing of it mixes with the next run's."""
    workdir = paths.as_path(workdir)
    names = [n for n in ("checkpoints", "best", "export", "config.json", "data.json",
                         "metrics.jsonl", "tensorboard", "eval", NONFINITE_FILE)
             if (workdir / n).exists()]
    if not names:
        return None
    n = 0
    while (workdir / f"previous-{n}").exists():
        n += 1
    dest = workdir / f"previous-{n}"
    if jax.process_index() == 0:
        dest.mkdir(parents=True)
        for name in names:
            (workdir / name).rename(dest / name)
    barrier("move_aside")
    return dest


# ---- export: the main path only ---------------------------------------------------------------

EXPORT_META = "model.json"


def save_export(directory, state: dict, meta: dict) -> epath.Path:
    """Writes the main path's ``state`` (a pure dict of arrays) and ``meta`` (JSON: model, classes)."""
    directory = paths.as_path(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "state", state, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    barrier("save_export")
    return directory


def load_export(directory, target=None) -> tuple[dict, dict]:
    """Reads an export: ``(meta, state)``; ``state`` restored into ``target`` when given."""
    directory = paths.as_path(directory)
    meta_path = directory / EXPORT_META
    if not meta_path.exists():
        raise CheckpointError(
            f"{directory} is not an export of dks_jax (no {EXPORT_META}); point to the `export/` "
            "folder of a finished run."
        )
    meta = json.loads(meta_path.read_text())
    checkpointer = ocp.StandardCheckpointer()
    if target is None:
        state = checkpointer.restore(directory / "state")
    else:
        state = checkpointer.restore(directory / "state", target)
    return meta, state


# ---- one run per workdir ------------------------------------------------------------------------

LOCK_FILE = ".lock"


class WorkdirLocked(errors.UserError, RuntimeError):
    """Another run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder_text(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
            f"{holder.get('started', '?')}")


def _read_holder(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _create_exclusive(path, text: str) -> bool:
    """Creates ``path`` holding ``text`` unless it exists; True if this call created it.

    Local folders: the text is written to a private file that is then hard-linked to ``path``,
    which the kernel does atomically (never a half-written lock). Other file systems (gs://): an
    existence check, then a write (a small race window, as their lack of exclusive create allows).
    """
    if not paths.is_remote(str(path)):
        path = pathlib.Path(str(path))
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}")
        tmp.write_text(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    if path.exists():
        return False
    path.write_text(text)
    return True


@contextlib.contextmanager
def workdir_lock(workdir, *, enabled: bool = True):
    """Holds ``<workdir>/.lock`` (host, pid, start time) while the block runs.

    A second run on the same workdir stops with :class:`WorkdirLocked`, naming the holder. A lock
    left by a process of this host that no longer exists (a crash, a kill) is stale: it is taken
    over with a warning. A lock from another host cannot be checked from here; the message says
    to delete it if that run is gone. ``enabled=False`` (the processes other than 0 of a
    multi-process run) does nothing.
    """
    if not enabled:
        yield
        return
    workdir = paths.as_path(workdir)
    path = workdir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    text = json.dumps(me)
    for _ in range(3):
        if _create_exclusive(path, text):
            break
        holder = _read_holder(path)
        same_host = holder.get("host") == me["host"]
        if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            logging.warning("Taking over the stale lock %s (%s: that process no longer exists).",
                            path, _holder_text(holder))
            path.unlink(missing_ok=True)
            continue
        if not holder and not path.exists():
            continue  # released meanwhile
        where = "" if same_host else (
            f" If that run is no longer running (it cannot be checked from this host), delete "
            f"{path} and start again.")
        raise WorkdirLocked(
            f"{workdir} is in use by another run ({_holder_text(holder)}). Two runs in one workdir "
            f"would overwrite each other's checkpoints and metrics: wait for it to finish or use "
            f"another --workdir.{where}"
        )
    else:
        raise WorkdirLocked(f"could not take the lock {path}; delete it if no run is using "
                            f"{workdir}.")
    try:
        yield
    finally:
        holder = _read_holder(path)
        if (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
            path.unlink(missing_ok=True)
