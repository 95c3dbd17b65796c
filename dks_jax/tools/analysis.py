"""Analysis of the DKS and DHM supplements on a trained run: layer correlations, gradient consistency.

(a) Gradient consistency (DKS supplement, Proposition 1) is ``evaluator.gradient_consistency``; the
    ``consistency`` command computes it on a run's checkpoint.
(b) Train vs test error curves per head (DKS Fig. 3 / Fig. 7) are ``curves.plot_curves``; the
    ``curves`` command draws them.
(c) :func:`correlation_heatmap`: per-layer correlation between a branch and the main path as a PNG
    (DHM supplement H), in one of two precisely defined kinds:

    ``kind="cka"`` (default): linear CKA (Kornblith et al., 2019) between the feature maps of every
      block of the branch (rows) and every main-path block from the attachment point on (columns),
      over the same images. A feature map ``[n, H, W, C]`` is flattened to ``[n, H*W*C]``; with
      centred Gram matrices ``K = X Xᵀ``, ``L = Y Yᵀ`` (``H`` the centring matrix)
      ``CKA = tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))``, in [0, 1], invariant to orthogonal transforms
      and isotropic scaling, comparable across different widths and resolutions.
    ``kind="kernels"``: the DHM supplement H recipe on the weights: for each pair of corresponding
      blocks (branch block ``b`` of the stage playing main stage ``s``'s role, and main block ``b``
      of stage ``s``) with equal 3x3 kernel shapes, take the middle 3x3 convolution's kernel
      ``[3, 3, Cin, Cout]``, its maximum over the 3x3 window (``[Cin, Cout]``), standardise it over
      all entries (zero mean, unit variance: "normalised across channels and filters"), and plot
      the element-wise product of the two standardised matrices (x: input channel, y: output
      channel). Its mean is exactly the Pearson correlation of the two max-kernel matrices, shown
      in each panel's title. The supplement does not define "correlation matrix" further; this is
      our reading.

CLI::

    python -m dks_jax.tools.analysis curves --workdir=RUN[,RUN2,...] [--out=curves.png] [--heads=C1,C2]
    python -m dks_jax.tools.analysis heatmap --workdir=RUN [--head=C3] [--kind=cka|kernels]
        [--num_images=256] [--out=heatmap.png]
    python -m dks_jax.tools.analysis consistency --workdir=RUN [--num_images=256]

``heatmap`` and ``consistency`` load the run's latest checkpoint and the first ``num_images`` images
of its evaluation split (``data.create`` with the run's ``config.json``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dks_jax import checkpointing, cli, config_base, data, parallel, paths
from dks_jax import state as state_lib
from dks_jax.evaluator import gradient_consistency
from dks_jax.tools import curves
from dks_jax.tools.curves import pyplot, save_png

# ---- helpers ------------------------------------------------------------------------------------


def _first_stage(model, tap) -> int:
    """The main stage whose role a branch's first stage plays (it forks at ``tap``)."""
    s, blocks = tap
    return s + 1 if blocks == len(model.stages[s]) else s


# ---- correlations ---------------------------------------------------------------------------


def _gram(x):
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    return x @ x.T


def _centre(k):
    return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()


def cka_from_grams(k_x, k_y):
    """Linear CKA from two ``[n, n]`` Gram matrices (see the module doc)."""
    kc, lc = _centre(k_x), _centre(k_y)
    hsic = jnp.sum(kc * lc)
    return hsic / jnp.maximum(jnp.sqrt(jnp.sum(kc * kc) * jnp.sum(lc * lc)), 1e-30)


def linear_cka(x, y):
    """Linear CKA between two sets of features of the same ``n`` examples: ``[n, ...]`` each."""
    return cka_from_grams(_gram(x), _gram(y))


def layer_cka(graphdef, params, batch_stats, images, head: str) -> tuple[jax.Array, list, list]:
    """``[branch blocks, main blocks from the attachment point on]`` linear CKA matrix of ``head``.

    Evaluation mode (running BatchNorm statistics). The first column is the attachment point itself
    (the branch's input). Returns ``(matrix, branch_layer_names, main_layer_names)``; names give the
    main stage each block plays the role of (``stage3.block2``).
    """
    model = nnx.merge(graphdef, params, batch_stats)
    index = _head_index(model, head)
    tap = model.taps[index - 1]
    branch_names, main_names = _layer_names(model, tap, index)

    def grams(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats)
        _, main = model.features(images, every_block=True)
        positions = list(main)
        main_g = jnp.stack([_gram(main[p]) for p in positions[positions.index(tap):]])
        branch = model.branches[index - 1].features(main[tap], every_block=True)
        branch_g = jnp.stack([_gram(y) for y in branch.values()])
        return main_g, branch_g

    main_g, branch_g = jax.jit(grams)(params, batch_stats, images)
    matrix = jax.vmap(lambda kb: jax.vmap(lambda km: cka_from_grams(kb, km))(main_g))(branch_g)
    return matrix, branch_names, main_names


