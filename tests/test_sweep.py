"""Sweep runner, results tables and the seed vmap (dks_jax.tools.sweep, tools.tables, dks_jax.seeds)."""

import csv
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dks_jax import config_base, errors, optim, seeds, steps
from dks_jax import state as state_lib
from dks_jax.tools import sweep, tables

# ---- config specs -------------------------------------------------------------------------------


def test_split_configs_keeps_commas_inside_presets():
    text = ("configs/cifar100_resnet32.py:baseline,configs/cifar100_resnet32.py:dks,"
            "configs/densenet40_noisy_cifar10.py:dks,0.5,configs/quickstart.py")
    assert sweep.split_configs(text) == [
        "configs/cifar100_resnet32.py:baseline", "configs/cifar100_resnet32.py:dks",
        "configs/densenet40_noisy_cifar10.py:dks,0.5", "configs/quickstart.py"]
    assert sweep.split_configs(["a.py:x", "b.py:y,0.8"]) == ["a.py:x", "b.py:y,0.8"]
    assert sweep.config_name("configs/densenet40_noisy_cifar10.py:dks,0.5") == \
        "densenet40_noisy_cifar10-dks-0.5"
    assert sweep.config_name("configs/cifar100_resnet32.py") == "cifar100_resnet32"
    assert sweep.parse_seeds("5") == [0, 1, 2, 3, 4]
    assert sweep.parse_seeds("0,3,7") == [0, 3, 7]
    assert sweep.parse_seeds("2-4") == [2, 3, 4] and sweep.parse_seeds("0-0") == [0]
    with pytest.raises(ValueError, match="at least one seed"):
        sweep.parse_seeds("0")  # a count


def test_load_config_with_overrides():
    """The sweep's overrides are the trainer's --config.<field>=<value>, parsed by ml_collections."""
    c = config_base.load("configs/cifar100_resnet32.py:ds",
                         ["--config.num_epochs=30", "--config.loss.beta=0.5",
                          "--config.lr_boundaries=(10, 20)", "--config.aux=simple",
                          "--config.nesterov=false", "--config.loss.kd_heads=(0,)"])
    assert (c.method, c.num_epochs, c.loss.beta, tuple(c.lr_boundaries), c.aux) == \
        ("ds", 30.0, 0.5, (10, 20), "simple")
    assert c.nesterov is False and tuple(c.loss.kd_heads) == (0,)
    with pytest.raises(errors.ConfigError, match="num_epoch.*Fields: .*num_epochs"):
        config_base.load("configs/cifar100_resnet32.py:ds", ["--config.num_epoch=3"])
    with pytest.raises(errors.ConfigError, match="--config.<field>=<value>"):
        config_base.load("configs/cifar100_resnet32.py:ds", ["num_epochs=3"])
    with pytest.raises(errors.ConfigError, match="Unknown preset 'dsk'"):
        config_base.load("configs/cifar100_resnet32.py:dsk")
    with pytest.raises(errors.ConfigError, match="not found"):
        config_base.load("configs/nothing.py")


# ---- tables on hand-written run folders ---------------------------------------------------------


def _config(method, **kw):
    c = dict(model="cifar_resnet32", dataset="/data/cifar10-jpeg.tar.gz", method=method,
             label_noise=0.0, num_epochs=200.0, seed=0)
    c.update(kw)
    return c


