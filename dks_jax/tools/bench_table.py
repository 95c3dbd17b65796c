"""README tables from the benchmark records (``results/benchmarks/*.json``).

    python -m dks_jax.tools.bench_table                       # every record under results/benchmarks
    python -m dks_jax.tools.bench_table results/a.json dir/   # given files and folders
    python -m dks_jax.tools.bench_table --output=/tmp/table.md --all
    python -m dks_jax.tools.bench_table --device=H100         # only records of matching devices

Prints (or writes) Markdown: one row per measurement (by default the newest record of each
configuration; ``--all`` keeps every record), then the speed targets where both sides of a ratio
were measured on the same device: the DKS step-time overhead over the plain baseline against the
multiply-add ratio, and JAX over PyTorch (measured in the same command).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from dks_jax import cli

DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[2] / "results" / "benchmarks"
REQUIRED_KEYS = (
    "device", "jax_version", "date", "command", "model", "aux", "method", "batch_size",
    "image_size", "dtype", "images_per_sec", "step_ms", "compile_s", "macs_per_image",
)
# A configuration: records with equal values here measure the same thing.
CONFIG_KEYS = ("device", "num_devices", "model", "aux", "branches", "method", "batch_size",
               "image_size", "dtype", "bn_group_size")
TORCH_TARGET = 1.2  # the target: JAX at least 1.2x PyTorch


def load_records(paths) -> list[dict]:
    """Every record in the given ``.json`` files and folders (recursively), sorted by time.

    Files that are not records (missing a required key) are skipped with a note on stderr.
    """
    files = []
    for p in map(pathlib.Path, paths):
        files.extend(sorted(p.rglob("*.json")) if p.is_dir() else [p])
    records = []
    for f in files:
        try:
            record = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
            continue
        missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            print(f"skipping {f}: not a benchmark record (missing {missing})", file=sys.stderr)
            continue
        record.setdefault("path", str(f))
        records.append(record)
    return sorted(records, key=lambda r: r.get("timestamp", r["date"]))


def latest(records: list[dict]) -> list[dict]:
    """The newest record of each configuration (``CONFIG_KEYS``), in first-seen order."""
    by_config = {}
    for r in records:  # sorted by time: later ones replace earlier ones
        by_config[tuple(r.get(k) for k in CONFIG_KEYS)] = r
    return list(by_config.values())


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f}"


def _device(r: dict) -> str:
    n = r.get("num_devices", 1)
    return r["device"] if n == 1 else f"{n} x {r['device']}"


def measurements_table(records: list[dict]) -> str:
    header = ("| device | model | aux | method | batch | px | dtype | images/s | step ms | "
              "compile s | GMAC/img | MFU | peak GiB | PyTorch images/s | JAX / PyTorch | JAX | date |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in records:
        torch = r.get("torch_images_per_sec")
        ratio = r["images_per_sec"] / torch if torch else None
        lines.append("| " + " | ".join([
            _device(r), r["model"], r["aux"], r["method"], str(r["batch_size"]),
            str(r["image_size"]), r["dtype"], _num(r["images_per_sec"]), _num(r["step_ms"], 2),
            _num(r["compile_s"]), f"{r['macs_per_image'] / 1e9:.2f}", _pct(r.get("mfu")),
            _gib(r.get("peak_memory_bytes")), _num(torch) if "torch_images_per_sec" in r else "-",
            f"{ratio:.2f}x" if ratio else "-", r["jax_version"], r["date"],
        ]) + " |")
    return "\n".join(lines)


def overhead_rows(records: list[dict]) -> list[dict]:
    """DKS (aux paper) vs the plain baseline (aux none) of the same model, device and sizes."""
    key = lambda r: (r["device"], r.get("num_devices", 1), r["model"], r["batch_size"],
                     r["image_size"], r["dtype"])
    baselines = {key(r): r for r in records if r["method"] == "baseline" and r["aux"] == "none"}
    rows = []
    for r in records:
        if r["method"] != "dks" or r["aux"] != "paper" or key(r) not in baselines:
            continue
        b = baselines[key(r)]
        rows.append({
            "device": _device(r), "model": r["model"], "batch_size": r["batch_size"],
            "image_size": r["image_size"], "dtype": r["dtype"],
            "baseline_ms": b["step_ms"], "dks_ms": r["step_ms"],
            "step_ratio": r["step_ms"] / b["step_ms"],
            "mac_ratio": r["macs_per_image"] / b["macs_per_image"],
            "dks_vs_torch": (r["images_per_sec"] / r["torch_images_per_sec"]
                             if r.get("torch_images_per_sec") else None),
        })
    return rows


def overhead_table(records: list[dict]) -> str:
    rows = overhead_rows(records)
    if not rows:
        return ""
    lines = [
        "| device | model | batch | px | dtype | baseline ms | DKS ms | step ratio | MAC ratio | "
        "step ratio <= MAC ratio | DKS JAX / PyTorch (target >= 1.2) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        met = "met" if row["step_ratio"] <= row["mac_ratio"] else "missed"
        vs = row["dks_vs_torch"]
        vs_text = "-" if vs is None else (
            f"{vs:.2f}x ({'met' if vs >= TORCH_TARGET else 'missed'})")
        lines.append("| " + " | ".join([
            row["device"], row["model"], str(row["batch_size"]), str(row["image_size"]),
            row["dtype"], _num(row["baseline_ms"], 2), _num(row["dks_ms"], 2),
            f"{row['step_ratio']:.2f}x", f"{row['mac_ratio']:.2f}x", met, vs_text,
        ]) + " |")
    return "\n".join(lines)


def render(records: list[dict]) -> str:
    """The Markdown of all tables (empty records: a one-line note)."""
    if not records:
        return "_No benchmark records._\n"
    parts = [measurements_table(records)]
    overhead = overhead_table(records)
    if overhead:
        parts.append("DKS overhead (target: step-time ratio at or below the multiply-add "
                     "ratio):\n\n" + overhead)
    return "\n\n".join(parts) + "\n"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("all", False, "every record, not the newest per config", flag_values=fv)
    flags.DEFINE_string("device", "", "only records whose device contains this text "
                        "(case-insensitive), e.g. H100", flag_values=fv)
    flags.DEFINE_string("output", "", "write the Markdown here instead of stdout", flag_values=fv)


def main(argv) -> str:
    """``argv``: record files or folders (default: results/benchmarks) and flags; returns the
    Markdown."""
    args, record_paths = cli.parse(define_flags, argv, "python -m dks_jax.tools.bench_table",
                                   __doc__)
    records = load_records(record_paths or [str(DEFAULT_DIR)])
    if args.device:
        records = [r for r in records if args.device.lower() in r["device"].lower()]
    if not args.all:
        records = latest(records)
    text = render(records)
    if args.output:
        pathlib.Path(args.output).write_text(text)
    else:
        print(text, end="")
    return text


def _command(argv) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    cli.run(_command)
