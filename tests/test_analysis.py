"""Analysis tools (dks_jax.tools.analysis, tools.curves) and gradient consistency (dks_jax.evaluator)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dks_jax import evaluator, models
from dks_jax.tools import analysis, curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# cifar_resnet8 with its paper branches (one block per stage). C3 forks after stage 1 and re-runs
# stages 2 and 3 at the backbone's widths, so its blocks have main-path counterparts with equal kernel
# shapes (DHM-style comparison); C2 runs stage 3 at 128.
@pytest.fixture(scope="module")
def tiny():
    """(model, graphdef, params, batch_stats, images [8, 32, 32, 3], labels [8])."""
    model = models.create("cifar_resnet8", 10, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # Non-trivial running statistics, so evaluation mode differs from a fresh model's.
    model(jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32), train=True)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    return model, graphdef, params.to_pure_dict(), stats.to_pure_dict(), images, labels


def test_analysis_hooks_give_the_model_logits(tiny):
    """Zero tap offsets (gradient_consistency) and every_block maps (layer_cka) change nothing."""
    model, graphdef, params, stats, images, _ = tiny
    m = nnx.merge(graphdef, params, stats)
    _, taps = m.features(images)
    zeros = {tap: jnp.zeros_like(z) for tap, z in taps.items()}
    for a, b in zip(model(images), m(images, offsets=zeros), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    last, every = m.features(images, every_block=True)
    assert list(every) == [(0, 1), (1, 1), (2, 1)]
    np.testing.assert_array_equal(every[(2, 1)], last)
    for tap, z in taps.items():
        np.testing.assert_array_equal(every[tap], z)
    for tap, branch in zip(m.taps, m.branches, strict=True):
        maps = branch.features(taps[tap], every_block=True)
        np.testing.assert_array_equal(list(maps.values())[-1], branch.features(taps[tap]))
    with pytest.raises(ValueError, match="not taps"):
        m(images, offsets={(2, 1): zeros[(1, 1)]})


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_gradient_consistency_equals_hand_computation(tiny):
    model, graphdef, params, stats, images, labels = tiny
    fn = jax.jit(evaluator.gradient_consistency, static_argnums=0)
    got = fn(graphdef, params, stats, images, labels)
    assert set(got) == {"grad_cos/C2", "grad_cos/C3", "grad_cos_example/C2",
                        "grad_cos_example/C3"}
    for v in got.values():
        assert -1.0 <= float(v) <= 1.0

    # By hand: split the network at each attachment point and differentiate each head's CE with
    # respect to the feature map there.
    m = nnx.merge(graphdef, params, stats)
    _, taps = m.features(images)

    def main_from(stage, z):  # the main path after the end of ``stage``
        for blocks in m.stages[stage + 1:]:
            for block in blocks:
                z = block(z, train=False)
        return m.fc(jnp.mean(z, axis=(1, 2)))

    for head, branch, stage in (("C2", m.branches[0], 1), ("C3", m.branches[1], 0)):
        z = taps[(stage, 1)]
        g_main = jax.grad(lambda z, s=stage: _ce(main_from(s, z), labels))(z)
        g_aux = jax.grad(lambda z, b=branch: _ce(b(z), labels))(z)
        cos = jnp.vdot(g_main, g_aux) / (jnp.linalg.norm(g_main) * jnp.linalg.norm(g_aux))
        np.testing.assert_allclose(got[f"grad_cos/{head}"], cos, rtol=1e-4, atol=1e-6)
        per = [jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
               for a, b in zip(g_main, g_aux, strict=True)]
        np.testing.assert_allclose(got[f"grad_cos_example/{head}"], np.mean(per), rtol=1e-4,
                                   atol=1e-6)

    # A padded evaluation batch: the padding (mask False) does not count.
    pad = lambda x: jnp.concatenate([x, jnp.zeros((2,) + x.shape[1:], x.dtype)])
    mask = jnp.arange(10) < 8
    padded = fn(graphdef, params, stats, pad(images), pad(labels), mask)
    for key, value in got.items():
        np.testing.assert_allclose(padded[key], value, rtol=1e-4, atol=1e-6)


def test_linear_cka_properties():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4, 4, 3))
    y = rng.normal(size=(40, 20))
    q, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    xf = x.reshape(40, -1)
    assert float(analysis.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)
    # Invariant to orthogonal transforms and isotropic scaling of either side.
    assert float(analysis.linear_cka(x, 3.0 * xf @ q)) == pytest.approx(1.0, abs=1e-5)
    # Equal to the feature-space formula ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||).
    xc, yc = xf - xf.mean(0), y - y.mean(0)
    ref = (np.linalg.norm(yc.T @ xc) ** 2
           / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))
    assert float(analysis.linear_cka(x, y)) == pytest.approx(ref, rel=1e-4)
    assert 0.0 <= ref < 0.9


def test_kernel_correlation_mean_is_pearson():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 3, 5, 7)), rng.normal(size=(3, 3, 5, 7))
    m = analysis.kernel_correlation(a, b)
    assert m.shape == (5, 7)
    r = np.corrcoef(a.max(axis=(0, 1)).ravel(), b.max(axis=(0, 1)).ravel())[0, 1]
    assert m.mean() == pytest.approx(r)
    np.testing.assert_allclose(analysis.kernel_correlation(a, a).mean(), 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        analysis.kernel_correlation(a, b[:, :, :4])


def test_heatmaps_are_written(tiny, tmp_path):
    _, graphdef, params, stats, images, _ = tiny
    out = analysis.correlation_heatmap(graphdef, params, stats, "C3", tmp_path / "cka.png",
                                       images=images)
    assert out["rows"] == ["stage2.block1", "stage3.block1"]
    assert out["cols"] == ["stage1.block1", "stage2.block1", "stage3.block1"]
    assert out["matrix"].shape == (2, 3)
    assert np.all((out["matrix"] >= 0) & (out["matrix"] <= 1 + 1e-6))
    out = analysis.correlation_heatmap(graphdef, params, stats, "C3", tmp_path / "k.png",
                                       kind="kernels")
    assert [name for name, _ in out["pairs"]] == ["stage2.block1", "stage3.block1"]
    assert all(-1.0 <= r <= 1.0 for r in out["pearson"])
    for name in ("cka.png", "k.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    with pytest.raises(ValueError, match="C9.*C2, C3"):
        analysis.correlation_heatmap(graphdef, params, stats, "C9", tmp_path / "x.png",
                                     images=images)
    with pytest.raises(ValueError, match="no block of branch C2"):  # width 128 vs 64
        analysis.correlation_heatmap(graphdef, params, stats, "C2", tmp_path / "x.png",
                                     kind="kernels")


def _fake_run(folder, *, shift=0.0, with_cos=True):
    folder.mkdir(parents=True)
    lines = [{"step": 0, "steps_per_epoch": 100, "total_steps": 2000}]
    for step in range(100, 2001, 100):
        e = step / 2000
        lines.append({"step": step, "loss": 3 - 2 * e,
                      **{f"train_top1/C{i}": 0.2 + 0.7 * e - 0.1 * i + shift for i in (1, 2, 3)}})
        if step % 200 == 0:
            lines.append({"step": step,
                          **{f"eval_top1/C{i}": 30 + 35 * e - 5 * i + 100 * shift
                             for i in (1, 2, 3)},
                          "eval_top1/ensemble": 32 + 35 * e, "eval_count": 200})
            if with_cos:
                lines.append({"step": step, "grad_cos/C2": 0.1 + 0.3 * e,
                              "grad_cos/C3": 0.05 + 0.2 * e})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_plot_curves(tmp_path):
    _fake_run(tmp_path / "dks")
    _fake_run(tmp_path / "ds", shift=0.03, with_cos=False)
    c = curves.plot_curves(tmp_path / "dks", tmp_path / "curves.png")
    assert c["x_label"] == "epoch"
    x, err = c["test"]["C1"]
    np.testing.assert_allclose(x, np.arange(2, 21, 2))  # epochs
    np.testing.assert_allclose(err[-1], 100 - (30 + 35 - 5))
    x, err = c["train"]["C2"]
    np.testing.assert_allclose(err[-1], 100 * (1 - (0.2 + 0.7 - 0.2)))
    assert set(c["consistency"]) == {"C2", "C3"}
    curves.plot_curves([tmp_path / "ds", tmp_path / "dks"], tmp_path / "compare.png",
                         labels=["DS", "DKS"])
    assert analysis.main(["curves", f"--workdir={tmp_path / 'dks'}"]) == 0
    for name in ("curves.png", "compare.png", "dks/curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10000
    with pytest.raises(FileNotFoundError, match="metrics"):
        curves.plot_curves(tmp_path / "nothing", tmp_path / "x.png")


@pytest.mark.parametrize("name", ["cifar_resnet32", "densenet40_k12", "wrn16_8", "mobilenet_cifar",
                                  "resnet18"])
def test_gradient_consistency_traces_for_registry_models(name):
    """Shapes only (jax.eval_shape, nothing compiled): every family's taps are found."""
    import functools

    model = nnx.eval_shape(lambda: models.create(name, 10, rngs=nnx.Rngs(0)))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    size = models.spec(name).image_size
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(functools.partial(evaluator.gradient_consistency, graphdef), params, stats,
                         images, labels)
    aux = model.head_names[1:]
    assert aux and set(out) == {f"grad_cos{k}/{h}" for h in aux for k in ("", "_example")}
    assert all(v.shape == () for v in out.values())
