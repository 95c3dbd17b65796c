"""Anytime (early-exit) prediction: cost accounting, the accuracy/cost curve, the early-exit
predictor against the full model, and the command line on a tiny initialised run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import tiny_config

from dks_jax import anytime, attach, checkpointing, cli, data, errors, models, parallel
from dks_jax import state as state_lib
from dks_jax.tools import anytime as anytime_tool


def _fill(tree, seed=0):
    """Concrete values for an abstract pytree (no per-shape initialiser to compile, which takes
    tens of seconds on a busy CPU): kernels N(0, 1/fan_in), BatchNorm scale and variance 1,
    other vectors small, integers 0."""
    rng = np.random.default_rng(seed)

    def value(path, s):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return np.zeros(s.shape, s.dtype)
        if len(s.shape) >= 2:
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)
        if name in ("scale", "var"):
            return np.ones(s.shape, s.dtype)
        return (0.1 * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(value, tree)


def _model(aux="paper", seed=0):
    """cifar_resnet8 (10 classes) with random weights, built without compiling initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: models.create("cifar_resnet8", 10, aux=aux, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, _fill(state.to_pure_dict(), seed))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def resnet8():
    """cifar_resnet8 with the paper's branches (C2 after conv3_x, C3 after conv2_x), images, and
    the model's logits of every head."""
    model = _model()
    scale = np.geomspace(0.1, 30, 37)[:, None, None, None]  # confidences from low to high
    images = (np.random.default_rng(0).normal(size=(37, 32, 32, 3)) * scale).astype(np.float32)
    logits, _ = anytime.head_logits(model, [{"image": images, "label": np.zeros(37, int)}])
    return model, images, logits


# ---- cost accounting ---------------------------------------------------------------------------


def test_costs_match_hand_computed_macs():
    """ResNet-8 with the "simple" branches (average pooling to 4x4, one fc), counted by hand."""
    model = nnx.eval_shape(lambda: models.create("cifar_resnet8", 10, aux="simple",
                                                 rngs=nnx.Rngs(0)))
    costs = anytime.head_costs(model, image_size=32)
    stem = 32 * 32 * 16 * (3 * 3 * 3)                                     # conv 3x3, 3 -> 16
    conv2_x = 2 * 32 * 32 * 16 * (3 * 3 * 16)                             # two 3x3 convs, 16
    conv3_x = 16 * 16 * 32 * (3 * 3 * 16) + 16 * 16 * 32 * (3 * 3 * 32)  # stride 2, 16 -> 32
    conv4_x = 8 * 8 * 64 * (3 * 3 * 32) + 8 * 8 * 64 * (3 * 3 * 64)      # stride 2, 32 -> 64
    fc, c2, c3 = 64 * 10, 4 * 4 * 32 * 10, 4 * 4 * 16 * 10  # C2: conv3_x pooled; C3: conv2_x
    assert costs.names == ("C1", "C2", "C3") and costs.order == (2, 1, 0)
    assert costs.fork == (stem + conv2_x + conv3_x + conv4_x, stem + conv2_x + conv3_x,
                          stem + conv2_x)
    assert costs.head == (fc, c2, c3)
    assert costs.alone[0] == 12_239_488 == models.complexity("cifar_resnet8", 10, aux="simple")[
        "main"]["macs"]
    # In the order they become available: C3, then C2 (C3 was evaluated), then C1 (both were).
    assert costs.exit == (stem + conv2_x + conv3_x + conv4_x + fc + c2 + c3,
                          stem + conv2_x + conv3_x + c2 + c3,
                          stem + conv2_x + c3)
    assert costs.full == costs.exit[0] == models.complexity(
        "cifar_resnet8", 10, aux="simple")["total"]["macs"]


def test_complexity_reports_where_each_branch_forks():
    c = models.complexity("resnet18", 1000, image_size=224)
    assert c["main"]["macs"] == 1_814_073_344 and c["total"]["macs"] == 3_922_198_528
    forks = {b["name"]: b["fork_macs"] for b in c["branches"]}
    costs = anytime.head_costs(nnx.eval_shape(lambda: models.create(
        "resnet18", 1000, rngs=nnx.Rngs(0))), image_size=224)
    assert forks == {"C2": costs.fork[1], "C3": costs.fork[2]}
    # The papers' heavy branches: leaving at C2 costs more than the main path alone.
    assert costs.exit[1] > costs.alone[0]


