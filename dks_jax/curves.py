"""Training curves of a sweep: mean and standard-deviation band over seeds, per config, as PNGs.

    python -m dks_jax.curves --workdir=results/cpu_study/runs --out=results/cpu_study

reads ``<workdir>/<config name>/seed<k>/metrics.jsonl`` (the folders ``dks_jax.sweep`` trains in)
and writes, for every config, ``curves-<config name>.png`` (training loss, training top-1 of the main
head on the labels it trained on, test top-1 of the main head, against epochs), and for every group
of configs that share model, data set, label noise and epochs, ``curves-<group>.png`` with their
methods overlaid. Lines are the mean over seeds, bands the mean +- the sample standard deviation
(ddof=1), drawn at the steps every seed has logged. Needs matplotlib (``pip install -e .[plots]``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

import numpy as np

from dks_jax import paths

# (metric key in metrics.jsonl, panel title, scale to the plotted unit)
PANELS = (("loss", "training loss (objective)", 1.0),
          ("train_top1/C1", "training top-1 of C1 (%)", 100.0),
          ("eval_top1/C1", "test top-1 of C1 (%)", 1.0))


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
    curves = [read_curve(r, key) for r in runs]
    curves = [c for c in curves if c[0].size]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0), 0
    common = sorted(set.intersection(*(set(np.round(e, 6)) for e, _ in curves)))
    stacked = np.array([[v[np.argmin(np.abs(e - x))] for x in common] for e, v in curves])
    std = stacked.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.array(common), stacked.mean(axis=0), std, len(curves)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out_file = paths.as_path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out_file), dpi=100)
    plt.close(fig)


def plot_sweep(workdir, out_dir, names: Sequence[str] | None = None) -> list:
    """Writes the per-config and per-group PNGs (see the module doc); returns their paths."""
    workdir, out_dir = paths.as_path(workdir), paths.as_path(out_dir)
    if names is None:
        names = sorted(p.name for p in workdir.iterdir() if p.is_dir()) if workdir.exists() else []
    written, groups = [], {}
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
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dks_jax.curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the sweep's workdir")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--names", default="", help="config folders, comma-separated (default all)")
    args = parser.parse_args(argv)
    names = [n for n in args.names.split(",") if n] or None
    for path in plot_sweep(args.workdir, args.out, names):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
