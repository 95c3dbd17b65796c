"""Configs x seeds, and the papers' results tables (mean(std) over seeds) as Markdown and CSV.

    python -m dks_jax.sweep \\
        --configs=configs/cifar100_resnet32.py:baseline,configs/cifar100_resnet32.py:dks \\
        --seeds=5 --workdir=workdirs/r32 [--set num_epochs=30 --set loss.beta=0.5] [--name=r32]

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

``table(workdir)`` (or ``--table_only``) makes the same tables from existing run folders without
training: every ``<workdir>/<config name>/<run>/`` with a ``config.json`` counts, finished when it
has a ``result.json`` (written by the sweep) or a final evaluation in ``metrics.jsonl`` (a run of
``dks_jax.main``, with the final evaluation at ``total_steps``).

Tables
  CSV: one row per config with the columns of :data:`CSV_COLUMNS` (accuracies in %, main head C1),
  then ``C2_top1_mean, C2_top1_std, C2_top5_mean, C2_top5_std``, the same for C3, C4 and the
  ``ensemble`` (the mean of the heads' softmaxes), empty where a config has no such head.
  Markdown: the DKS Table 1 layout: per backbone (model, data set, label noise, epochs) one row per
  method with top-1 / top-5 **error** rates as mean(std), the top-1 gain over that backbone's
  baseline (baseline error minus method error, positive = better), and the branches' and
  ensemble's top-1 errors; with the hardware, the wall time per run and the command.
  std is the **sample** standard deviation (``ddof=1``, the unbiased variance's root) over the
  seeds; the papers do not say which they used. With one seed it is empty (``-``).
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from dks_jax import paths, xla_flags

RESULT_FILE = "result.json"
CSV_COLUMNS = ("config", "model", "dataset", "method", "label_noise", "seeds", "epochs",
               "top1_mean", "top1_std", "top5_mean", "top5_std")
STD_DDOF = 1
# Where a run reads and writes, not what it computes: a finished run still counts when these differ
# (the sweep continued on another machine, with the data elsewhere).
PLACE_FIELDS = frozenset({"data_dir", "download", "async_checkpointing", "max_to_keep",
                          "profile_steps", "checkpoint_every_epochs", "start_over"})
# Method pairs compared with Welch's t-test in the Markdown table (first vs second).
COMPARISONS = (("ds", "baseline"), ("dks", "baseline"), ("dks", "ds"), ("dhm", "baseline"),
               ("dhm", "ds"), ("dks", "dhm"))
METHOD_NAMES = {"baseline": "baseline", "ds": "DS", "dsn": "DSN", "dks": "DKS", "dhm": "DHM",
                "kd": "KD", "byot": "BYOT"}


# ---- configs ------------------------------------------------------------------------------------


def split_configs(text: str | Sequence[str]) -> list[str]:
    """``"a.py:baseline,a.py:dks,b.py:dks,0.5"`` -> ``["a.py:baseline", "a.py:dks", "b.py:dks,0.5"]``.

    A comma starts a new config only when what follows names a ``.py`` file; otherwise it belongs to
    the preset (presets such as ``dks,0.5`` contain commas). A list is split item by item.
    """
    items = [text] if isinstance(text, str) else list(text)
    out = []
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


def load_config(spec: str, overrides: Sequence[str] = ()):
    """``get_config(preset)`` of the file in ``spec`` (``path.py[:preset]``), locked, then overrides.

    ``overrides``: ``"field=value"`` or ``"loss.alpha=0.5"``; the value is a Python literal
    (``0.5``, ``(60, 120)``, ``True``, ``'x'``) or else taken as a string. Unknown fields are an
    error, as with ``--config.field`` on the command line.
    """
    path, _, preset = spec.partition(":")
    file = paths.as_path(path)
    if not file.exists():
        raise FileNotFoundError(f"Config file {path!r} (from {spec!r}) not found.")
    module_spec = importlib.util.spec_from_file_location(f"_sweep_config_{config_name(spec)}",
                                                         str(file))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
    config.lock()
    for assignment in overrides:
        set_field(config, assignment)
    return config


def set_field(config, assignment: str) -> None:
    """Applies ``"a.b=value"`` to a (locked) ConfigDict; unknown fields raise AttributeError."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set wants field=value, got {assignment!r}.")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.strip().split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise AttributeError(
            f"--set {assignment!r}: the config has no field {key!r}. Fields: "
            f"{', '.join(sorted(node.keys()))}."
        )
    if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(node[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


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


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


# ---- running ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepRun:
    name: str
    seed: int
    workdir: object
    status: str  # "done" (already finished), "trained", "failed", "stopped"
    metrics: dict


def _finished_result(run_dir):
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _check_same_config(run_dir, wanted: dict, saved: dict | None) -> None:
    if saved is None:
        return
    diff = sorted(k for k in set(saved) | set(wanted)
                  if saved.get(k) != wanted.get(k) and k not in PLACE_FIELDS)
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:8])
        raise ValueError(
            f"{run_dir} holds a run of another config ({changes}). Use another --workdir (or "
            "--name) for the changed config, or delete that run folder."
        )


