"""Analysis tools of the DKS and DHM supplements: gradient consistency, training curves, heatmaps.

(a) :func:`gradient_consistency` (DKS supplement, Proposition 1): for every auxiliary head, the
    cosine similarity between the gradient of the main head's cross-entropy and the gradient of
    that auxiliary head's cross-entropy, both with respect to the feature map the two share (the
    main path's output at the branch's attachment point). Pure and jit-able; meant to be logged at
    evaluation time. Proposition 1 predicts DKS raises it over DS.
(b) :func:`plot_curves`: train vs test top-1 error per head (or per run) from ``metrics.jsonl``, the
    layout of DKS Fig. 3 / Fig. 7 (train dashed, test solid).
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

    python -m dks_jax.analysis curves --workdir=RUN[,RUN2,...] [--out=curves.png] [--heads=C1,C2]
    python -m dks_jax.analysis heatmap --workdir=RUN [--head=C3] [--kind=cka|kernels]
        [--num_images=256] [--out=heatmap.png]
    python -m dks_jax.analysis consistency --workdir=RUN [--num_images=256]

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
import optax
from flax import nnx

from dks_jax import paths

# ---- helpers ------------------------------------------------------------------------------------


def _first_stage(model, tap) -> int:
    """The main stage whose role a branch's first stage plays (it forks at ``tap``)."""
    s, blocks = tap
    return s + 1 if blocks == len(model.stages[s]) else s


def _cross_entropy(logits, labels, mask=None):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if mask is None:
        return jnp.mean(ce)
    w = jnp.asarray(mask, jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def _cosine(a, b, axis=None):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=axis)
    norm = jnp.sqrt(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis))
    return dot / jnp.maximum(norm, 1e-30)


# ---- (a) gradient consistency -------------------------------------------------------------------


def gradient_consistency(graphdef, params, batch_stats, images, labels, mask=None, *,
                         train: bool = False, rng=None) -> dict:
    """Cosine similarity between the main and each auxiliary head's CE gradient at their shared map.

    For auxiliary head ``Ck`` attached at feature map ``z`` (``[B, H, W, C]``, the main path's output
    at the attachment point): ``g1 = d CE(C1) / dz`` (through the rest of the main path) and
    ``gk = d CE(Ck) / dz`` (through the branch), CE the batch-mean softmax cross-entropy with the true
    labels. Returns, for every auxiliary head name ``Ck``:

    - ``grad_cos/Ck``: ``<g1, gk> / (|g1| |gk|)`` over the whole ``[B, H, W, C]`` tensor (the
      gradients of the batch losses, the quantity of Proposition 1);
    - ``grad_cos_example/Ck``: the mean over examples of the per-example cosine.

    Both are in [-1, 1]. ``graphdef`` is static (``jax.jit(gradient_consistency, static_argnums=0)``);
    ``params`` / ``batch_stats`` are the train state's pure dicts; ``images`` ``[B, H, W, C]``,
    ``labels`` int ``[B]``; ``mask`` bool ``[B]`` (an evaluation batch's padding is False): only
    those examples count (the CE is their mean, so padded examples get zero gradient).
    ``train=False`` uses the running BatchNorm statistics (evaluation mode; examples independent);
    ``train=True`` batch statistics (padding included, if any) and dropout from ``rng`` (if the
    model has dropout). A model without auxiliary heads gives ``{}``.
    """
    probe = nnx.merge(graphdef, params, batch_stats)
    if not probe.branches:
        return {}
    names, taps = probe.head_names, probe.taps

    def run(offsets):
        model = nnx.merge(graphdef, params, batch_stats)
        rngs = nnx.Rngs(dropout=rng) if rng is not None else None
        logits = model(images, train=train, rngs=rngs, offsets=offsets)
        return jnp.stack([_cross_entropy(z, labels, mask) for z in logits])

    def tap_shapes():
        model = nnx.merge(graphdef, params, batch_stats)
        return model.features(images, train=train, rngs=nnx.Rngs(dropout=rng) if rng is not None
                              else None)[1]

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(tap_shapes))
    losses, vjp = jax.vjp(run, zeros)
    (g_main,) = vjp(jnp.zeros_like(losses).at[0].set(1.0))
    out = {}
    for k, tap in enumerate(taps, start=1):
        (g_aux,) = vjp(jnp.zeros_like(losses).at[k].set(1.0))
        a, b = g_main[tap], g_aux[tap]
        out[f"grad_cos/{names[k]}"] = _cosine(a, b)
        per_example = _cosine(a, b, axis=tuple(range(1, a.ndim)))
        if mask is None:
            out[f"grad_cos_example/{names[k]}"] = jnp.mean(per_example)
        else:
            w = jnp.asarray(mask, jnp.float32)
            out[f"grad_cos_example/{names[k]}"] = jnp.sum(per_example * w) / jnp.maximum(
                jnp.sum(w), 1.0)
    return out