def test_xla_costs_of_an_attached_model():
    """A model with branches from ``attach``: XLA's flops / 2 of the pruned programs."""
    net = _model(aux="none")
    example = jnp.zeros((2, 32, 32, 3))
    wrapped = attach.attach(net, {"stages.0.0": "simple", "stages.1.0": "simple"}, num_classes=10,
                            rngs=nnx.Rngs(1), example=example, example_kwargs={"train": False})
    costs = anytime.head_costs(wrapped, example=example, example_kwargs={"train": False})
    assert costs.method == "xla" and costs.names == ("C1", "C2", "C3")
    analytic = anytime.head_costs(nnx.eval_shape(lambda: models.create(
        "cifar_resnet8", 10, aux="paper", rngs=nnx.Rngs(0))), image_size=32)
    # The same main path: within a few percent (XLA leaves out the zero padding's products and
    # counts the element-wise work).
    np.testing.assert_allclose(costs.fork, analytic.fork, rtol=0.1)
    assert costs.fork[2] < costs.fork[1] < costs.fork[0]
    # Measured as whole programs, the cascade costs add up.
    assert costs.exit[2] == pytest.approx(costs.alone[2])
    assert costs.exit[1] == pytest.approx(costs.fork[1] + costs.head[1] + costs.head[2], rel=1e-4)
    assert costs.exit[0] == costs.full == pytest.approx(costs.fork[0] + sum(costs.head), rel=1e-4)
    with pytest.raises(ValueError, match="needs example="):
        anytime.head_costs(wrapped)


# ---- the curve --------------------------------------------------------------------------------


def _costs(names=("C1", "C2", "C3"), fork=(100.0, 60.0, 30.0), head=(1.0, 20.0, 5.0)):
    return anytime._cascade(names, fork, head)


def test_curve_by_hand():
    """Four examples, three heads; C3 is available first, then C2, then C1."""
    k = 4
    sure, unsure = 10.0, 0.0  # a one-hot logit of 10 gives max softmax 0.9987; uniform 1/4

    def head(rows):  # rows: (predicted class, confident?)
        z = np.full((len(rows), k), unsure)
        for i, (cls, confident) in enumerate(rows):
            z[i, cls] = sure if confident else 0.1
        return z

    labels = np.array([0, 1, 2, 3])
    c1 = head([(0, True), (1, True), (2, True), (0, True)])      # 3 right
    c2 = head([(3, False), (1, True), (0, False), (3, False)])   # example 1 exits here, right
    c3 = head([(0, True), (0, False), (0, False), (0, False)])   # example 0 exits here, right
    costs = _costs()
    assert costs.exit == (126.0, 85.0, 35.0)
    result = anytime.curve([c1, c2, c3], labels, costs, "max_softmax", [0.9, 0.0, math.inf])
    at_09, at_0, at_inf = result.points
    # tau=0.9: example 0 at C3 (35), 1 at C2 (85), 2 and 3 at C1 (126 each); 2 of 4 + 1 right.
    assert at_09.exits == {"C1": 50.0, "C2": 25.0, "C3": 25.0}
    assert at_09.top1 == 75.0 and at_09.macs == (35 + 85 + 126 + 126) / 4
    # tau=0: all leave at the shallowest head, C3 alone (1 of 4 right) at its cost.
    assert at_0.top1 == result.heads[2].top1 == 25.0 and at_0.macs == costs.alone[2] == 35.0
    # tau=inf: none leaves; C1's accuracy at the whole model's cost.
    assert at_inf.top1 == result.heads[0].top1 == 75.0 and at_inf.macs == costs.full == 126.0
    assert [h.macs for h in result.heads] == [101.0, 80.0, 35.0]
    assert result.ensemble.macs == 126.0 and result.count == 4


def test_curve_extremes_and_the_entropy_rule():
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=(50, 10)) * s for s in (3.0, 2.0, 1.0)]
    labels = rng.integers(0, 10, 50)
    costs = _costs()
    heads = anytime.curve(logits, labels, costs, "max_softmax", []).heads
    for rule, all_out, none_out in (("max_softmax", 0.0, math.inf),
                                    ("entropy", math.inf, -math.inf)):
        first, none = anytime.curve(logits, labels, costs, rule, [all_out, none_out]).points
        assert (first.top1, first.macs) == (heads[2].top1, costs.exit[2])
        assert (none.top1, none.macs) == (heads[0].top1, costs.full)
    # A threshold in between: the mean cost is the exit cost of the head that answered.
    tau = float(np.median(anytime.confidence(logits[2], "entropy")))
    answer = anytime.exit_heads(logits, "entropy", tau)
    (point,) = anytime.curve(logits, labels, costs, "entropy", [tau]).points
    assert point.macs == pytest.approx(np.mean(np.asarray(costs.exit)[answer]))
    assert 0 < point.exits["C3"] < 100
    np.testing.assert_allclose(anytime.confidence(np.zeros((2, 4)), "entropy"), np.log(4))


def test_bad_input_is_named():
    logits, labels = [np.zeros((3, 4))] * 3, np.zeros(3, int)
    with pytest.raises(ValueError, match="unknown exit rule 'margin'"):
        anytime.curve(logits, labels, _costs(), "margin", [0.5])
    with pytest.raises(ValueError, match="needs auxiliary heads"):
        anytime.curve(logits[:1], labels, _costs(), "max_softmax", [0.5])
    with pytest.raises(ValueError, match="labels have shape"):
        anytime.curve(logits, labels[:2], _costs(), "max_softmax", [0.5])
    with pytest.raises(ValueError, match="costs are for 2 heads"):
        anytime.curve(logits, labels, _costs(("C1", "C2"), (2.0, 1.0), (1.0, 1.0)))
    plain = _model(aux="none")
    with pytest.raises(ValueError, match="no auxiliary branches"):
        anytime.EarlyExit(plain)
    with pytest.raises(ValueError, match="no auxiliary branches"):
        anytime.head_costs(plain, image_size=32)
    with pytest.raises(TypeError, match="registry models.Network"):
        anytime.EarlyExit(plain.fc)