def _write_main_run(folder, config, final, total_steps=100):
    """A run folder as dks_jax.main leaves it: config.json and metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    lines = [{"step": 0, "total_steps": total_steps, "steps_per_epoch": 10},
             {"step": 50, "loss": 2.0, "train_top1/C1": 0.3},
             {"step": 50, "eval_top1/C1": 10.0, "eval_top5/C1": 20.0},
             {"step": total_steps, "loss": 1.0, "train_top1/C1": 0.6}]
    if final is not None:
        lines.append({"step": total_steps, **final})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _write_sweep_run(folder, config, final, wall=600.0):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "result.json").write_text(json.dumps(
        {"config": config, "metrics": final, "wall_time_s": wall, "device": "1 x H100",
         "command": "python -m dks_jax.tools.sweep ..."}))


BASE_TOP1 = [70.0, 71.0, 73.0]  # mean 71.3333, sample std sqrt(7/3) = 1.52753
BASE_TOP5 = [90.0, 90.0, 93.0]  # mean 91, sample std sqrt(3) = 1.73205
DKS = [  # (C1 top1, C1 top5, C2 top1, C3 top1, ensemble top1)
    (74.0, 94.0, 72.0, 65.0, 75.0),
    (76.0, 95.0, 73.0, 66.0, 77.0),
]


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "runs"
    for k, (t1, t5) in enumerate(zip(BASE_TOP1, BASE_TOP5, strict=True)):
        _write_main_run(root / "r32-baseline" / f"seed{k}", _config("baseline", seed=k),
                        {"eval_top1/C1": t1, "eval_top5/C1": t5, "eval_count": 10000})
    # An unfinished run (no final evaluation at total_steps) is left out.
    _write_main_run(root / "r32-baseline" / "seed3", _config("baseline", seed=3), None)
    for k, (c1, c1t5, c2, c3, ens) in enumerate(DKS):
        final = {"eval_top1/C1": c1, "eval_top5/C1": c1t5, "eval_top1/C2": c2,
                 "eval_top5/C2": 90.0, "eval_top1/C3": c3, "eval_top5/C3": 85.0,
                 "eval_top1/ensemble": ens, "eval_top5/ensemble": 96.0, "eval_count": 10000}
        _write_sweep_run(root / "r32-dks" / f"seed{k}", _config("dks", seed=k), final,
                         wall=600.0 + 60 * k)
    _write_sweep_run(root / "dn40-dks" / "seed0",
                     _config("dks", model="densenet40_k12", label_noise=0.5, num_epochs=300.0),
                     {"eval_top1/C1": 80.0, "eval_top5/C1": 97.0, "eval_top1/C2": 70.0,
                      "eval_top5/C2": 95.0})
    return root


def test_table_mean_std_by_hand(fake_runs, tmp_path):
    rows = tables.table(fake_runs, results_dir=tmp_path / "results", name="t")
    by = {r["config"]: r for r in rows}
    assert set(by) == {"r32-baseline", "r32-dks", "dn40-dks"}
    b = by["r32-baseline"]
    assert b["seeds"] == 3
    assert b["top1_mean"] == pytest.approx(214.0 / 3)
    assert b["top1_std"] == pytest.approx(math.sqrt(((70 - 214 / 3) ** 2 + (71 - 214 / 3) ** 2
                                                     + (73 - 214 / 3) ** 2) / 2))
    assert b["top1_std"] == pytest.approx(1.5275252, abs=1e-6)
    assert (b["top5_mean"], b["top5_std"]) == pytest.approx((91.0, math.sqrt(3.0)))
    d = by["r32-dks"]
    assert (d["top1_mean"], d["top1_std"]) == pytest.approx((75.0, math.sqrt(2.0)))
    assert (d["C2_top1_mean"], d["C2_top1_std"]) == pytest.approx((72.5, math.sqrt(0.5)))
    assert (d["C3_top1_mean"], d["ensemble_top1_mean"]) == pytest.approx((65.5, 76.0))
    assert math.isnan(by["dn40-dks"]["top1_std"])  # one seed: no sample std

    text = (tmp_path / "results" / "t.csv").read_text()
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == [
        "config", "model", "dataset", "method", "label_noise", "seeds", "epochs",
        "top1_mean", "top1_std", "top5_mean", "top5_std",
        "C2_top1_mean", "C2_top1_std", "C2_top5_mean", "C2_top5_std",
        "C3_top1_mean", "C3_top1_std", "C3_top5_mean", "C3_top5_std",
        "ensemble_top1_mean", "ensemble_top1_std", "ensemble_top5_mean", "ensemble_top5_std"]
    csv_rows = {r[0]: dict(zip(table[0], r, strict=True)) for r in table[1:]}
    base = csv_rows["r32-baseline"]
    assert base["model"] == "cifar_resnet32" and base["dataset"] == "cifar10-jpeg"
    assert base["method"] == "baseline" and base["seeds"] == "3" and base["epochs"] == "200"
    assert float(base["top1_mean"]) == pytest.approx(71.3333, abs=1e-4)
    assert float(base["top1_std"]) == pytest.approx(1.5275, abs=1e-4)
    assert base["C2_top1_mean"] == ""  # the baseline has no branches
    assert csv_rows["dn40-dks"]["label_noise"] == "0.5" and csv_rows["dn40-dks"]["top1_std"] == ""

    md = (tmp_path / "results" / "t.md").read_text()
    # Error rates mean(std): baseline 28.67(1.53), DKS 25.00(1.41), gain +3.67 (DKS Table 1 style).
    base_line = next(line for line in md.splitlines() if "| baseline |" in line)
    dks_line = next(line for line in md.splitlines() if "| DKS |" in line and "r32-dks" in line)
    assert "28.67(1.53)" in base_line and "9.00(1.73)" in base_line
    assert "25.00(1.41)" in dks_line and "+3.67" in dks_line and "27.50(0.71)" in dks_line
    assert "10.5 min" in dks_line  # mean wall time per run: (600 s + 660 s) / 2
    assert "ddof=1" in md and "1 x H100" in md


def test_welch_by_hand_and_the_comparisons_section(fake_runs, tmp_path):
    # Baseline 70, 71, 73 vs DKS 74, 76: diff 3.6667, standard error^2 = 7/9 + 1 = 16/9, t = 2.75,
    # Welch-Satterthwaite dof = (16/9)^2 / ((7/9)^2 / 2 + 1^2 / 1) = 2.4265.
    w = tables.welch([74.0, 76.0], BASE_TOP1)
    assert w["diff"] == pytest.approx(11.0 / 3)
    assert w["t"] == pytest.approx(2.75)
    assert w["dof"] == pytest.approx((16 / 9) ** 2 / ((7 / 9) ** 2 / 2 + 1.0), rel=1e-9)
    from scipy import stats

    ref = stats.ttest_ind([74.0, 76.0], BASE_TOP1, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue) and 0.05 < w["p"] < 0.2
    assert math.isnan(tables.welch([1.0], [2.0, 3.0])["p"])  # one value: undefined
    assert math.isnan(tables.welch([1.0, 1.0], [2.0, 2.0])["t"])  # no variance: undefined

    rows = tables.table(fake_runs, results_dir=tmp_path / "results", name="t")
    tests = tables.comparisons(rows)
    assert [(c["a"], c["b"], c["head"]) for c in tests] == [("dks", "baseline", "top1")]
    assert tests[0]["p"] == pytest.approx(w["p"])
    md = (tmp_path / "results" / "t.md").read_text()
    line = next(x for x in md.splitlines() if "| DKS vs baseline |" in x)
    assert "| 2 vs 3 |" in line and "+3.67" in line and "2.75" in line
    seeds = next(x for x in md.splitlines() if x.startswith("| r32-baseline | 0, 1, 2 |"))
    assert "70.00, 71.00, 73.00" in seeds


def test_curves_mean_and_band_over_seeds(tmp_path):
    from dks_jax.tools import curves

    root = tmp_path / "runs"
    for k, scale in enumerate((1.0, 3.0)):
        folder = root / "r-dks" / f"seed{k}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(_config("dks", seed=k)))
        lines = [{"step": 0, "total_steps": 20, "steps_per_epoch": 10},
                 {"step": 10, "loss": 2.0 * scale}, {"step": 20, "loss": 1.0 * scale},
                 {"step": 20, "loss": 0.5 * scale}]  # a resumed run logs step 20 again: last wins
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (folder / "result.json").write_text(json.dumps({"config": _config("dks", seed=k)}))
    running = root / "r-dks" / "seed2"  # in progress: in the figures, not in curves.md
    running.mkdir()
    (running / "metrics.jsonl").write_text(json.dumps({"step": 0, "steps_per_epoch": 10}) + "\n"
                                           + json.dumps({"step": 10, "loss": 9.0}) + "\n")
    _write_main_run(root / "r-base" / "seed0", _config("baseline"), None)
    (root / "r-none" / "seed0").mkdir(parents=True)  # no metrics yet: no figure
    (root / "r-none" / "seed0" / "config.json").write_text(json.dumps(_config("ds")))
    x, mean, std, n = curves.band(curves.seed_runs(root / "r-dks"), "loss")
    assert n == 3 and list(x) == [1.0]  # the figures draw the run in progress too
    x, mean, std, n = curves.band(curves.seed_runs(root / "r-dks")[:2], "loss")
    assert n == 2 and list(x) == [1.0, 2.0]
    np.testing.assert_allclose(mean, [4.0, 1.0])
    np.testing.assert_allclose(std, [np.std([2, 6], ddof=1), np.std([0.5, 1.5], ddof=1)])
    pytest.importorskip("matplotlib")
    written = curves.plot_sweep(root, tmp_path / "png")
    names = sorted(p.name for p in written)
    assert names == ["curves-cifar_resnet32-noise0-200ep.png", "curves-r-base.png",
                     "curves-r-dks.png", "curves.md"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written if p.suffix == ".png")
    # The end-of-training table: the last epoch both seeds logged, mean(std) over the seeds.
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in (tmp_path / "png" / "curves.md").read_text().splitlines()
            if line.startswith("| r-")}
    assert rows["r-dks"][1:4] == ["2", "2", f"{1.0:.3f}({np.std([0.5, 1.5], ddof=1):.3f})"]


def test_table_cli_on_existing_runs(fake_runs, tmp_path, capsys):
    out = tmp_path / "res"
    assert sweep.main(["--table_only", f"--workdir={fake_runs}", f"--results_dir={out}",
                       "--name=cli"]) == 0
    assert (out / "cli.md").exists() and (out / "cli.csv").exists()
    assert "28.67(1.53)" in capsys.readouterr().out


def test_sweep_refuses_a_folder_of_another_config(fake_runs, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("from dks_jax import config_base\n\ndef get_config(method=None):\n"
                   "    return config_base.with_method(config_base.base(), method or 'dks')\n")
    (fake_runs / "c-dks").mkdir()
    (fake_runs / "c-dks" / "seed0").symlink_to(fake_runs / "r32-dks" / "seed0")
    with pytest.raises(errors.ConfigError, match="another config"):
        sweep.run_sweep([f"{cfg}:dks"], 1, fake_runs, results_dir=tmp_path / "r",
                        train_fn=lambda *a, **k: pytest.fail("must not train"))


# ---- end to end on real images ------------------------------------------------------------------

# cifar_resnet8 (n=1) with its paper branches: the same code paths as cifar_resnet32, a fraction of
# the compile time on 2 CPU cores.
TINY_CONFIG = """
from dks_jax import config_base