def _tap_name(tap) -> str:
    return f"stage{tap[0] + 1}.block{tap[1]}"


def _layer_names(model, tap, index) -> tuple[list, list]:
    main = []
    for s, stage in enumerate(model.stages):
        main += [f"stage{s + 1}.block{b + 1}" for b in range(len(stage))]
    main = main[main.index(_tap_name(tap)):]
    first = _first_stage(model, tap)
    branch = [f"stage{first + j + 1}.block{b + 1}"
              for j, stage in enumerate(model.branches[index - 1].stages) for b in range(len(stage))]
    return branch, main


def _head_index(model, head: str) -> int:
    if head not in model.head_names[1:]:
        raise ValueError(f"head {head!r} is not an auxiliary head of this model; it has "
                         f"{', '.join(model.head_names[1:]) or 'none'}.")
    return model.head_names.index(head)


def _middle_3x3_kernel(block):
    """The middle 3x3 convolution kernel ``[3, 3, Cin, Cout]`` of a block (by parameter path order),
    or None: the bottleneck's 3x3, the first of a basic block's two."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(block, nnx.Param).to_pure_dict())[0]
    kernels = [np.asarray(v, np.float32) for _, v in leaves
               if np.ndim(v) == 4 and tuple(np.shape(v)[:2]) == (3, 3)]
    return kernels[(len(kernels) - 1) // 2] if kernels else None


def kernel_correlation(w_branch, w_main) -> np.ndarray:
    """DHM supplement H: ``[Cin, Cout]`` product of standardised max-over-3x3 kernels (module doc).

    ``w_*``: ``[3, 3, Cin, Cout]`` kernels of equal shape. The mean of the result is the Pearson
    correlation of the two ``max over 3x3`` matrices.
    """
    w_branch, w_main = np.asarray(w_branch, np.float64), np.asarray(w_main, np.float64)
    if w_branch.shape != w_main.shape:
        raise ValueError(f"kernel shapes differ: {w_branch.shape} vs {w_main.shape}")

    def standard(w):
        m = w.max(axis=(0, 1))
        return (m - m.mean()) / max(m.std(), 1e-12)

    return standard(w_branch) * standard(w_main)


def kernel_pairs(graphdef, params, batch_stats, head: str) -> list[tuple[str, np.ndarray]]:
    """``[(layer name, kernel_correlation matrix)]`` for the corresponding blocks of ``head``'s branch
    and the main path whose middle 3x3 kernels have equal shapes (others are skipped)."""
    model = nnx.merge(graphdef, params, batch_stats)
    index = _head_index(model, head)
    tap = model.taps[index - 1]
    first = _first_stage(model, tap)
    out = []
    for j, bstage in enumerate(model.branches[index - 1].stages):
        s = first + j
        if s >= len(model.stages):
            break
        for b, bblock in enumerate(bstage):
            if b >= len(model.stages[s]):
                break
            wb, wm = _middle_3x3_kernel(bblock), _middle_3x3_kernel(model.stages[s][b])
            if wb is not None and wm is not None and wb.shape == wm.shape:
                out.append((f"stage{s + 1}.block{b + 1}", kernel_correlation(wb, wm)))
    return out


def correlation_heatmap(graphdef, params, batch_stats, head: str, out_png, *, images=None,
                        kind: str = "cka", title: str = "") -> dict:
    """Writes the ``kind`` heatmap (module doc) of auxiliary ``head`` vs the main path to ``out_png``.

    ``images`` ``[n, H, W, C]`` (normalised as in training) are needed for ``kind="cka"``. Returns
    the numbers plotted: ``{"matrix", "rows", "cols"}`` for cka, ``{"pairs": [(name, matrix)],
    "pearson": [...]}`` for kernels.
    """
    plt = pyplot()
    if kind == "cka":
        if images is None:
            raise ValueError("kind='cka' needs images.")
        cka, rows, cols = layer_cka(graphdef, params, batch_stats, images, head)
        matrix = np.asarray(cka)
        fig, ax = plt.subplots(figsize=(2.5 + 0.4 * len(cols), 1.5 + 0.35 * len(rows)))
        im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel("main path block (from the attachment point)")
        ax.set_ylabel(f"branch {head} block")
        if matrix.size <= 400:  # small enough to print the values
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.5 else "white")
        fig.colorbar(im, ax=ax, label="linear CKA")
        ax.set_title(title or f"{head} vs main path, linear CKA ({images.shape[0]} images)",
                     fontsize=9)
        result = {"matrix": matrix, "rows": rows, "cols": cols}
    elif kind == "kernels":
        pairs = kernel_pairs(graphdef, params, batch_stats, head)
        if not pairs:
            raise ValueError(f"no block of branch {head} has a 3x3 kernel shaped like its main-path "
                             "counterpart; use kind='cka'.")
        n = len(pairs)
        ncols = min(n, 4)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 0.8, 3.0 * nrows),
                                 squeeze=False, layout="constrained")
        vmax = max(float(np.abs(m).max()) for _, m in pairs)
        for ax, (name, m) in zip(axes.flat, pairs, strict=False):
            im = ax.imshow(m.T, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                           origin="lower")
            ax.set_title(f"{name}: r = {m.mean():.3f}", fontsize=8)
            ax.set_xlabel("input channel", fontsize=7)
            ax.set_ylabel("output channel", fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        fig.suptitle(title or f"{head} vs main path: standardised max-3x3 kernels, product",
                     fontsize=9)
        result = {"pairs": pairs, "pearson": [float(m.mean()) for _, m in pairs]}
    else:
        raise ValueError(f"Unknown kind {kind!r}; valid: cka, kernels.")
    save_png(fig, out_png)
    return result


# ---- loading a run (CLI) ------------------------------------------------------------------------


def load_run(workdir):
    """``(config, dataset, graphdef, params, batch_stats, step)`` of a run folder's latest checkpoint.

    One device; the data set is built from the run's ``config.json`` (``data.create``).
    """
    workdir = paths.as_path(workdir)
    config = config_base.from_run(workdir)
    mesh = parallel.create_mesh(jax.devices()[:1])
    dataset = data.create(config, mesh)
    graphdef, shapes = state_lib.abstract(config, config.num_classes or dataset.num_classes)
    sharding = parallel.replicated(mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes)
    ckpts = checkpointing.Checkpoints(workdir, async_save=False)
    try:
        restored = ckpts.restore(target)
    finally:
        ckpts.close()
    if restored is None:
        raise checkpointing.CheckpointError(f"No checkpoint in {workdir / 'checkpoints'}.")
    step, state = restored
    return config, dataset, graphdef, state["params"], state["batch_stats"], step


def eval_images(dataset, num_images: int, batch: int = 64):
    """The first ``num_images`` evaluation images and labels (padding dropped), as NumPy."""
    batch = max(1, min(batch, num_images))
    images, labels = [], []
    have = 0
    for b in dataset.eval_iterator(batch):
        mask = np.asarray(b["mask"])
        images.append(np.asarray(b["image"])[mask])
        labels.append(np.asarray(b["label"])[mask])
        have += int(mask.sum())
        if have >= num_images:
            break
    return np.concatenate(images)[:num_images], np.concatenate(labels)[:num_images]


COMMANDS = ("heatmap", "consistency", "curves")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "run folder (curves: several, comma-separated)",
                        flag_values=fv, required=True)
    flags.DEFINE_string("out", "", "PNG path (default: in the (first) workdir)", flag_values=fv)
    flags.DEFINE_string("head", "", "heatmap: the auxiliary head (default: the shallowest)",
                        flag_values=fv)
    flags.DEFINE_enum("kind", "cka", ["cka", "kernels"], "heatmap: what is correlated",
                      flag_values=fv)
    flags.DEFINE_integer("num_images", 256, "heatmap, consistency: evaluation images used",
                         flag_values=fv)
    flags.DEFINE_list("heads", [], "curves: heads to plot (default: all for one run, else C1)",
                      flag_values=fv)
    flags.DEFINE_list("labels", [], "curves: names of the runs", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    """``argv``: the command (heatmap | consistency | curves), then flags."""
    fv, args = cli.parse(define_flags, argv, "python -m dks_jax.tools.analysis <command>", __doc__)
    if len(args) != 1 or args[0] not in COMMANDS:
        raise cli.UsageError(f"Give one command of {', '.join(COMMANDS)}; got {args}.")
    command = args[0]
    if command == "curves":
        workdirs = [w for w in fv.workdir.split(",") if w]
        out = fv.out or str(paths.as_path(workdirs[0]) / "curves.png")
        curves.plot_curves(workdirs if len(workdirs) > 1 else workdirs[0], out,
                           heads=fv.heads or None, labels=fv.labels or None)
        print(out)
        return 0
    config, dataset, graphdef, params, batch_stats, step = load_run(fv.workdir)
    images, labels = eval_images(dataset, fv.num_images)
    if command == "consistency":
        fn = jax.jit(gradient_consistency, static_argnums=0)
        result = {k: float(v) for k, v in fn(graphdef, params, batch_stats, images, labels).items()}
        print(json.dumps({"step": step, **result}, indent=2))
        return 0
    heads = nnx.merge(graphdef, params, batch_stats).head_names
    if len(heads) < 2:
        print(f"{fv.workdir}: the model has no auxiliary heads.", file=sys.stderr)
        return 1
    head = fv.head or heads[-1]
    out = fv.out or str(paths.as_path(fv.workdir) / f"heatmap_{head}_{fv.kind}.png")
    correlation_heatmap(graphdef, params, batch_stats, head, out, images=images, kind=fv.kind,
                        title=f"{config.model} {config.method}, step {step}: {head} vs main "
                              f"({fv.kind})")
    print(out)
    return 0


if __name__ == "__main__":
    cli.run(main)