# ---- the early-exit predictor ----------------------------------------------------------------


def test_predictor_answers_with_the_full_models_head_logits(resnet8):
    model, images, full = resnet8
    conf = np.concatenate([anytime.confidence(z, "max_softmax") for z in full[1:]])
    for tau in np.quantile(conf, np.linspace(0.05, 0.95, 19)):  # one where every head answers
        if set(anytime.exit_heads(full, "max_softmax", tau)) == {0, 1, 2}:
            break
    predictor = anytime.EarlyExit(model, tau=tau, batch_size=16)  # chunks of 16, 16 and 5
    out = predictor(images)
    assert set(np.unique(out.head)) == {0, 1, 2}
    np.testing.assert_array_equal(out.head, anytime.exit_heads(full, "max_softmax", tau))
    want = np.stack(full)[out.head, np.arange(len(images))]
    np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-5)
    costs = anytime.head_costs(model, image_size=32)
    np.testing.assert_array_equal(out.macs, np.asarray(costs.exit)[out.head])
    # The extremes: every example at C3 (its logits), or every example at C1.
    first = predictor(images, 0.0)
    assert (first.head == 2).all()
    np.testing.assert_allclose(first.logits, full[2], rtol=1e-5, atol=1e-5)
    last = predictor(images, math.inf)
    assert (last.head == 0).all() and (last.macs == costs.full).all()
    np.testing.assert_allclose(last.logits, full[0], rtol=1e-5, atol=1e-5)


# ---- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def initialised_run(cifar_subset, tmp_path_factory):
    """A run folder as training leaves it (config.json, data.json, a checkpoint), not trained."""
    workdir = tmp_path_factory.mktemp("anytime_run")
    config = tiny_config(cifar_subset, method="dks", aux="paper")
    dataset = data.create(config, parallel.create_mesh(jax.devices()[:1]))
    _, shapes = state_lib.abstract(config, dataset.num_classes)
    ckpts = checkpointing.Checkpoints(workdir, async_save=False)
    ckpts.save(0, _fill(shapes))
    ckpts.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (workdir / data.DATA_FILE).write_text(json.dumps(dataset.describe(), indent=2))
    return workdir


def test_cli_writes_the_curve_and_the_timing(initialised_run, tmp_path, capsys):
    workdir = initialised_run
    assert anytime_tool.main([f"--workdir={workdir}", f"--out={tmp_path}", "--taus=0,0.2,inf",
                              "--timing_images=32", "--timing_batch=16", "--repeats=1"]) == 0
    report = json.loads((tmp_path / "anytime-latest-step0-max_softmax.json").read_text())
    assert (tmp_path / "anytime-latest-step0-max_softmax.png").stat().st_size > 1000
    curve = report["curve"]
    assert curve["count"] == 200 and [p["tau"] for p in curve["points"]] == [0.0, 0.2, math.inf]
    c1, c3 = curve["heads"][0], curve["heads"][2]
    assert curve["points"][0]["top1"] == c3["top1"] and curve["points"][2]["top1"] == c1["top1"]
    assert curve["points"][2]["macs"] == report["costs"]["full"]
    assert report["costs"]["alone"][0] == models.complexity("cifar_resnet8", 10)["main"]["macs"]
    rows = report["timing"]["rows"]
    assert [r["name"] for r in rows][:4] == ["full model (every head)", "main path alone (C1)",
                                             "early exit: all at the first head",
                                             "early exit: none exits"]
    for row in rows[2:]:  # the predictor agrees with the full model on every timed image
        assert row["same_head"] == 32 and row["max_abs_logit_diff"] < 1e-4
        assert row["images_per_sec"] > 0
    text = (tmp_path / "anytime-latest-step0-max_softmax.md").read_text()
    assert "| C1 |" in text and "| inf |" in text and "images/s" in text
    assert "| ensemble of all heads |" in capsys.readouterr().out


def test_cli_refuses_what_cannot_exit_early(initialised_run, tmp_path):
    with pytest.raises(errors.ConfigError, match="main path alone"):
        anytime_tool.main([f"--workdir={initialised_run}", "--from=export", f"--out={tmp_path}"])
    with pytest.raises(cli.UsageError, match="rule"):
        anytime_tool.main([f"--workdir={initialised_run}", "--rule=margin"])
    with pytest.raises(errors.ConfigError, match="--taus"):
        anytime_tool.main([f"--workdir={initialised_run}", "--taus=0.5,high"])
