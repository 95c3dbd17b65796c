"""Training curves: one run's train vs test error per head, and a sweep's mean and std over seeds.

:func:`plot_curves`: train (dashed) vs test (solid) top-1 error per head (or per run) from a run's
``metrics.jsonl``, the layout of DKS Fig. 3 / Fig. 7, with gradient consistency in a second panel.
``python -m dks_jax.tools.analysis curves --workdir=RUN`` draws it.

:func:`plot_sweep`, the command line of this module:

    python -m dks_jax.tools.curves --workdir=results/cpu_study/runs --out=results/cpu_study

reads ``<workdir>/<config name>/seed<k>/metrics.jsonl`` (the folders ``dks_jax.tools.sweep`` trains in)
and writes, for every config, ``curves-<config name>.png`` (training loss, training top-1 of the main
head on the labels it trained on, test top-1 of the main head, against epochs), and for every group
of configs that share model, data set, label noise and epochs, ``curves-<group>.png`` with their
methods overlaid. Lines are the mean over seeds, bands the mean +- the sample standard deviation
(ddof=1), drawn at the steps every seed has logged. Needs matplotlib (``pip install -e .[plots]``).
It also writes ``curves.md``: per config, the values of :data:`FINAL` at the end of training (the
last step every finished seed logged), mean(std) over seeds: how well each method fits its
training data beside how it does on the test set.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from dks_jax import cli, metrics, paths

# (metric key in metrics.jsonl, panel title, scale to the plotted unit)
PANELS = (("loss", "training loss (objective)", 1.0),
          ("train_top1/C1", "training top-1 of C1 (%)", 100.0),
          ("eval_top1/C1", "test top-1 of C1 (%)", 1.0))


# The end-of-training values of ``curves.md``: (key, column, scale).
FINAL = (("loss", "training loss (objective)", 1.0),
         ("loss/ce/0", "training cross-entropy of C1", 1.0),
         ("train_top1/C1", "training top-1 of C1 (%)", 100.0),
         ("eval_top1/C1", "test top-1 of C1 (%)", 1.0))

FINAL_INTRO = """# Training curves: the end of training

Finished runs, at the last step every seed logged; mean(std) over seeds, std the sample standard
deviation. The training values are averages over the last logging interval, on the augmented
training batches and the labels trained on (the noisy ones where the labels are noisy).

"""


def pyplot():
    """matplotlib's pyplot with the file-only Agg backend."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Plots need matplotlib: pip install -e '.[plots]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out_png, *, dpi: int = 120, tight: bool = True) -> None:
    """Writes ``fig`` as a PNG (a local or ``gs://`` path) and closes it."""
    out = paths.as_path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # epath: local or gs://
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    pyplot().close(fig)


def curves(workdir) -> dict:
    """Per-head error curves of one run from its ``metrics.jsonl``.

    Returns ``{"x_label": "epoch"|"step", "train": {head: (x, err%)}, "test": {head: (x, err%)},
    "consistency": {head: (x, cos)}}``. Train error is ``100 * (1 - train_top1)`` (the logged
    running average over the steps since the previous log line, with augmentation, in training
    mode); test error is ``100 - eval_top1``.
    """
    records = metrics.read_metrics(workdir)
    if not records:
        raise FileNotFoundError(f"No metrics in {paths.as_path(workdir) / metrics.METRICS_FILE}.")
    spe = next((r["steps_per_epoch"] for r in records if "steps_per_epoch" in r), None)
    x_of = (lambda s: s / spe) if spe else (lambda s: s)
    out: dict[str, Any] = {"x_label": "epoch" if spe else "step", "train": {}, "test": {},
                           "consistency": {}}
    for r in records:
        for key, value in r.items():
            if not isinstance(value, (int, float)):
                continue
            if key.startswith("train_top1/"):
                out["train"].setdefault(key.split("/", 1)[1], []).append(
                    (x_of(r["step"]), 100.0 * (1.0 - value)))
            elif key.startswith("eval_top1/"):
                out["test"].setdefault(key.split("/", 1)[1], []).append(
                    (x_of(r["step"]), 100.0 - value))
            elif key.startswith("grad_cos/"):
                out["consistency"].setdefault(key.split("/", 1)[1], []).append(
                    (x_of(r["step"]), value))
    for part in ("train", "test", "consistency"):
        out[part] = {h: tuple(np.asarray(v) for v in zip(*pts, strict=True))
                     for h, pts in out[part].items()}
    return out


