"""Anytime (early-exit) prediction of a trained run: accuracy against multiply-adds, and speed.

    python -m dks_jax.tools.anytime --workdir=runs/r14 --from=latest --rule=max_softmax \\
        --out=results/anytime

Loads the run's checkpoint and its evaluation data as ``python -m dks_jax.evaluate`` does
(``evaluate.load_run``; ``--config.<field>=<value>`` change the run's config, e.g.
``--config.data_dir=...``), computes every head's logits on the evaluation split, and writes to
``--out`` (default ``<workdir>/anytime``) ``anytime-<source>-step<k>-<rule>.png`` (top-1 against
mean multiply-adds per image: early exit at every threshold, every head alone, the ensemble),
``.md`` (the tables) and ``.json`` (everything). The cost accounting is ``dks_jax.anytime``'s: an
example that exits at a head has paid the main path up to that head's fork and every head
evaluated on the way.

Then it times, on the first ``--timing_images`` evaluation images, in batches of
``--timing_batch``, on one device: the full model (every head), the main path alone (what the
export runs), and the early-exit predictor (``anytime.EarlyExit``, which skips the exited
examples' work) at three thresholds: every example out at the shallowest head, none out (the
predictor's overhead), and the cheapest threshold of the curve whose top-1 is within
``--tolerance`` points of C1 alone. Each is run once untimed (compilation), then all are timed in
turn, ``--repeats`` rounds (so that a change of the machine's load touches them alike); images/s
is the median over the rounds (min and max beside it), and images per CPU second the same over
the process's CPU time (all threads: less sensitive than the wall clock to other programs that
share the machine). It also checks that the predictor's answers are the full model's: which head
answered each example, and the largest difference of the logits. ``--timing_images=0`` skips the
timing.

``--from=export`` is refused: an export holds the main path alone, which has no early exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence

from dks_jax import xla_flags

if __name__ == "__main__":  # the command line: the CPU defaults of dks_jax.main, before JAX starts
    xla_flags.apply_cpu_defaults()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dks_jax import anytime, cli, config_base, errors, evaluate, parallel, paths  # noqa: E402
from dks_jax.tools import curves  # noqa: E402

PROG = "python -m dks_jax.tools.anytime"


def _taus(text: str) -> tuple[float, ...] | None:
    if not text.strip():
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise errors.ConfigError(f"--taus={text!r}: give numbers separated by commas, e.g. "
                                 "0,0.5,0.9,inf") from None


def _images(dataset, batch_size: int, count: int) -> np.ndarray:
    """The first ``count`` evaluation images (padding dropped), on the host."""
    out, have = [], 0
    for batch in dataset.eval_iterator(batch_size):
        if have >= count:
            break
        x = np.asarray(jax.device_get(batch["image"]))[np.asarray(batch["mask"], bool)]
        out.append(x[: count - have])
        have += len(out[-1])
    return np.concatenate(out) if out else np.zeros((0,))


def _throughput(runs: Sequence, images: np.ndarray, repeats: int) -> list[dict]:
    """Images/s of every ``run(images)`` (each returns host arrays): one untimed run of each,
    then ``repeats`` rounds that time each once, in turn, so that a change of the machine's load
    touches them all alike."""
    for run in runs:
        run(images)
    seconds: list[list[float]] = [[] for _ in runs]
    cpu: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, times, cpu_times in zip(runs, seconds, cpu, strict=True):
            start, start_cpu = time.perf_counter(), time.process_time()
            run(images)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
    out = []
    for times, cpu_times in zip(seconds, cpu, strict=True):
        rates = [len(images) / t for t in times]
        out.append({"images_per_sec": statistics.median(rates), "min": min(rates),
                    "max": max(rates), "seconds": times,
                    "images_per_cpu_sec": statistics.median(len(images) / t for t in cpu_times),
                    "cpu_seconds": cpu_times})
    return out


def _batched(fn, state, batch: int):
    def run(images):
        return [jax.device_get(fn(state, images[i:i + batch])) for i in range(0, len(images), batch)]

    return run


def _device() -> str:
    d = jax.devices()[0]
    text = f"{d.platform} ({d.device_kind})"
    if d.platform == "cpu":
        name = platform.processor() or ""
        try:
            for line in open("/proc/cpuinfo", encoding="utf-8"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        text += f", {name + ', ' if name else ''}{os.cpu_count()} cores"
    return text


def timing(model, images: np.ndarray, logits: Sequence[np.ndarray], result: anytime.Curve,
           costs: anytime.HeadCosts, *, rule: str, batch: int, repeats: int,
           tolerance: float) -> dict:
    """The speed of the full model, the main path and the early-exit predictor on ``images``
    (see the module doc), and the predictor's agreement with the full model's ``logits`` of those
    images."""
    graphdef, state = nnx.split(model)

    def every_head(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    def main_path(state, x):  # the branches' outputs are unused: XLA prunes them
        return nnx.merge(graphdef, state)(x, train=False)[0]

    rows: list[dict] = [{"name": "full model (every head)", "tau": None, "macs": costs.full},
                        {"name": "main path alone (C1)", "tau": None, "macs": costs.alone[0]}]
    runs = [_batched(jax.jit(every_head), state, batch), _batched(jax.jit(main_path), state, batch)]
    first, none = (0.0, math.inf) if rule == "max_softmax" else (math.inf, -math.inf)
    c1 = result.heads[0].top1
    good = [p for p in result.points if p.top1 >= c1 - tolerance and p.tau is not None]
    chosen = [("early exit: all at the first head", first), ("early exit: none exits", none)]
    if good:
        best = min(good, key=lambda p: p.macs)
        assert best.tau is not None
        chosen.append((f"early exit: cheapest within {tolerance:g} pt of C1", best.tau))
    predictor = anytime.EarlyExit(model, rule=rule, batch_size=batch)
    subset = [z[: len(images)] for z in logits]
    for name, tau in chosen:
        out = predictor(images, tau)
        want = anytime.exit_heads(subset, rule, tau)
        ref = np.stack(subset)[out.head, np.arange(len(images))]
        rows.append({"name": name, "tau": tau, "macs": float(out.macs.mean()),
                     "same_head": int(np.sum(out.head == want)),
                     "max_abs_logit_diff": float(np.max(np.abs(out.logits - ref)))})
        runs.append(lambda x, tau=tau: predictor(x, tau))
    for row, speed in zip(rows, _throughput(runs, images, repeats), strict=True):
        row.update(speed)
    main, main_cpu = rows[1]["images_per_sec"], rows[1]["images_per_cpu_sec"]
    for row in rows:
        row["vs_main"] = row["images_per_sec"] / main
        row["cpu_vs_main"] = row["images_per_cpu_sec"] / main_cpu
    return {"device": _device(), "images": len(images), "batch": batch, "repeats": repeats,
            "rows": rows}


def analyse(workdir, config=None, *, source: str = "latest", rule: str = "max_softmax",
            taus: Sequence[float] | None = None, batch_size: int = 0, timing_images: int = 2048,
            timing_batch: int = 256, repeats: int = 3, tolerance: float = 0.5) -> dict:
    """The report of ``--workdir`` (see the module doc): a JSON-able dict."""
    if source == "export":
        raise errors.ConfigError(
            "--from=export: an export holds the main path alone (no auxiliary branches), so "
            "nothing can exit early; use --from=latest or --from=best.")
    if rule not in anytime.RULES:
        raise errors.ConfigError(f"--rule={rule!r}; valid: {', '.join(anytime.RULES)}.")
    mesh = parallel.create_mesh(jax.local_devices()[:1])  # the predictor runs on one device
    run = evaluate.load_run(workdir, config, source=source, batch_size=batch_size, mesh=mesh)
    model = run.model()
    if model.num_heads < 2:
        raise errors.ConfigError(
            f"{workdir}: the model ({run.config.model}, aux={run.config.aux!r}) has no auxiliary "
            "branches, so nothing can exit early.")
    image_size = int(run.dataset.image_shape[0])
    costs = anytime.head_costs(model, image_size=image_size)
    logits, labels = anytime.head_logits(model, run.dataset.eval_iterator(run.batch_size))
    result = anytime.curve(logits, labels, costs, rule, taus)
    report = {"workdir": str(workdir), "model": str(run.config.model), "aux": str(run.config.aux),
              "method": str(run.config.method), "source": source, "step": run.step,
              "dataset": str(run.config.dataset), "split": str(run.config.eval_split),
              "image_size": image_size, "costs": costs.as_dict(), "curve": result.as_dict(),
              "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__}
    if timing_images > 0:
        images = _images(run.dataset, run.batch_size, timing_images)
        report["timing"] = timing(model, images, logits, result, costs, rule=rule,
                                  batch=timing_batch, repeats=repeats, tolerance=tolerance)
    return report


def _m(macs: float) -> str:
    return f"{macs / 1e6:.2f}"


def _exits(exits: dict, names: Sequence[str]) -> str:
    return " / ".join(f"{exits.get(n, 0.0):.1f}" for n in names)


def to_markdown(report: dict) -> str:
    """The report's tables (heads, early exit per threshold, speed)."""
    costs, c = report["costs"], report["curve"]
    names = costs["names"]
    order = [names[h] for h in anytime.availability_order(len(names))]
    main_macs = costs["alone"][0]
    lines = [
        f"# Anytime prediction: {report['model']} (aux={report['aux']}, {report['method']})", "",
        f"{report['source']} checkpoint, step {report['step']}; {report['dataset']}, split "
        f"{report['split']}, {c['count']} images; rule `{c['rule']}`. MACs: multiply-adds per "
        f"image ({costs['method']} count), in millions. An example that exits at a head paid the "
        "main path up to that head's fork and every head evaluated on the way.", "",
        "| head | fork MACs | head MACs | alone MACs | exit MACs (cascade) | top-1 alone % |",
        "|---|---:|---:|---:|---:|---:|"]
    for h, name in enumerate(names):
        lines.append(f"| {name} | {_m(costs['fork'][h])} | {_m(costs['head'][h])} | "
                     f"{_m(costs['alone'][h])} | {_m(costs['exit'][h])} | "
                     f"{c['heads'][h]['top1']:.2f} |")
    lines += ["", f"Early exit (heads available in the order {', '.join(order)}):", "",
              f"| tau | top-1 % | mean MACs | vs C1 alone | answered by {' / '.join(order)} % |",
              "|---|---:|---:|---:|---|"]
    for p in c["points"]:
        lines.append(f"| {p['tau']:g} | {p['top1']:.2f} | {_m(p['macs'])} | "
                     f"{p['macs'] / main_macs:.2f}x | {_exits(p['exits'], order)} |")
    e = c["ensemble"]
    lines.append(f"| ensemble of all heads | {e['top1']:.2f} | {_m(e['macs'])} | "
                 f"{e['macs'] / main_macs:.2f}x | - |")
    t = report.get("timing")
    if t:
        lines += ["", f"Speed on {t['device']}: {t['images']} images in batches of {t['batch']}, "
                  f"median of {t['repeats']} timed rounds (each predictor once per round, in turn) after "
                  "one untimed run of each (min - max); images per CPU second: the images over "
                  "the process's CPU time (all its threads), less sensitive to other programs on "
                  "the machine than the wall clock.", "",
                  "| predictor | tau | images/s | min - max | vs main path | images per CPU s | "
                  "vs main path | mean MACs | same head as the full model | max logit diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            tau = "-" if r["tau"] is None else f"{r['tau']:g}"
            same = f"{r['same_head']}/{t['images']}" if "same_head" in r else "-"
            diff = f"{r['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in r else "-"
            lines.append(f"| {r['name']} | {tau} | {r['images_per_sec']:.0f} | {r['min']:.0f} - "
                         f"{r['max']:.0f} | {r['vs_main']:.2f}x | {r['images_per_cpu_sec']:.0f} | "
                         f"{r['cpu_vs_main']:.2f}x | {_m(r['macs'])} | {same} | {diff} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_png) -> None:
    """Top-1 against mean MACs per image: the early-exit curve, each head alone, the ensemble."""
    plt = curves.pyplot()
    c = report["curve"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = c["points"]
    ax.plot([p["macs"] / 1e6 for p in pts], [p["top1"] for p in pts], "o-", ms=4,
            label=f"early exit ({c['rule']}, one point per tau)")
    span = max(p["macs"] for p in pts) - min(p["macs"] for p in pts) or 1.0
    last = -math.inf
    for p in sorted(pts, key=lambda p: p["macs"]):  # label the taus that do not overlap
        if p["macs"] - last >= 0.04 * span:
            ax.annotate(f"{p['tau']:g}", (p["macs"] / 1e6, p["top1"]), fontsize=6,
                        textcoords="offset points", xytext=(3, -8))
            last = p["macs"]
    for h in c["heads"]:
        ax.plot(h["macs"] / 1e6, h["top1"], "s", ms=7)
        ax.annotate(h["label"], (h["macs"] / 1e6, h["top1"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    e = c["ensemble"]
    ax.plot(e["macs"] / 1e6, e["top1"], "*", ms=11, color="black", label="ensemble of all heads")
    ax.set_xlabel(f"mean multiply-adds per image (M, {report['costs']['method']} count)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report['model']} aux={report['aux']} ({report['method']}), "
                 f"{report['source']} step {report['step']}: {c['count']} {report['split']} images",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    curves.save_png(fig, out_png)


def write(report: dict, out_dir) -> tuple:
    """``<out_dir>/anytime-<source>-step<k>-<rule>.{json,md,png}``; returns the three paths."""
    out_dir = paths.as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"anytime-{report['source']}-step{report['step']}-{report['curve']['rule']}"
    json_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    md_path.write_text(to_markdown(report))
    plot(report, png_path)
    return json_path, md_path, png_path


def main(argv: Sequence[str]) -> int:
    """``argv`` without the program name; ``--config.<field>=<value>`` change the run's config."""
    overrides = [a for a in argv if a.startswith("--config.")]
    own = [a for a in argv if a not in overrides]

    def define(fv):
        flags.DEFINE_string("workdir", None, "the run folder", flag_values=fv, required=True)
        flags.DEFINE_enum("from", "latest", list(evaluate.SOURCES),
                          "the checkpoint (export: refused, it has no branches)", flag_values=fv)
        flags.DEFINE_enum("rule", "max_softmax", list(anytime.RULES),
                          "exit when max softmax >= tau, or when entropy (nats) <= tau",
                          flag_values=fv)
        flags.DEFINE_string("taus", "", "thresholds, comma-separated (inf allowed); default: "
                            "anytime.default_taus(rule)", flag_values=fv)
        flags.DEFINE_integer("batch_size", 0, "evaluation batch; 0: the run's eval_batch_size",
                             flag_values=fv)
        flags.DEFINE_string("out", "", "output folder (default <workdir>/anytime)", flag_values=fv)
        flags.DEFINE_integer("timing_images", 2048, "images timed (0: no timing)", flag_values=fv)
        flags.DEFINE_integer("timing_batch", 256, "batch of the timing", flag_values=fv)
        flags.DEFINE_integer("repeats", 3, "timed runs per predictor", flag_values=fv)
        flags.DEFINE_float("tolerance", 0.5, "top-1 points below C1 alone allowed for the timed "
                           "'cheapest' threshold", flag_values=fv)

    fv, _ = cli.parse(define, own, PROG, __doc__)
    logging.getLogger().setLevel(logging.INFO)
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if fv.repeats < 1 or fv.timing_batch < 1 or fv.timing_images < 0:
        raise cli.UsageError(f"{PROG}: --repeats and --timing_batch must be >= 1, "
                             "--timing_images >= 0")
    config = config_base.override(config_base.from_run(fv.workdir), overrides)
    report = analyse(fv.workdir, config, source=str(fv["from"].value), rule=fv.rule,
                     taus=_taus(fv.taus), batch_size=fv.batch_size,
                     timing_images=fv.timing_images, timing_batch=fv.timing_batch,
                     repeats=fv.repeats, tolerance=fv.tolerance)
    paths_written = write(report, fv.out or paths.as_path(fv.workdir) / "anytime")
    print(to_markdown(report), flush=True)
    print("Wrote " + ", ".join(str(p) for p in paths_written), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
