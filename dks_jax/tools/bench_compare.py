"""The speed comparison in one command: JAX and PyTorch, the same sizes, the same device.

    python -m dks_jax.tools.bench_compare                     # every case below
    python -m dks_jax.tools.bench_compare --cases=resnet18_baseline,resnet18_dks --steps=50
    python -m dks_jax.tools.bench_compare --dry_run           # print the commands only
    python -m dks_jax.tools.bench_compare -- --num_devices=1  # more benchmark flags after --

Each case is one ``python -m dks_jax.tools.benchmark ... --compare_torch`` in a subprocess of its own (a
fresh process per case, so that no case holds the GPU's memory while the next runs; within it the
PyTorch reference warms up first, then JAX, and their timed rounds alternate). Every case writes one
JSON record to ``--output``; at the end the records of this invocation are printed as the README
table (``bench_table.py``). A case that fails is reported and the others still run; the exit status
is 1 if any failed.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from dks_jax import cli
from dks_jax.tools import bench_table

REPO = pathlib.Path(__file__).resolve().parents[2]

# name -> benchmark flags. ImageNet cases: batch 256, 224 px, bf16; the torch comparison
# needs a model the reference has (torchvision-layout ResNets).
CASES = {
    "resnet18_baseline": dict(model="resnet18", method="baseline", aux="none", batch_size=256,
                              image_size=224, dtype="bfloat16", torch=True),
    "resnet18_dks": dict(model="resnet18", method="dks", aux="paper", batch_size=256,
                         image_size=224, dtype="bfloat16", torch=True),
    "resnet50_baseline": dict(model="resnet50", method="baseline", aux="none", batch_size=256,
                              image_size=224, dtype="bfloat16", torch=True),
    "cifar_resnet32_dks": dict(model="cifar_resnet32", method="dks", aux="paper", batch_size=64,
                               image_size=32, dtype="bfloat16", torch=False),
    "cifar_resnet32_baseline": dict(model="cifar_resnet32", method="baseline", aux="none",
                                    batch_size=64, image_size=32, dtype="bfloat16", torch=False),
}


def case_command(name: str, args, extra: Sequence[str] = ()) -> list[str]:
    spec = dict(CASES[name])
    with_torch = spec.pop("torch") and not args.no_torch
    cmd = [args.python, "-m", "dks_jax.tools.benchmark"]
    cmd += [f"--{k}={v}" for k, v in spec.items()]
    cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--output={args.output}"]
    if with_torch:
        cmd.append("--compare_torch")
        if args.torch_python:
            cmd.append(f"--torch_python={args.torch_python}")
        cmd.append(f"--torch_compile={args.torch_compile}")
    return cmd + list(extra)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("cases", list(CASES), f"from: {', '.join(CASES)}", flag_values=fv)
    flags.DEFINE_integer("steps", 50, "timed steps per case", flag_values=fv)
    flags.DEFINE_integer("warmup", 5, "untimed steps per case", flag_values=fv)
    flags.DEFINE_string("output", "results/benchmarks",
                        "folder of the records (relative to the repository root)", flag_values=fv)
    flags.DEFINE_string("python", sys.executable, "Python with JAX and dks_jax's needs", flag_values=fv)
    flags.DEFINE_string("torch_python", "", "Python with PyTorch (default: --python)", flag_values=fv)
    flags.DEFINE_enum("torch_compile", "auto", ["auto", "on", "off"], "torch.compile", flag_values=fv)
    flags.DEFINE_bool("no_torch", False, "JAX only", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "print the commands, run nothing", flag_values=fv)


def main(argv) -> int:
    """``argv`` without the program name; arguments after ``--`` go to every benchmark."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args, rest = cli.parse(define_flags, argv, "python -m dks_jax.tools.bench_compare", __doc__)
    if rest:
        raise cli.UsageError(f"Unexpected arguments {rest}: give benchmark flags after --.")
    names = [n.strip() for n in args.cases if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise cli.UsageError(f"unknown cases {unknown}; valid: {', '.join(CASES)}")

    out = REPO / args.output  # an absolute --output stays as it is
    before = set(out.glob("*.json")) if out.is_dir() else set()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    failed = []
    for name in names:
        cmd = case_command(name, args, extra)
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        start = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        print(f"== {name}: exit {proc.returncode} after {time.time() - start:.0f} s", flush=True)
        if proc.returncode:
            failed.append(name)
    if not args.dry_run:
        new = sorted(set(out.glob("*.json")) - before) if out.is_dir() else []
        print()
        print(bench_table.render(bench_table.load_records(new)), end="")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