def plot_curves(workdir, out_png, *, heads: Sequence[str] | None = None, labels=None,
                title: str = "") -> dict:
    """Train (dashed) vs test (solid) top-1 error per head, DKS Fig. 3 / Fig. 7 style, as PNG.

    ``workdir``: one run folder, or a list of them (then one colour per run, main head C1 only
    unless ``heads`` says otherwise; ``labels`` name the runs, default the folder names). A second
    panel shows gradient consistency (``grad_cos/*``) when the runs logged it. Returns the curves.
    """
    plt = pyplot()
    workdirs = [workdir] if isinstance(workdir, (str, bytes)) or hasattr(workdir, "joinpath") \
        else list(workdir)
    runs = [curves(w) for w in workdirs]
    labels = list(labels) if labels else [paths.as_path(w).name for w in workdirs]
    if heads is None:
        heads = sorted(runs[0]["test"] or runs[0]["train"], key=_head_key) if len(runs) == 1 \
            else ["C1"]
    has_cos = any(r["consistency"] for r in runs)
    fig, axes = plt.subplots(1, 2 if has_cos else 1, figsize=(11 if has_cos else 6.5, 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = [(run, label, head) for run, label in zip(runs, labels, strict=True) for head in heads]
    for i, (run, label, head) in enumerate(series):
        colour = colours[i % len(colours)]
        name = head if len(runs) == 1 else (label if len(heads) == 1 else f"{label} {head}")
        if head in run["train"]:
            x, y = run["train"][head]
            ax.plot(x, y, "--", color=colour, lw=1.2, label=f"{name} train")
        if head in run["test"]:
            x, y = run["test"][head]
            ax.plot(x, y, "-", color=colour, lw=1.6, marker="o" if len(x) < 20 else None,
                    ms=3, label=f"{name} test")
    ax.set_xlabel(runs[0]["x_label"])
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or ("training (dashed) and test (solid) error" if len(runs) == 1
                           else "main head: training (dashed) and test (solid) error"), fontsize=9)
    if has_cos:
        ax2 = axes[0, 1]
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            for j, (head, (x, y)) in enumerate(sorted(run["consistency"].items())):
                ax2.plot(x, y, color=colours[(i * 3 + j) % len(colours)],
                         label=f"{label} C1 vs {head}" if len(runs) > 1 else f"C1 vs {head}")
        ax2.set_xlabel(runs[0]["x_label"])
        ax2.set_ylabel("cosine of CE gradients at the shared map")
        ax2.set_title("gradient consistency (DKS supplement, Prop. 1)", fontsize=9)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    save_png(fig, out_png)
    return runs[0] if len(runs) == 1 else {"runs": runs}


def _head_key(name: str):
    return (1, 0) if name == "ensemble" else (0, int(name[1:]) if name[1:].isdigit() else 99)




def read_curve(run_dir, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, values)`` of ``key`` in one run's metrics.jsonl; the last record wins where a
    resumed run logged a step twice."""
    path = paths.as_path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return np.zeros(0), np.zeros(0)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    spe = next((r["steps_per_epoch"] for r in records if "steps_per_epoch" in r), None)
    by_step = {r["step"]: r[key] for r in records if key in r}
    steps = np.array(sorted(by_step), np.float64)
    values = np.array([by_step[s] for s in sorted(by_step)], np.float64)
    return (steps / spe if spe else steps), values


def seed_runs(folder) -> list:
    """The ``seed<k>`` run folders of one config, in seed order."""
    folder = paths.as_path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"seed(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def band(runs: Sequence, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(epochs, mean, std, seeds)`` over the runs at the epochs every run has logged."""
    found = [read_curve(r, key) for r in runs]
    found = [c for c in found if c[0].size]
    if not found:
        return np.zeros(0), np.zeros(0), np.zeros(0), 0
    common = sorted(set.intersection(*(set(np.round(e, 6)) for e, _ in found)))
    stacked = np.array([[v[np.argmin(np.abs(e - x))] for x in common] for e, v in found])
    std = stacked.std(axis=0, ddof=1) if len(found) > 1 else np.zeros(len(common))
    return np.array(common), stacked.mean(axis=0), std, len(found)


def _config_of(folder) -> dict:
    for run in seed_runs(folder):
        for name in ("result.json", "config.json"):
            path = run / name
            if path.exists():
                data = json.loads(path.read_text())
                return data.get("config", data) if name == "result.json" else data
    return {}


def plot(groups: dict[str, list], out_file, title: str) -> None:
    """One figure, a panel per entry of :data:`PANELS`, a line and band per config of ``groups``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (key, label, scale) in zip(axes, PANELS, strict=True):
        for name, runs in groups.items():
            x, mean, std, n = band(runs, key)
            if not n:
                continue
            line, = ax.plot(x, mean * scale, label=f"{name} ({n} seeds)",
                            marker="o" if key.startswith("eval") else None, markersize=3)
            ax.fill_between(x, (mean - std) * scale, (mean + std) * scale, alpha=0.2,
                            color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=8)
    fig.suptitle(title + "  (mean and +-1 sample std over seeds)")
    fig.tight_layout()
    save_png(fig, out_file, dpi=100, tight=False)


def plot_sweep(workdir, out_dir, names: Sequence[str] | None = None) -> list:
    """Writes the per-config and per-group PNGs (see the module doc); returns their paths."""
    workdir, out_dir = paths.as_path(workdir), paths.as_path(out_dir)
    if names is None:
        names = sorted(p.name for p in workdir.iterdir() if p.is_dir()) if workdir.exists() else []
    written: list[pathlib.Path] = []
    groups: dict[tuple, dict[str, list[pathlib.Path]]] = {}  # (model, noise, epochs) -> runs
    for name in names:
        runs = seed_runs(workdir / name) if (workdir / name).exists() else []
        runs = [r for r in runs if (r / "metrics.jsonl").exists()]
        if not runs:
            continue
        config = _config_of(workdir / name)
        key = (config.get("model", ""), config.get("label_noise", 0.0) or 0.0,
               config.get("num_epochs", ""))
        groups.setdefault(key, {})[name] = runs
        out = out_dir / f"curves-{name}.png"
        plot({name: runs}, out, name)
        written.append(out)
    for (model, noise, epochs), members in groups.items():
        if len(members) < 2:
            continue
        label = f"{model}-noise{noise:g}-{epochs:g}ep" if isinstance(epochs, (int, float)) \
            else f"{model}-noise{noise:g}"
        out = out_dir / f"curves-{label}.png"
        plot(members, out, f"{model}, label noise {noise:g}")
        written.append(out)
    if groups:
        out = out_dir / "curves.md"
        out.write_text(FINAL_INTRO + final_table(workdir, [n for m in groups.values() for n in m]))
        written.append(out)
    return written


def final_table(workdir, names: Sequence[str]) -> str:
    """Markdown: per config, :data:`FINAL` at the end of training, mean(std) over the seeds that
    finished (``result.json``; a run in progress would cut the common steps short)."""
    workdir = paths.as_path(workdir)
    header = ["Config", "Seeds", "Epoch"] + [column for _, column, _ in FINAL]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        runs = [r for r in seed_runs(workdir / name)
                if (r / "metrics.jsonl").exists() and (r / "result.json").exists()]
        cells, last_epoch = [], None
        for key, _, scale in FINAL:
            x, mean, std, n = band(runs, key)
            if not n:
                cells.append("-")
                continue
            last_epoch = x[-1] if last_epoch is None else last_epoch
            digits = 3 if key.startswith("loss") else 2
            cells.append(f"{mean[-1] * scale:.{digits}f}({std[-1] * scale:.{digits}f})")
        if last_epoch is not None:
            lines.append(f"| {name} | {len(runs)} | {last_epoch:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "the sweep's workdir", flag_values=fv, required=True)
    flags.DEFINE_string("out", None, "folder for the PNGs and curves.md", flag_values=fv,
                        required=True)
    flags.DEFINE_list("names", [], "config folders (default: all)", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    fv, _ = cli.parse(define_flags, argv, "python -m dks_jax.tools.curves", __doc__)
    for path in plot_sweep(fv.workdir, fv.out, fv.names or None):
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