def get_config(method=None):
    c = config_base.with_method(config_base.base(), method or "dks")
    c.model = "cifar_resnet8"
    c.dataset, c.num_classes, c.loader = {root!r}, 10, "in_memory"
    c.batch_size, c.eval_batch_size = 16, 40
    c.num_epochs = 3 * 16 / 400  # 3 steps on the 400 training images
    c.learning_rate, c.lr_boundaries = 0.05, (1.0,)
    c.log_every_steps, c.eval_every_epochs, c.checkpoint_every_epochs = 1, 100.0, 100.0
    c.async_checkpointing = False
    return c
"""


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_end_to_end_sweep_of_two_seeds(cifar_subset, tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY_CONFIG.format(root=str(cifar_subset)))
    runs, results = tmp_path / "runs", tmp_path / "results"
    rows = sweep.run_sweep(f"{cfg}:dks", 2, runs, results_dir=results, name="tiny",
                           overrides=["--config.loss.beta=0.5"], command="pytest")
    assert len(rows) == 1 and rows[0]["seeds"] == 2 and rows[0]["method"] == "dks"
    finals = []
    for k in (0, 1):
        result = json.loads((runs / "tiny-dks" / f"seed{k}" / "result.json").read_text())
        assert result["config"]["seed"] == k and result["config"]["loss"]["beta"] == 0.5
        assert result["metrics"]["eval_count"] == 200
        finals.append(result["metrics"])
    for head in ("C1", "C2", "C3", "ensemble"):
        mean, std = tables.mean_std([f[f"eval_top1/{head}"] for f in finals])
        prefix = "" if head == "C1" else f"{head}_"
        assert rows[0][f"{prefix}top1_mean"] == pytest.approx(mean)
        assert rows[0][f"{prefix}top1_std"] == pytest.approx(std, nan_ok=True)
    # The seeds really differ (own initialisation and data order).
    losses = [[json.loads(x)["loss"] for x in (runs / "tiny-dks" / f"seed{k}" / "metrics.jsonl")
               .read_text().splitlines() if '"loss"' in x] for k in (0, 1)]
    assert losses[0] != losses[1]
    assert (results / "tiny.md").exists() and (results / "tiny.csv").exists()
    # Resumable: finished runs are not trained again.
    again = sweep.run_sweep(f"{cfg}:dks", 2, runs, results_dir=results, name="tiny",
                            overrides=["--config.loss.beta=0.5"],
                            train_fn=lambda *a, **k: pytest.fail("finished run trained again"))
    assert again[0]["top1_mean"] == pytest.approx(rows[0]["top1_mean"])
    # A changed config is not mixed into the same folders.
    with pytest.raises(errors.ConfigError, match="another config.*beta"):
        sweep.run_sweep(f"{cfg}:dks", 1, runs, results_dir=results, overrides=["--config.loss.beta=2.0"],
                        train_fn=lambda *a, **k: pytest.fail("must not train"))
    # The analysis CLI on a real run folder: latest checkpoint + the run's evaluation images.
    from dks_jax.tools import analysis

    run = runs / "tiny-dks" / "seed0"
    assert analysis.main(["consistency", f"--workdir={run}", "--num_images=16"]) == 0
    assert analysis.main(["heatmap", f"--workdir={run}", "--num_images=16"]) == 0
    assert analysis.main(["curves", f"--workdir={run}"]) == 0
    for png in ("heatmap_C3_cka.png", "curves.png"):
        assert (run / png).read_bytes().startswith(b"\x89PNG")


# ---- the seed vmap ------------------------------------------------------------------------------


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_vmapped_seeds_equal_separate_runs():
    """Init and 3 DHM steps (random branch mask, BN statistics) of 2 seeds at once == one by one."""
    c = config_base.base()
    c.model, c.method, c.batch_size = "cifar_resnet8", "dhm", 8
    c.loss.mimic_prob = 0.5
    seed_list, num_steps = [0, 3], 3
    tx, schedule = optim.create_optimizer(c, 2)  # lr drops at "epoch" 60: constant here
    graphdef, stacked = state_lib.initial_states(c, 10, seed_list, tx)
    assert jax.tree.leaves(stacked["params"])[0].shape[0] == 2
    spec = state_lib.objective_spec(c, 3, steps_per_epoch=1, total_steps=num_steps)

    rng = np.random.default_rng(0)
    batches = [[{"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(num_steps)]
               for _ in seed_list]

    vstep = jax.jit(seeds.vmap_seeded_step(
        lambda k: steps.make_train_step(graphdef, tx, schedule, spec, k), seed_list))
    state, vmetrics = stacked, []
    for t in range(num_steps):
        state, m = vstep(state, seeds.stack([batches[i][t] for i in range(len(seed_list))]))
        vmetrics.append(m)

    # Separate single-seed runs: train.initial_state + steps.make_train_step(seed=k).
    init_one = jax.jit(lambda key: state_lib.initial_state(state_lib.create_model(c, 10, seed=key), tx)[1])
    step_one = jax.jit(lambda k, s, b: steps.make_train_step(graphdef, tx, schedule, spec, k)(s, b))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for i, k in enumerate(seed_list):
        single = init_one(jax.random.key(k))
        jax.tree.map(close, seeds.unstack(stacked, i), single)
        for t in range(num_steps):
            single, m = step_one(k, single, batches[i][t])
            close(vmetrics[t]["loss"][i], m["loss"])
            for key in m:
                if key.startswith("loss/"):
                    close(vmetrics[t][key][i], m[key])
        jax.tree.map(close, seeds.unstack(state, i), single)
    # The two seeds are different runs.
    a, b = (seeds.unstack(state, i)["params"]["fc"]["kernel"] for i in (0, 1))
    assert not np.allclose(a, b)


def test_vmap_step_and_eval_helpers():
    def step(state, batch, scale):
        new = {"w": state["w"] - scale * jnp.mean(batch["x"]), "n": state["n"] + 1}
        return new, {"mean": jnp.mean(batch["x"])}

    states = seeds.stack([{"w": jnp.float32(1.0), "n": jnp.int32(0)},
                          {"w": jnp.float32(2.0), "n": jnp.int32(0)}])
    batch = seeds.stack([{"x": jnp.arange(4.0)}, {"x": jnp.arange(4.0) + 10}])
    new, m = jax.jit(seeds.vmap_step(step))(states, batch, 0.5)
    np.testing.assert_allclose(new["w"], [1.0 - 0.75, 2.0 - 5.75])
    np.testing.assert_array_equal(new["n"], [1, 1])
    np.testing.assert_allclose(m["mean"], [1.5, 11.5])
    assert float(seeds.unstack(new, 1)["w"]) == pytest.approx(-3.75)
    sums = seeds.vmap_eval(lambda s, b: {"y": s["w"] * jnp.sum(b["x"])})(new, {"x": jnp.ones(3)})
    np.testing.assert_allclose(sums["y"], [0.75, -11.25])
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = seeds.stacked_batch_sharding(mesh)
    x = jax.device_put(np.zeros((2, 8, 3), np.float32), sharding)
    assert x.sharding.spec == jax.sharding.PartitionSpec(None, "data")


def test_vmap_seeds_sweep_writes_one_result_per_seed(tmp_path):
    """--vmap_seeds: one trainer call with config.num_seeds = 3, a result.json per seed."""
    cfg = tmp_path / "v.py"
    cfg.write_text("from dks_jax import config_base\n\ndef get_config(method=None):\n"
                   "    c = config_base.with_method(config_base.base(), method or 'dks')\n"
                   "    c.num_seeds = 1\n    return c\n")
    calls = []

    def fake_train(config, workdir, mesh=None):
        calls.append((config.seed, config.num_seeds, workdir.name))
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(config.to_json())
        (workdir / "metrics.jsonl").write_text(json.dumps(
            {"step": 5, "total_steps": 5, "eval_top1/C1": 99.0}) + "\n")  # must not be read
        per_seed = [{"eval_top1/C1": 60.0 + k, "eval_top5/C1": 90.0, "eval_count": 10}
                    for k in range(config.seed, config.seed + config.num_seeds)]
        return {"per_seed": per_seed, "eval_top1/C1": 61.0}

    runs = tmp_path / "runs"
    rows = sweep.run_sweep(f"{cfg}:ds", "2,3,4", runs, results_dir=tmp_path / "r",
                           vmap_seeds=True, train_fn=fake_train)
    assert calls == [(2, 3, "seeds2-4")]
    assert rows[0]["seeds"] == 3 and rows[0]["top1_mean"] == pytest.approx(63.0)
    assert rows[0]["top1_std"] == pytest.approx(1.0)
    record = json.loads((runs / "v-ds" / "seed3" / "result.json").read_text())
    assert record["config"]["seed"] == 3 and record["vmapped_seeds"] == 3
    again = sweep.run_sweep(f"{cfg}:ds", "2,3,4", runs, results_dir=tmp_path / "r",
                            vmap_seeds=True, train_fn=lambda *a, **k: pytest.fail("trained"))
    assert again[0]["top1_mean"] == pytest.approx(63.0)
    with pytest.raises(ValueError, match="consecutive"):
        sweep.run_sweep(f"{cfg}:ds", "0,2", runs, vmap_seeds=True, train_fn=fake_train)