def _device_info() -> dict:
    import jax

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
    import jax

    if train_fn is None:
        from dks_jax import train

        train_fn = train.train_and_evaluate
    specs = split_configs(configs)
    seeds = parse_seeds(seeds)
    workdir = paths.as_path(workdir)
    names = [config_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Two configs map to the same run folder name: {names}.")
    if vmap_seeds and seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"--vmap_seeds trains seeds config.seed + 0..n-1: give consecutive seeds, "
                         f"not {seeds}.")
    loaded = {n: load_config(s, overrides) for n, s in zip(names, specs, strict=True)}
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
            run_dir, wanted = workdir / n / f"seed{k}", _config_dict(config)
            done = _finished_result(run_dir)
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
            start = time.time()
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
                record = {"metrics": {m: _plain(v) for m, v in final.items()},
                          "config": _config_dict(seed_config(n, k)),
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


def _plain(v):
    try:
        return float(v) if not isinstance(v, (int, str)) else v
    except (TypeError, ValueError):
        return str(v)


# ---- reading run folders ------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
    """One finished run: its config (as saved) and final evaluation metrics (accuracies in %)."""

    path: str
    config: dict
    metrics: dict
    wall_time_s: float | None = None
    device: str = ""
    command: str = ""


def read_run(run_dir) -> RunRecord | None:
    """The finished run in ``run_dir``, or None (no config, or not finished)."""
    from dks_jax import metrics as metrics_lib

    run_dir = paths.as_path(run_dir)
    result = _finished_result(run_dir)
    if result is not None and "metrics" in result:
        return RunRecord(str(run_dir), result.get("config") or {}, result["metrics"],
                         result.get("wall_time_s"), result.get("device", ""),
                         result.get("command", ""))
    if not (run_dir / "config.json").exists():
        return None
    config = json.loads((run_dir / "config.json").read_text())
    records = metrics_lib.read_metrics(run_dir)
    total = next((r["total_steps"] for r in records if "total_steps" in r), None)
    final = [r for r in records if "eval_top1/C1" in r and (total is None or r["step"] >= total)]
    if total is None or not final:
        return None
    metrics = {k: v for k, v in final[-1].items() if k.startswith("eval_")}
    return RunRecord(str(run_dir), config, metrics)


def collect(workdir, names: Sequence[str] | None = None) -> dict[str, list[RunRecord]]:
    """``{config name: [finished runs]}`` from ``<workdir>/<config name>/<run>/`` folders.

    ``names``: the config folders to read, in this order (default: every folder, sorted).
    Unfinished runs are left out (logged).
    """
    workdir = paths.as_path(workdir)
    if names is None:
        names = sorted(p.name for p in workdir.iterdir() if p.is_dir()) if workdir.exists() else []
    groups = {}
    for n in names:
        folder = workdir / n
        if not folder.exists():
            continue
        runs, unfinished = [], []
        for run_dir in sorted((p for p in folder.iterdir() if p.is_dir()), key=_seed_order):
            if _is_vmapped(run_dir):
                continue  # its seeds are read from their own seed<k>/result.json
            record = read_run(run_dir)
            if record is not None:
                runs.append(record)
            elif (run_dir / "config.json").exists():
                unfinished.append(run_dir.name)
        if unfinished:
            logging.warning("%s: unfinished runs left out of the table: %s", n, unfinished)
        if runs:
            groups[n] = runs
    return groups


def _is_vmapped(run_dir) -> bool:
    config = run_dir / "config.json"
    if not config.exists() or (run_dir / RESULT_FILE).exists():
        return False
    return int(json.loads(config.read_text()).get("num_seeds", 0) or 0) > 1


def _seed_order(path):
    m = re.fullmatch(r"seed(\d+)", path.name)
    return (0, int(m.group(1)), "") if m else (1, 0, path.name)


# ---- statistics and tables ----------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    std = float(np.std(x, ddof=STD_DDOF)) if x.size > STD_DDOF else math.nan
    return float(np.mean(x)), std


def _heads(runs: Sequence[RunRecord]) -> list[str]:
    found = set()
    for r in runs:
        found |= {k.split("/", 1)[1] for k in r.metrics if k.startswith("eval_top1/")}
    return sorted(found, key=lambda h: (h == "ensemble", int(h[1:]) if h[1:].isdigit() else 0))


def _dataset_name(dataset: str) -> str:
    if "/" not in dataset:
        return dataset
    name = dataset.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(ext)
    return name


def summarise(groups: dict[str, list[RunRecord]]) -> list[dict]:
    """One row per config: the CSV columns (numbers; NaN where undefined), plus ``heads``,
    ``values`` (``{"top1": [per run], "C2_top1": [...], ...}``), ``seed_list``, ``wall_time_s``
    (mean per run, None if unknown), ``device`` and ``command`` for the Markdown."""
    rows = []
    for name, runs in groups.items():
        c = runs[0].config
        heads = _heads(runs)
        row = {"config": name, "model": c.get("model", ""),
               "dataset": _dataset_name(str(c.get("dataset", ""))), "method": c.get("method", ""),
               "label_noise": float(c.get("label_noise", 0.0) or 0.0), "seeds": len(runs),
               "epochs": c.get("num_epochs", math.nan)}
        for head in heads:
            prefix = "" if head == "C1" else f"{head}_"
            for metric in ("top1", "top5"):
                values = [r.metrics[f"eval_{metric}/{head}"] for r in runs
                          if f"eval_{metric}/{head}" in r.metrics]
                mean, std = mean_std(values)
                row[f"{prefix}{metric}_mean"], row[f"{prefix}{metric}_std"] = mean, std
                row.setdefault("values", {})[f"{prefix}{metric}"] = values
        walls = [r.wall_time_s for r in runs if r.wall_time_s is not None]
        row["heads"] = heads
        row["seed_list"] = [r.config.get("seed") for r in runs]
        row["wall_time_s"] = float(np.mean(walls)) if walls else None
        row["device"] = next((r.device for r in runs if r.device), "")
        row["command"] = next((r.command for r in runs if r.command), "")
        rows.append(row)
    return rows


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's two-sided t-test of mean(a) != mean(b) (unequal variances; Welch 1947).

    Returns ``{"diff", "t", "dof", "p"}``: diff = mean(a) - mean(b), t = diff / sqrt(s_a^2/n_a +
    s_b^2/n_b) with sample variances, dof by the Welch-Satterthwaite equation, p from Student's t
    with that dof. NaN where undefined (fewer than two values on a side, or both variances zero).
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2:
        return {"diff": diff, "t": math.nan, "dof": math.nan, "p": math.nan}
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return {"diff": diff, "t": math.nan, "dof": math.nan, "p": math.nan}
    t = diff / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return {"diff": diff, "t": float(t), "dof": float(dof), "p": float(2 * stats.t.sf(abs(t), dof))}


def comparisons(rows: Sequence[dict], pairs=COMPARISONS) -> list[dict]:
    """Welch's t-tests between methods of the same backbone (model, data set, label noise, epochs),
    for the main head's top-1 and the ensemble's: ``{"backbone", "a", "b", "head", "n_a", "n_b",
    **welch(a, b)}`` for every pair in ``pairs`` whose two methods are there."""
    out = []
    for key in dict.fromkeys(_backbone_key(r) for r in rows):
        by_method = {r["method"]: r for r in rows if _backbone_key(r) == key}
        for a, b in pairs:
            if a not in by_method or b not in by_method:
                continue
            for head in ("top1", "ensemble_top1"):
                va = by_method[a].get("values", {}).get(head)
                vb = by_method[b].get("values", {}).get(head)
                if head != "top1" and (not va or not vb):
                    continue  # the baseline has no ensemble
                out.append({"backbone": key, "a": a, "b": b, "head": head,
                            "n_a": len(va or ()), "n_b": len(vb or ()),
                            **welch(va or (), vb or ())})
    return out


def _comparisons_markdown(rows) -> list[str]:
    tests = comparisons(rows)
    if not tests:
        return []
    lines = ["", "## Comparisons", "",
             "Welch's two-sided t-test (unequal variances) on the per-seed top-1 accuracies: "
             "difference of the means (first minus second, percentage points), t, the "
             "Welch-Satterthwaite degrees of freedom and p. Each comparison on its own, no "
             "correction for multiple comparisons.", "",
             "| Model | Data set | Label noise | Comparison | Head | Seeds | Difference | t | dof "
             "| p |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None or math.isnan(v) else format(v, spec)
    for c in tests:
        model, dataset, noise, _ = c["backbone"]
        name = f"{METHOD_NAMES.get(c['a'], c['a'])} vs {METHOD_NAMES.get(c['b'], c['b'])}"
        head = "C1" if c["head"] == "top1" else "ensemble"
        lines.append(f"| {model} | {dataset} | {noise:g} | {name} | {head} | "
                     f"{c['n_a']} vs {c['n_b']} | {fmt(c['diff'], '+.2f')} | {fmt(c['t'], '.2f')} "
                     f"| {fmt(c['dof'], '.1f')} | {fmt(c['p'], '.3g')} |")
    return lines


def _per_seed_markdown(rows) -> list[str]:
    lines = ["", "## Per seed", "", "Top-1 accuracy (%) of each run, in seed order.", "",
             "| Config | Seeds | C1 top-1 | Ensemble top-1 |", "|---|---|---|---|"]
    for row in rows:
        shown = [", ".join(f"{v:.2f}" for v in row.get("values", {}).get(k, ())) or "-"
                 for k in ("top1", "ensemble_top1")]
        seeds_text = ", ".join(str(s) for s in row.get("seed_list", ()))
        lines.append(f"| {row['config']} | {seeds_text} | {shown[0]} | {shown[1]} |")
    return lines


def csv_columns(rows: Sequence[dict]) -> list[str]:
    heads = []
    for row in rows:
        heads += [h for h in row["heads"] if h != "C1" and h not in heads]
    heads.sort(key=lambda h: (h == "ensemble", int(h[1:]) if h[1:].isdigit() else 0))
    extra = [f"{h}_{m}_{s}" for h in heads for m in ("top1", "top5") for s in ("mean", "std")]
    return list(CSV_COLUMNS) + extra


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}".rstrip("0").rstrip(".")
    return v


def to_csv(rows: Sequence[dict]) -> str:
    columns = csv_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(c, "")) for c in columns])
    return buf.getvalue()


