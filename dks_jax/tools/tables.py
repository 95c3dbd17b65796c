"""The papers' results tables from sweep run folders: mean(std) over seeds, Welch tests, Markdown, CSV.

``table(workdir)`` reads every ``<workdir>/<config name>/<run>/`` with a ``config.json``: finished
when it has a ``result.json`` (written by ``dks_jax.tools.sweep``) or a final evaluation in
``metrics.jsonl`` (a run of ``dks_jax.main``, with the final evaluation at ``total_steps``), and
writes ``<results_dir>/<name>.md`` and ``.csv``.

Tables
  CSV: one row per config with the columns of :data:`CSV_COLUMNS` (accuracies in %, main head C1),
  then ``C2_top1_mean, C2_top1_std, C2_top5_mean, C2_top5_std``, the same for C3, C4 and the
  ``ensemble`` (the mean of the heads' softmaxes), empty where a config has no such head.
  Markdown: the DKS Table 1 layout: per backbone (model, data set, label noise, epochs) one row per
  method with top-1 / top-5 **error** rates as mean(std), the top-1 gain over that backbone's
  baseline (baseline error minus method error, positive = better), and the branches' and
  ensemble's top-1 errors; with the hardware, the wall time per run and the command; then Welch's
  t-tests between methods (:data:`COMPARISONS`) and the per-seed values.
  std is the **sample** standard deviation (``ddof=1``, the unbiased variance's root) over the
  seeds; the papers do not say which they used. With one seed it is empty (``-``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Sequence

import numpy as np

from dks_jax import metrics, paths

RESULT_FILE = "result.json"
CSV_COLUMNS = ("config", "model", "dataset", "method", "label_noise", "seeds", "epochs",
               "top1_mean", "top1_std", "top5_mean", "top5_std")
STD_DDOF = 1
# Method pairs compared with Welch's t-test in the Markdown table (first vs second).
COMPARISONS = (("ds", "baseline"), ("dks", "baseline"), ("dks", "ds"), ("dhm", "baseline"),
               ("dhm", "ds"), ("dks", "dhm"))
METHOD_NAMES = {"baseline": "baseline", "ds": "DS", "dsn": "DSN", "dks": "DKS", "dhm": "DHM",
                "kd": "KD", "byot": "BYOT"}


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


def finished_result(run_dir) -> dict | None:
    """The ``result.json`` of a run the sweep finished, or None."""
    path = paths.as_path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_run(run_dir) -> RunRecord | None:
    """The finished run in ``run_dir``, or None (no config, or not finished)."""
    run_dir = paths.as_path(run_dir)
    result = finished_result(run_dir)
    if result is not None and "metrics" in result:
        return RunRecord(str(run_dir), result.get("config") or {}, result["metrics"],
                         result.get("wall_time_s"), result.get("device", ""),
                         result.get("command", ""))
    if not (run_dir / "config.json").exists():
        return None
    config = json.loads((run_dir / "config.json").read_text())
    records = metrics.read_metrics(run_dir)
    total = next((r["total_steps"] for r in records if "total_steps" in r), None)
    final = [r for r in records if "eval_top1/C1" in r and (total is None or r["step"] >= total)]
    if total is None or not final:
        return None
    evals = {k: v for k, v in final[-1].items() if k.startswith("eval_")}
    return RunRecord(str(run_dir), config, evals)


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

    xa, xb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(xa.mean() - xb.mean()) if xa.size and xb.size else math.nan
    if xa.size < 2 or xb.size < 2:
        return {"diff": diff, "t": math.nan, "dof": math.nan, "p": math.nan}
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    if va + vb == 0:
        return {"diff": diff, "t": math.nan, "dof": math.nan, "p": math.nan}
    t = diff / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
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
