"""Prints the README's model tables, computed by the code: ``python -m dks_jax.models.summary``.

Table 1 checks every backbone (``aux="none"``) against a published parameter count. Table 2 gives,
per model and branch design, the main path's parameters and multiply-adds (MACs per image,
forward) and each auxiliary branch's, at the papers' class counts (CIFAR-100, ImageNet-1k) and
input sizes (32, 224). Nothing is materialised (see ``models.complexity``). ``--ablations`` adds
the DKS ablation designs and the optional branches (ResNet-18's C4).
"""

from __future__ import annotations

import argparse
import sys

from dks_jax import models


def _macs(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f} G"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _classes(name: str) -> int:
    return 1000 if models.spec(name).image_size == 224 else 100


def backbone_table(names: tuple[str, ...] | None = None) -> str:
    """Backbones (aux="none") against the published parameter counts."""
    lines = [
        "| model | classes | params (ours) | MACs (ours) | published params, source |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in names or models.names():
        classes, published = models.spec(name).reference
        c = models.complexity(name, classes, aux="none")["main"]
        lines.append(
            f"| {name} | {classes} | {c['params']:,} | {_macs(c['macs'])} | {published} |"
        )
    return "\n".join(lines)


def rows(
    names: tuple[str, ...] | None = None, *, ablations: bool = False
) -> list[tuple[str, str, dict]]:
    """(model, design label, complexity) for every row of the branch table."""
    out = []
    for name in names or models.names():
        k = _classes(name)
        out.append((name, "paper", models.complexity(name, k, aux="paper")))
        if not ablations:
            continue
        designs = models.spec(name).aux
        if any(not b.default for b in designs["paper"]):
            every = "C1" + "".join(b.name for b in designs["paper"])
            out.append((name, f"paper, {every}", models.complexity(name, k, branches=every)))
        for aux in designs:
            if aux != "paper":
                out.append((name, aux, models.complexity(name, k, aux=aux)))
    return out


def branch_table(names: tuple[str, ...] | None = None, *, ablations: bool = False) -> str:
    """Main path and every branch: parameters / MACs."""
    lines = [
        "| model | aux | classes | input | main params / MACs | branches: params / MACs "
        "| total params / MACs |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, label, c in rows(names, ablations=ablations):
        branches = "; ".join(
            f"{b['name']}: {b['params']:,} / {_macs(b['macs'])}" for b in c["branches"]
        )
        lines.append(
            f"| {name} | {label} | {_classes(name)} | {models.spec(name).image_size} "
            f"| {c['main']['params']:,} / {_macs(c['main']['macs'])} | {branches} "
            f"| {c['total']['params']:,} / {_macs(c['total']['macs'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="registry names (default: all)")
    parser.add_argument("--ablations", action="store_true", help="add the ablation designs")
    args = parser.parse_args(argv)
    names = tuple(args.names) or None
    print(backbone_table(names))
    print()
    print(branch_table(names, ablations=args.ablations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
