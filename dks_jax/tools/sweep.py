"""Configs x seeds: trains every run not finished yet, then writes the results tables (``tables.py``).

    python -m dks_jax.tools.sweep \\
        --configs=configs/cifar100_resnet32.py:baseline,configs/cifar100_resnet32.py:dks \\
        --seeds=5 --workdir=workdirs/r32 [--config.num_epochs=30 --config.loss.beta=0.5] [--name=r32]

runs every config with ``config.seed = k`` for every seed ``k`` (``--seeds=5`` is 0..4,
``--seeds=0,3,7`` those, ``--seeds=3-3`` seed 3 alone) through ``train.train_and_evaluate`` in its
own run folder ``<workdir>/<config name>/seed<k>`` (config name: the file's stem and the preset, e.g.
``cifar100_resnet32-dks``; ``densenet40_noisy_cifar10.py:dks,0.5`` -> ``densenet40_noisy_cifar10-dks-0.5``).
It is resumable: a finished run (``result.json`` in its folder) is not run again, an interrupted one
resumes from its checkpoint, and a folder holding a run of another config is an error (no silent
mixing). Then it writes ``results/<name>.md`` and ``results/<name>.csv`` (``--name`` defaults to
the workdir's folder name).

``--vmap_seeds`` trains the seeds of a config at once in one program (``config.num_seeds``, see
``dks_jax.seeds``; needs a trainer that supports it) in ``<workdir>/<config name>/seeds<a>-<b>``, and
still writes one ``seed<k>/result.json`` per seed. ``--keep_going`` logs a failing run and goes on.

``--config.<field>=<value>`` overrides apply to every config, parsed as by ``dks_jax.main``.
``--table_only`` writes the tables (``tables.table``) from existing run folders without training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Sequence

from dks_jax import xla_flags

if __name__ == "__main__":  # the command line: the CPU defaults of dks_jax.main, before JAX starts
    xla_flags.apply_cpu_defaults()

import jax  # noqa: E402
from absl import flags  # noqa: E402

from dks_jax import (  # noqa: E402
    cli,  # noqa: E402
    config_base,
    errors,
    metrics,
    paths,
    train,
)
from dks_jax.tools.tables import RESULT_FILE, finished_result, table, to_markdown  # noqa: E402

PLACE_FIELDS = frozenset({"data_dir", "download", "async_checkpointing", "max_to_keep",
                          "profile_steps", "checkpoint_every_epochs", "start_over"})


# ---- configs ------------------------------------------------------------------------------------


def split_configs(text: str | Sequence[str]) -> list[str]:
    """``"a.py:baseline,a.py:dks,b.py:dks,0.5"`` -> ``["a.py:baseline", "a.py:dks", "b.py:dks,0.5"]``.

    A comma starts a new config only when what follows names a ``.py`` file; otherwise it belongs to
    the preset (presets such as ``dks,0.5`` contain commas). A list is split item by item.
    """
    items = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        for piece in item.split(","):
            piece = piece.strip()
            if not piece:
                continue
            if out and not re.search(r"\.py(:|$)", piece):
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def config_name(spec: str) -> str:
    """Run-folder name of a config spec: the file's stem, then the preset, made path-safe."""
    path, _, preset = spec.partition(":")
    stem = paths.as_path(path).name.removesuffix(".py")
    name = f"{stem}-{preset}" if preset else stem
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-")


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``5`` -> ``[0, 1, 2, 3, 4]``; ``"0,3,7"`` -> ``[0, 3, 7]``; ``"2-4"`` -> ``[2, 3, 4]``
    (``"3-3"``: seed 3 alone)."""
    if isinstance(text, int):
        return list(range(text))
    if not isinstance(text, str):
        return [int(s) for s in text]
    if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", text):
        lo, hi = (int(x) for x in text.split("-"))
        if hi < lo:
            raise ValueError(f"--seeds={text}: the range is empty.")
        return list(range(lo, hi + 1))
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) == 1:
        n = int(parts[0])
        if n < 1:
            raise ValueError(f"--seeds={text}: need at least one seed.")
        return list(range(n))
    return [int(p) for p in parts]


# ---- running ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepRun:
    name: str
    seed: int
    workdir: object
    status: str  # "done" (already finished), "trained", "failed", "stopped"
    metrics: dict


def _check_same_config(run_dir, wanted: dict, saved: dict | None) -> None:
    if saved is None:
        return
    diff = sorted(k for k in set(saved) | set(wanted)
                  if saved.get(k) != wanted.get(k) and k not in PLACE_FIELDS)
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:8])
        raise errors.ConfigError(
            f"{run_dir} holds a run of another config ({changes}). Use another --workdir (or "
            "--name) for the changed config, or delete that run folder."
        )


def _device_info() -> dict:
    devices = jax.devices()
    device = f"{len(devices)} x {devices[0].device_kind}"
    if devices[0].platform == "cpu":  # "1 x cpu" says little: the processor and its cores
        device = f"{_cpu_model()}, {os.cpu_count()} cores"
    return {"device": device, "platform": devices[0].platform, "num_processes": jax.process_count()}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def run_sweep(configs: Sequence[str], seeds, workdir, *, overrides: Sequence[str] = (),
              results_dir="results", name: str | None = None, keep_going: bool = False,
              vmap_seeds: bool = False, command: str = "", mesh=None,
              train_fn: Callable | None = None) -> list[dict]:
    """Trains every config x seed not finished yet, then writes and returns the table rows.

    ``configs``: specs ``path.py[:preset]`` (or one comma-separated string, see
    :func:`split_configs`); ``seeds``: a count or a list. Each run: ``config.seed = k``, folder
    ``<workdir>/<config name>/seed<k>``; a finished run leaves ``result.json`` (final metrics,
    config, wall time, device). A run stopped by preemption ends the sweep (run it again to resume).
    A failing run raises, unless ``keep_going`` (then it is logged and left out of the table).

    ``vmap_seeds``: train all seeds of a config in one program (``config.num_seeds``, see
    ``dks_jax.seeds``) in ``<workdir>/<config name>/seeds<first>-<last>``; the seeds must be
    consecutive. ``train_fn`` must then return ``{"per_seed": [final metrics of each seed], ...}``;
    each seed still gets its ``seed<k>/result.json`` (with the wall time divided by the number of
    seeds), so tables read the same either way.
    """
    train_fn = train_fn or train.train_and_evaluate
    specs = split_configs(configs)
    seeds = parse_seeds(seeds)
    workdir = paths.as_path(workdir)
    names = [config_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Two configs map to the same run folder name: {names}.")
    if vmap_seeds and seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"--vmap_seeds trains seeds config.seed + 0..n-1: give consecutive seeds, "
                         f"not {seeds}.")
    loaded = {n: config_base.load(s, overrides) for n, s in zip(names, specs, strict=True)}
    if vmap_seeds and any("num_seeds" not in c for c in loaded.values()):
        raise ValueError("--vmap_seeds needs config.num_seeds, which this version of the config "
                         "and trainer do not have yet; run without it.")
    runs = []

    def seed_config(n, k):
        config = loaded[n].copy_and_resolve_references()
        config.seed = k
        return config

    for n in names:
        todo = []
        for k in seeds:
            config = seed_config(n, k)
            run_dir, wanted = workdir / n / f"seed{k}", config_base.to_dict(config)
            done = finished_result(run_dir)
            if done is not None:
                _check_same_config(run_dir, wanted, done.get("config"))
                logging.info("%s seed %d: finished before, skipped.", n, k)
                runs.append(SweepRun(n, k, run_dir, "done", done["metrics"]))
                continue
            if (run_dir / "config.json").exists():
                _check_same_config(run_dir, wanted,
                                   json.loads((run_dir / "config.json").read_text()))
            todo.append(k)
        if vmap_seeds and todo:
            # One program for every seed (also those finished: the program is all or nothing).
            jobs = [(seeds, workdir / n / f"seeds{seeds[0]}-{seeds[-1]}")]
        else:
            jobs = [([k], workdir / n / f"seed{k}") for k in todo]
        for job_seeds, run_dir in jobs:
            config = seed_config(n, job_seeds[0])
            if vmap_seeds:
                config.num_seeds = len(job_seeds)
            label = f"{n} seed{'s' if len(job_seeds) > 1 else ''} {job_seeds}"
            logging.info("%s: training in %s", label, run_dir)
            # A resumed run's wall time counts its earlier segments too.
            start = time.time() - metrics.time_so_far(run_dir)
            try:
                result = train_fn(config, run_dir, mesh=mesh)
            except Exception:
                if not keep_going:
                    raise
                logging.exception("%s failed; continuing (--keep_going).", label)
                runs += [SweepRun(n, k, run_dir, "failed", {}) for k in job_seeds]
                continue
            if "stopped_at_step" in result:
                logging.warning("%s stopped at step %d (preemption): run the same command again "
                                "to resume the sweep.", label, result["stopped_at_step"])
                return []
            wall = time.time() - start
            per_seed = result["per_seed"] if vmap_seeds else [result]
            if len(per_seed) != len(job_seeds):
                raise ValueError(f"{label}: the trainer returned {len(per_seed)} results.")
            for k, final in zip(job_seeds, per_seed, strict=True):
                record = {"metrics": {m: metrics.plain(v) for m, v in final.items()},
                          "config": config_base.to_dict(seed_config(n, k)),
                          "spec": specs[names.index(n)], "overrides": list(overrides),
                          "wall_time_s": wall / len(job_seeds), "command": command,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **_device_info()}
                if vmap_seeds:
                    record.update(vmapped_in=str(run_dir), vmapped_seeds=len(job_seeds),
                                  wall_time_total_s=wall)
                seed_dir = workdir / n / f"seed{k}"
                if jax.process_index() == 0:
                    seed_dir.mkdir(parents=True, exist_ok=True)
                    (seed_dir / RESULT_FILE).write_text(json.dumps(record, indent=2,
                                                                   sort_keys=True))
                runs.append(SweepRun(n, k, seed_dir, "trained", record["metrics"]))
    failed = sorted({f"{r.name}/seed{r.seed}" for r in runs if r.status == "failed"})
    return table(workdir, name=name, results_dir=results_dir, names=names, command=command,
                 notes=[f"failed runs (left out): {', '.join(failed)}"] if failed else (),
                 write=jax.process_index() == 0)


# ---- command line -------------------------------------------------------------------------------


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("configs", [], "path.py[:preset], comma-separated or repeated",
                              flag_values=fv)
    flags.DEFINE_string("seeds", "5", "a count (0..n-1), a comma-separated list or a range a-b",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "runs go to <workdir>/<config>/seed<k>", flag_values=fv,
                        required=True)
    flags.DEFINE_string("name", "", "results/<name>.md|.csv (default: the workdir's name)",
                        flag_values=fv)
    flags.DEFINE_string("results_dir", "results", "folder of the tables", flag_values=fv)
    flags.DEFINE_bool("table_only", False, "only write the tables from the finished runs",
                      flag_values=fv)
    flags.DEFINE_bool("keep_going", False,
                      "a failing run is logged and left out instead of stopping the sweep",
                      flag_values=fv)
    flags.DEFINE_bool("vmap_seeds", False,
                      "train the seeds of a config at once (config.num_seeds, one program)",
                      flag_values=fv)


def main(argv: Sequence[str]) -> int:
    """``argv`` without the program name; ``--config.<field>=<value>`` arguments are overrides."""
    overrides = [a for a in argv if a.startswith("--config.")]
    fv, _ = cli.parse(define_flags, [a for a in argv if a not in overrides],
                      "python -m dks_jax.tools.sweep", __doc__)
    logging.getLogger().setLevel(logging.INFO)
    command = "python -m dks_jax.tools.sweep " + " ".join(argv)
    if fv.table_only:
        names = [config_name(s) for s in split_configs(fv.configs)] or None
        rows = table(fv.workdir, name=fv.name or None, results_dir=fv.results_dir,
                     names=names, command=command)
    else:
        if not fv.configs:
            raise cli.UsageError("--configs is required (unless --table_only).")
        rows = run_sweep(fv.configs, fv.seeds, fv.workdir, overrides=overrides,
                         results_dir=fv.results_dir, name=fv.name or None,
                         keep_going=fv.keep_going, vmap_seeds=fv.vmap_seeds, command=command)
    if rows:
        print(to_markdown(rows, title=fv.name or paths.as_path(fv.workdir).name, command=command))
    return 0


if __name__ == "__main__":
    cli.run(main)