# ---- (c) correlations ---------------------------------------------------------------------------


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
    plt = _pyplot()
    if kind == "cka":
        if images is None:
            raise ValueError("kind='cka' needs images.")
        matrix, rows, cols = layer_cka(graphdef, params, batch_stats, images, head)
        matrix = np.asarray(matrix)
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
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.0 * rows),
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
    _save(fig, out_png)
    return result


# ---- (b) training curves ------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Plots need matplotlib: pip install -e '.[plots]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png):
    out = paths.as_path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # epath: local or gs://
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def curves(workdir) -> dict:
    """Per-head error curves of one run from its ``metrics.jsonl``.

    Returns ``{"x_label": "epoch"|"step", "train": {head: (x, err%)}, "test": {head: (x, err%)},
    "consistency": {head: (x, cos)}}``. Train error is ``100 * (1 - train_top1)`` (the logged
    running average over the steps since the previous log line, with augmentation, in training
    mode); test error is ``100 - eval_top1``.
    """
    from dks_jax import metrics

    records = metrics.read_metrics(workdir)
    if not records:
        raise FileNotFoundError(f"No metrics in {paths.as_path(workdir) / metrics.METRICS_FILE}.")
    spe = next((r["steps_per_epoch"] for r in records if "steps_per_epoch" in r), None)
    x_of = (lambda s: s / spe) if spe else (lambda s: s)
    out = {"x_label": "epoch" if spe else "step", "train": {}, "test": {}, "consistency": {}}
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
    plt = _pyplot()
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
    _save(fig, out_png)
    return runs[0] if len(runs) == 1 else {"runs": runs}


def _head_key(name: str):
    return (1, 0) if name == "ensemble" else (0, int(name[1:]) if name[1:].isdigit() else 99)


# ---- loading a run (CLI) ------------------------------------------------------------------------


def load_run(workdir):
    """``(config, dataset, graphdef, params, batch_stats, step)`` of a run folder's latest checkpoint.

    One device; the data set is built from the run's ``config.json`` (``data.create``).
    """
    import ml_collections

    from dks_jax import checkpointing, data, optim, parallel, train

    workdir = paths.as_path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    mesh = parallel.create_mesh(jax.devices()[:1])
    dataset = data.create(config, mesh)
    num_classes = config.num_classes or dataset.num_classes
    tx, _ = optim.create_optimizer(config, 1)
    graphdefs = []

    def build():
        graphdef, state = train.initial_state(train.create_model(config, num_classes), tx)
        graphdefs.append(graphdef)
        return state

    shapes = jax.eval_shape(build)
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
    return config, dataset, graphdefs[0], state["params"], state["batch_stats"], step


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


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dks_jax.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("curves", help="train vs test error per head (PNG)")
    p.add_argument("--workdir", required=True, help="run folder(s), comma-separated")
    p.add_argument("--out", default="", help="PNG path (default <first workdir>/curves.png)")
    p.add_argument("--heads", default="", help="e.g. C1,C2 (default: all for one run, else C1)")
    p.add_argument("--labels", default="", help="names of the runs, comma-separated")
    p = sub.add_parser("heatmap", help="branch vs main path correlation heatmap (PNG)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--head", default="", help="auxiliary head (default: the shallowest)")
    p.add_argument("--kind", default="cka", choices=("cka", "kernels"))
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--out", default="", help="PNG path (default <workdir>/heatmap_<head>_<kind>.png)")
    p = sub.add_parser("consistency", help="gradient consistency of a checkpoint (JSON)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_images", type=int, default=256)
    args = parser.parse_args(argv)

    if args.command == "curves":
        workdirs = [w for w in args.workdir.split(",") if w]
        out = args.out or str(paths.as_path(workdirs[0]) / "curves.png")
        plot_curves(workdirs if len(workdirs) > 1 else workdirs[0], out,
                    heads=[h for h in args.heads.split(",") if h] or None,
                    labels=[x for x in args.labels.split(",") if x] or None)
        print(out)
        return 0
    config, dataset, graphdef, params, batch_stats, step = load_run(args.workdir)
    images, labels = eval_images(dataset, args.num_images)
    if args.command == "consistency":
        fn = jax.jit(gradient_consistency, static_argnums=0)
        result = {k: float(v) for k, v in fn(graphdef, params, batch_stats, images, labels).items()}
        print(json.dumps({"step": step, **result}, indent=2))
        return 0
    heads = nnx.merge(graphdef, params, batch_stats).head_names
    if len(heads) < 2:
        print(f"{args.workdir}: the model has no auxiliary heads.", file=sys.stderr)
        return 1
    head = args.head or heads[-1]
    out = args.out or str(paths.as_path(args.workdir) / f"heatmap_{head}_{args.kind}.png")
    correlation_heatmap(graphdef, params, batch_stats, head, out, images=images, kind=args.kind,
                        title=f"{config.model} {config.method}, step {step}: {head} vs main "
                              f"({args.kind})")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