def _err(row, key: str) -> str:
    mean, std = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{100.0 - mean:.2f}"
    return text + (f"({std:.2f})" if not math.isnan(std) else "")


def _backbone_key(row) -> tuple:
    return (row["model"], row["dataset"], row["label_noise"], row["epochs"])


def to_markdown(rows: Sequence[dict], *, title: str = "", command: str = "",
                notes: Sequence[str] = ()) -> str:
    """The DKS Table 1 layout (see the module doc)."""
    order = []
    for row in rows:
        if _backbone_key(row) not in order:
            order.append(_backbone_key(row))
    branch_heads = []
    for row in rows:
        branch_heads += [h for h in row["heads"] if h != "C1" and h not in branch_heads]
    branch_heads.sort(key=lambda h: (h == "ensemble", int(h[1:]) if h[1:].isdigit() else 0))
    header = ["Model", "Data set", "Label noise", "Epochs", "Method", "Seeds", "Top-1 error (%)",
              "Gain", "Top-5 error (%)"]
    header += [f"{h} top-1 err" for h in branch_heads] + ["Wall time / run", "Config"]
    lines = [f"# {title}" if title else "# Results", ""]
    lines.append("Error rates (%) = 100 - accuracy of the main classifier (C1) unless named, "
                 "mean(std) over seeds, std the sample standard deviation (ddof=1). Gain: top-1 "
                 "error of the baseline minus that of the method, same model, data set, label "
                 "noise and epochs (positive = better), as in DKS Table 1.")
    lines.append("")
    devices = sorted({r["device"] for r in rows if r["device"]})
    lines.append(f"Hardware: {', '.join(devices) if devices else 'not recorded'}.")
    command = command or next((r["command"] for r in rows if r["command"]), "")
    if command:
        lines.append("")
        lines.append(f"Command: `{command}`")
    for note in notes:
        lines += ["", f"Note: {note}"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in order:
        group = [r for r in rows if _backbone_key(r) == key]
        group.sort(key=lambda r: r["method"] != "baseline")  # stable: baseline first
        base = next((r for r in group if r["method"] == "baseline"), None)
        for row in group:
            gain = "-"
            if base is not None and row is not base and not math.isnan(row["top1_mean"]):
                gain = f"{row['top1_mean'] - base['top1_mean']:+.2f}"
            wall = row["wall_time_s"]
            cells = [row["model"], row["dataset"], f"{row['label_noise']:g}",
                     f"{row['epochs']:g}" if isinstance(row["epochs"], (int, float)) else "-",
                     METHOD_NAMES.get(row["method"], row["method"]), str(row["seeds"]),
                     _err(row, "top1"), gain, _err(row, "top5")]
            cells += [_err(row, f"{h}_top1") for h in branch_heads]
            cells += [_duration(wall), row["config"]]
            lines.append("| " + " | ".join(cells) + " |")
    if any(len(r.get("values", {}).get("top1", ())) > 1 for r in rows):
        lines += _comparisons_markdown(rows) + _per_seed_markdown(rows)
    return "\n".join(lines) + "\n"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def table(workdir, *, name: str | None = None, results_dir="results",
          names: Sequence[str] | None = None, command: str = "", notes: Sequence[str] = (),
          write: bool = True) -> list[dict]:
    """Tables of the finished runs under ``workdir`` (no training): rows, and (``write``)
    ``<results_dir>/<name>.md`` and ``.csv``; ``name`` defaults to the workdir's folder name."""
    workdir = paths.as_path(workdir)
    rows = summarise(collect(workdir, names))
    if write:
        name = name or workdir.name
        out = paths.as_path(results_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.csv").write_text(to_csv(rows))
        (out / f"{name}.md").write_text(to_markdown(rows, title=name, command=command,
                                                    notes=notes))
        logging.info("Wrote %s and %s", out / f"{name}.md", out / f"{name}.csv")
    return rows


# ---- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dks_jax.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", action="append", default=[],
                        help="path.py[:preset], comma-separated or repeated")
    parser.add_argument("--seeds", default="5", help="a count (0..n-1) or a comma-separated list")
    parser.add_argument("--workdir", required=True, help="runs go to <workdir>/<config>/seed<k>")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="config override for every run (repeatable)")
    parser.add_argument("--name", default="", help="results/<name>.md|.csv (default: workdir name)")
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--table_only", action="store_true",
                        help="only write the tables from the finished runs under --workdir")
    parser.add_argument("--keep_going", action="store_true",
                        help="a failing run is logged and left out instead of stopping the sweep")
    parser.add_argument("--vmap_seeds", action="store_true",
                        help="train the seeds of a config at once (config.num_seeds, one program)")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:  # the CLI's XNNPACK convolutions, as dks_jax.main sets them
        xla_flags.apply_cpu_defaults()
    logging.getLogger().setLevel(logging.INFO)
    command = "python -m dks_jax.sweep " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.table_only:
        names = [config_name(s) for s in split_configs(args.configs)] or None
        rows = table(args.workdir, name=args.name or None, results_dir=args.results_dir,
                     names=names, command=command)
    else:
        if not args.configs:
            parser.error("--configs is required (unless --table_only).")
        rows = run_sweep(args.configs, args.seeds, args.workdir, overrides=args.overrides,
                         results_dir=args.results_dir, name=args.name or None,
                         keep_going=args.keep_going, vmap_seeds=args.vmap_seeds,
                         command=command)
    if rows:
        print(to_markdown(rows, title=args.name or paths.as_path(args.workdir).name,
                          command=command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
