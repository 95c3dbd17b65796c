"""The speed comparison in one command: JAX and PyTorch, the same sizes, the same device.

    python benchmarks/compare.py                              # every case below
    python benchmarks/compare.py --cases resnet18_baseline,resnet18_dks --steps 50
    python benchmarks/compare.py --dry_run                    # print the commands only

Each case is one ``python -m dks_jax.benchmark ... --compare_torch`` in a subprocess of its own (a
fresh process per case: the PyTorch reference runs first, then JAX, so neither holds the GPU's memory
while the other runs). Every case writes one JSON record to ``--output``; at the end the records of
this invocation are printed as the README table (``make_table.py``). A case that fails is reported
and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_table  # noqa: E402

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


def case_command(name: str, args) -> list[str]:
    spec = dict(CASES[name])
    with_torch = spec.pop("torch") and not args.no_torch
    cmd = [args.python, "-m", "dks_jax.benchmark"]
    cmd += [f"--{k}={v}" for k, v in spec.items()]
    cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--output={args.output}"]
    if with_torch:
        cmd.append("--compare_torch")
        if args.torch_python:
            cmd.append(f"--torch_python={args.torch_python}")
        cmd.append(f"--torch_compile={args.torch_compile}")
    return cmd + list(args.extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results",
                   help="folder of the records (relative to the repository root)")
    p.add_argument("--python", default=sys.executable, help="Python with JAX and dks_jax's needs")
    p.add_argument("--torch_python", default="", help="Python with PyTorch (default: --python)")
    p.add_argument("--torch_compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--no_torch", action="store_true", help="JAX only")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("extra", nargs="*", help="more dks_jax.benchmark flags (after --)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")

    out = REPO / args.output  # an absolute --output stays as it is
    before = set(out.glob("*.json")) if out.is_dir() else set()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    failed = []
    for name in names:
        cmd = case_command(name, args)
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
        print(make_table.render(make_table.load_records(new)), end="")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
