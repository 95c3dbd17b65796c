"""train_and_evaluate end to end on the real CIFAR-10 images (a small subset), with a tiny model."""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dks_jax import checkpointing, config_base, errors, export, metrics, models, parallel, train
from dks_jax import state as state_lib

TINY = dict(model="cifar_resnet8")
TRAIN_IMAGES = 400  # the cifar_subset fixture: 40 per class


def tiny_config(data_root, **overrides):
    """A few steps of a tiny CIFAR ResNet on the real-image subset (unlocked, for tests)."""
    c = config_base.base()
    c.model = TINY["model"]
    c.dataset, c.data_dir = str(data_root), ""
    c.num_classes = 10
    c.loader = "in_memory"
    c.batch_size, c.eval_batch_size = 16, 48
    c.num_epochs = 2 * 16 / TRAIN_IMAGES * 2  # 4 steps
    c.learning_rate = 0.05
    c.lr_boundaries = (1.0,)
    c.log_every_steps = 2
    c.eval_every_epochs = 100.0  # only at the end
    c.checkpoint_every_epochs = 100.0
    c.async_checkpointing = False
    for k, v in overrides.items():
        if "." in k:
            sub, field = k.split(".")
            c[sub][field] = v
        else:
            c[k] = v
    return c


def flat(tree) -> dict:
    """``{"a/0/b": array}``: a pytree's leaves by path (restores spell list indices as strings)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
            for path, x in leaves}


def params_of(workdir):
    """The latest checkpoint's parameters, as NumPy."""
    ck = checkpointing.Checkpoints(workdir, async_save=False)
    step = ck.latest_step()
    state = ck._manager.restore(step)  # raw restore, no target
    ck.close()
    return step, jax.tree.map(np.asarray, state["params"])


# baseline and dks also train in the default suite elsewhere (a branch alone, the workdir lock).
# Every objective is checked against hand values in test_losses; end to end, DS runs in the
# default suite and the others (15-20 s each on 2 cores) in `make test-all`.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m != "ds" else m
                                    for m in ("baseline", "ds", "dsn", "dks", "dhm", "byot")])
def test_every_method_trains_end_to_end(cifar_subset, tmp_path, method):
    config = tiny_config(cifar_subset, method=method, aux="none" if method == "baseline" else "paper")
    result = train.train_and_evaluate(config, tmp_path)
    heads = 1 if method == "baseline" else 3
    assert result["eval_count"] == 200  # every test image exactly once
    for i in range(heads):
        assert 0.0 <= result[f"eval_top1/C{i + 1}"] <= result[f"eval_top5/C{i + 1}"] <= 100.0
    assert ("eval_top1/ensemble" in result) == (heads > 1)
    logged = metrics.read_metrics(tmp_path)
    train_rows = [r for r in logged if "loss" in r]
    assert train_rows and all(math.isfinite(r["loss"]) for r in train_rows)
    for key in ("lr", "grad_norm", "param_norm", "images_per_sec", "eta_min", "train_top1/C1"):
        assert key in train_rows[-1]
    assert any(k.startswith("loss/") for k in train_rows[-1])
    if method == "byot":  # all three of its terms, through the branches' adaptation layers
        assert {"loss/ce/1", "loss/distill/1", "loss/hint/1", "loss/hint/2"} <= set(train_rows[-1])
    assert (tmp_path / "export" / checkpointing.EXPORT_META).exists()
    assert not (tmp_path / checkpointing.LOCK_FILE).exists()  # released at the end
    exported = export.load_exported_model(tmp_path / "export")[0]  # the main path alone
    assert exported.num_heads == 1
    assert (tmp_path / "config.json").exists()


def test_a_branch_trained_alone_exports_its_own_network(cifar_subset, tmp_path):
    config = tiny_config(cifar_subset, method="baseline", aux="paper", branch_alone="C3")
    result = train.train_and_evaluate(config, tmp_path)
    assert "eval_top1/C1" in result and "eval_top1/C2" not in result  # one head: the branch's
    model, meta = export.load_exported_model(tmp_path / "export")
    assert meta["alone"] == "C3" and model.num_heads == 1
    ref = models.create(TINY["model"], 10, alone="C3", rngs=nnx.Rngs(0))
    assert model.stages[-1][0].conv1.kernel.shape == ref.stages[-1][0].conv1.kernel.shape


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_loss_falls_on_real_images(cifar_subset, tmp_path):
    config = tiny_config(cifar_subset, method="dks", num_epochs=8.0, log_every_steps=25,
                         learning_rate=0.05, lr_boundaries=(100.0,), batch_size=32)
    train.train_and_evaluate(config, tmp_path)
    rows = [r for r in metrics.read_metrics(tmp_path) if "loss" in r]
    assert len(rows) >= 4
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], rows
    assert rows[-1]["loss/ce/0"] < 0.9 * rows[0]["loss/ce/0"], rows


def test_resume_continues_exactly(cifar_subset, tmp_path):
    config = tiny_config(cifar_subset, method="dhm", num_epochs=6 * 16 / TRAIN_IMAGES)
    train.train_and_evaluate(config, tmp_path / "straight")
    out = train.train_and_evaluate(config, tmp_path / "resumed", stop_at_step=3)
    assert out == {"stopped_at_step": 3}
    first_segment = metrics.time_so_far(tmp_path / "resumed")
    assert first_segment > 0
    train.train_and_evaluate(config, tmp_path / "resumed")
    # The training time goes on from the first segment's instead of starting again.
    elapsed = [r["elapsed_s"] for r in metrics.read_metrics(tmp_path / "resumed") if "elapsed_s" in r]
    assert elapsed == sorted(elapsed) and elapsed[-1] > first_segment
    step_a, a = params_of(tmp_path / "straight")
    step_b, b = params_of(tmp_path / "resumed")
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_one_and_eight_devices_agree(cifar_subset, tmp_path):
    """Whole-batch BN (bn_group_size=0): 1 and 8 devices compute the same training run up to fp32
    summation order: after 2 steps the parameters differ by ~0.3% of how far training moved them
    (measured 2026-11-22; BN channels with tiny variance amplify the reduction-order noise), while
    per-device BN statistics (groups of 2 = each device's share) differ by ~34%."""
    assert jax.device_count() == 8
    config = tiny_config(cifar_subset, method="dks", num_epochs=2 * 16 / TRAIN_IMAGES, log_every_steps=1)
    r1 = train.train_and_evaluate(config, tmp_path / "one", mesh=parallel.create_mesh(jax.devices()[:1]))
    r8 = train.train_and_evaluate(config, tmp_path / "eight", mesh=parallel.create_mesh())
    config.bn_group_size = 2
    train.train_and_evaluate(config, tmp_path / "grouped", mesh=parallel.create_mesh())
    _, a = params_of(tmp_path / "one")
    _, b = params_of(tmp_path / "eight")
    _, g = params_of(tmp_path / "grouped")
    init = state_lib.initial_state(state_lib.create_model(config, 10), optax.identity())[1]["params"]
    norm = lambda p, q: float(np.sqrt(sum(np.sum((x - flat(q)[k]) ** 2) for k, x in flat(p).items())))
    moved = norm(a, init)  # how far two steps of training moved the parameters
    assert norm(a, b) < 1e-2 * moved, (norm(a, b), moved)
    assert norm(a, g) > 1e-1 * moved, (norm(a, g), moved)
    loss = lambda d: [r["loss"] for r in metrics.read_metrics(d) if "loss" in r]
    np.testing.assert_allclose(loss(tmp_path / "one"), loss(tmp_path / "eight"), rtol=1e-4)
    assert r1["eval_count"] == r8["eval_count"] == 200


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_export_round_trip(cifar_subset, tmp_path):
    config = tiny_config(cifar_subset, method="dks")
    train.train_and_evaluate(config, tmp_path)
    model, meta = export.load_exported_model(tmp_path / "export")
    assert meta["model"] == config.model and model.num_heads == 1
    # The training model (with branches) restored from the last checkpoint gives the same main logits.
    full = state_lib.create_model(config, 10)
    from flax import nnx

    graphdef, params, stats = nnx.split(full, nnx.Param, nnx.BatchStat)
    _, state = params_of(tmp_path)
    ck = checkpointing.Checkpoints(tmp_path, async_save=False)
    raw = ck._manager.restore(ck.latest_step())
    ck.close()
    trained = nnx.merge(graphdef, raw["params"], raw["batch_stats"])
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x, train=False)[0], trained(x, train=False)[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_kd_uses_a_teacher_export(cifar_subset, tmp_path):
    teacher = tiny_config(cifar_subset, method="baseline", aux="none")
    train.train_and_evaluate(teacher, tmp_path / "teacher")
    student = tiny_config(cifar_subset, method="kd", aux="paper")
    student.loss.teacher_checkpoint = str(tmp_path / "teacher")
    student.loss.kd_heads = (0, 1)
    result = train.train_and_evaluate(student, tmp_path / "student")
    rows = [r for r in metrics.read_metrics(tmp_path / "student") if "loss" in r]
    assert any("kd" in k for k in rows[-1]) and result["eval_count"] == 200


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_divergence_names_a_good_checkpoint_and_resuming_from_it_works(cifar_subset, tmp_path):
    one_step = 16 / TRAIN_IMAGES
    config = tiny_config(cifar_subset, method="ds", learning_rate=1e6, num_epochs=10 * one_step,
                         checkpoint_every_epochs=one_step, log_every_steps=1)
    with pytest.raises(train.TrainingDiverged) as e:
        train.train_and_evaluate(config, tmp_path)
    assert isinstance(e.value, FloatingPointError) and isinstance(e.value, errors.UserError)
    record = json.loads((tmp_path / train.NONFINITE_FILE).read_text())
    bad, good = record["step"], record["resume_from"]
    assert f"after {bad} steps" in str(e.value) and "learning rate 1e+06" in str(e.value)
    # Every checkpoint from the failing state on is set aside; the one named is older.
    assert good is not None and good < bad and f"checkpoint is step {good}" in str(e.value)
    assert record["set_aside"] and min(record["set_aside"]) == bad
    for s in record["set_aside"]:
        assert (tmp_path / "checkpoints" / f"nonfinite-{s}").exists()
    ck = checkpointing.Checkpoints(tmp_path, async_save=False)
    assert ck.latest_step() == good
    ck.close()
    # The next run resumes there, with a sane learning rate (allowed once, and logged).
    config.learning_rate = 0.05
    result = train.train_and_evaluate(config, tmp_path)
    assert math.isfinite(result["eval_top1/C1"])
    assert (tmp_path / f"nonfinite-{bad}.json").exists()
    lines = [r for r in metrics.read_metrics(tmp_path) if "loss" in r and r["step"] > good]
    assert lines and all(math.isfinite(r["loss"]) for r in lines[-(10 - good):])
    # The allowance is spent: a further change of the learning rate is refused again.
    config.learning_rate, config.num_epochs = 0.01, 12 * one_step
    with pytest.raises(checkpointing.CheckpointError, match="learning_rate"):
        train.train_and_evaluate(config, tmp_path)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("model", "resnet9000", "Unknown config.model.*cifar_resnet32"),
    ("method", "magic", "Unknown config.method.*dks"),
    ("dtype", "float8", "Unknown config.dtype"),
    ("loss.dsn_norm", "outside", "Unknown config.loss.dsn_norm.*weight_decay"),
    ("branch_alone", "C2", "branch_alone='C2'.*baseline"),
])
def test_unknown_names_list_the_valid_ones(cifar_subset, tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(tiny_config(cifar_subset, **{field: value}), tmp_path)


@pytest.mark.parametrize("field,value", [
    ("learning_rate", float("nan")), ("learning_rate", 0.0), ("learning_rate", -0.1),
    ("num_epochs", 0.0), ("batch_size", -16),
])
def test_bad_numbers_fail_before_data_naming_the_field(tmp_path, field, value):
    config = tiny_config(tmp_path / "no data needed", **{field: value})
    with pytest.raises(errors.ConfigError, match=rf"config\.{field}=.*must be a positive number"):
        train.train_and_evaluate(config, tmp_path / "w")


def test_unwritable_workdir_fails_before_data(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tiny_config(tmp_path / "no data needed")
    with pytest.raises(errors.ConfigError, match="cannot be written"):
        train.train_and_evaluate(config, blocker / "run")


def test_unknown_dataset_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path / "no_such_dataset")
    config.dataset = "no_such_dataset"
    with pytest.raises((ValueError, FileNotFoundError), match="no_such_dataset"):
        train.train_and_evaluate(config, tmp_path / "run")


def test_unknown_config_field_is_rejected():
    config = config_base.base()
    config.lock()
    with pytest.raises(AttributeError, match="learning_rat"):
        config.learning_rat = 0.3


def test_batch_that_does_not_divide_over_devices(cifar_subset, tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        train.train_and_evaluate(tiny_config(cifar_subset, batch_size=12), tmp_path)


HOLD_LOCK = """
import sys, time
from dks_jax import checkpointing
with checkpointing.workdir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_run_per_workdir_and_stale_lock_recovery(cifar_subset, tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
        with pytest.raises(checkpointing.WorkdirLocked, match=f"pid {holder.pid}"):
            train.train_and_evaluate(tiny_config(cifar_subset), tmp_path)
        # Stopped before touching the run: no config, metrics or checkpoints of its own.
        assert sorted(p.name for p in tmp_path.iterdir()) == [checkpointing.LOCK_FILE]
    finally:
        holder.kill()  # as a crash would: the lock stays behind, its process gone
        holder.wait(timeout=30)
    assert (tmp_path / checkpointing.LOCK_FILE).exists()
    with caplog.at_level("WARNING"):
        with checkpointing.workdir_lock(tmp_path):  # what train_and_evaluate takes first
            assert json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    assert not (tmp_path / checkpointing.LOCK_FILE).exists()  # released at the end


def test_lock_of_another_host_names_it_and_the_way_out(tmp_path):
    lock = tmp_path / checkpointing.LOCK_FILE
    lock.write_text(json.dumps({"host": "elsewhere-7", "pid": 1234, "started": "2026-11-01"}))
    with pytest.raises(checkpointing.WorkdirLocked) as e:
        with checkpointing.workdir_lock(tmp_path):
            pytest.fail("must not enter")
    assert "host elsewhere-7, pid 1234" in str(e.value) and f"delete {lock}" in str(e.value)
    assert isinstance(e.value, errors.UserError) and lock.exists()
    with checkpointing.workdir_lock(tmp_path, enabled=False):  # processes other than 0
        pass
    lock.unlink()
    with checkpointing.workdir_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(checkpointing.WorkdirLocked):  # not re-entrant: one run per workdir
            with checkpointing.workdir_lock(tmp_path):
                pass
    assert not lock.exists()


def test_workdir_holds_one_experiment(cifar_subset, tmp_path, caplog):
    """Rerunning a finished run with other experiment fields stops with their diff; the saved
    config is kept. Cadence, length and paths may change, and each change is logged."""
    config = tiny_config(cifar_subset, method="dks")
    first = train.train_and_evaluate(config, tmp_path)
    saved = (tmp_path / "config.json").read_text()
    other = tiny_config(cifar_subset, method="ds", seed=7, label_noise=0.5)
    other.loss.temperature = 3.0
    with pytest.raises(checkpointing.CheckpointError) as info:
        train.train_and_evaluate(other, tmp_path)
    message = str(info.value)
    for change in ("method: 'dks' -> 'ds'", "seed: 0 -> 7", "label_noise: 0.0 -> 0.5",
                   "loss.temperature: 1.0 -> 3.0"):
        assert change in message
    assert (tmp_path / "config.json").read_text() == saved
    longer = tiny_config(cifar_subset, method="dks", log_every_steps=1,
                         num_epochs=config.num_epochs * 1.5)
    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(longer, tmp_path)
    assert "log_every_steps changed: 2 -> 1" in caplog.text and "num_epochs changed" in caplog.text
    assert result["eval_top1/C1"] >= 0 and first["eval_count"] == result["eval_count"]
    # Another model in the same workdir: refused, then moved aside with start_over.
    other = tiny_config(cifar_subset, method="baseline", aux="none")
    with pytest.raises(checkpointing.CheckpointError, match="different experiment.*start_over"):
        train.train_and_evaluate(other, tmp_path)
    other.start_over = True
    train.train_and_evaluate(other, tmp_path)
    for name in ("checkpoints", "config.json", "metrics.jsonl"):
        assert (tmp_path / "previous-0" / name).exists()  # nothing lost, nothing mixed
    assert json.loads((tmp_path / "previous-0" / "config.json").read_text())["aux"] == "paper"
    assert json.loads((tmp_path / "config.json").read_text())["aux"] == "none"
    assert all(r["step"] <= 4 for r in metrics.read_metrics(tmp_path))  # only the new run's lines


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_corrupt_latest_checkpoint_falls_back(cifar_subset, tmp_path, caplog):
    config = tiny_config(cifar_subset, method="ds", checkpoint_every_epochs=2 * 16 / TRAIN_IMAGES)
    train.train_and_evaluate(config, tmp_path)
    ck = checkpointing.Checkpoints(tmp_path, async_save=False)
    assert ck.all_steps() == [2, 4]
    ck.close()
    for f in (tmp_path / "checkpoints" / "4").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    config.num_epochs = 6 * 16 / TRAIN_IMAGES
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, tmp_path)
    assert "unreadable" in caplog.text
    assert (tmp_path / "checkpoints" / "corrupt-4").exists()
    ck = checkpointing.Checkpoints(tmp_path, async_save=False)
    assert ck.latest_step() == 6
    ck.close()


@pytest.mark.slow  # about 57 s on 2 cores: `make test-all`
def test_num_seeds_equals_separate_runs(cifar_subset, tmp_path):
    """config.num_seeds=2 trains seeds 0 and 1 in one vmapped program; each equals its own run,
    label noise included (each seed draws its own)."""
    # Two steps on one device. This tiny net on noisy labels is chaotic: from step 3 on, a
    # difference of one rounding (1e-7, e.g. from another summation order) grows about tenfold
    # per step; a single seed-1 run on 1 vs 2 devices differs by 4e-4 after 4 steps at this
    # learning rate, and the vmapped seed 1 from its own run by 1e-7 after 2. After two steps a
    # real difference (another label, mask, image or initialisation) is far above the tolerance
    # and rounding far below it.
    mesh = parallel.create_mesh(jax.devices()[:1])
    two_steps = 2 * 16 / TRAIN_IMAGES
    config = tiny_config(cifar_subset, method="dhm", num_seeds=2, label_noise=0.5,
                         num_epochs=two_steps)
    result = train.train_and_evaluate(config, tmp_path / "vmapped", mesh=mesh)
    assert [r["seed"] for r in result["per_seed"]] == [0, 1]
    for seed in (1,):  # the second slot: its own init, data order and DHM mask
        single = tiny_config(cifar_subset, method="dhm", seed=seed, label_noise=0.5,
                             num_epochs=two_steps)
        one = train.train_and_evaluate(single, tmp_path / f"seed{seed}", mesh=mesh)
        a = export.load_exported_model(tmp_path / "vmapped" / "export" / f"seed{seed}")[0]
        b = export.load_exported_model(tmp_path / f"seed{seed}" / "export")[0]
        from flax import nnx

        pa, pb = flat(nnx.state(a, nnx.Param)), flat(nnx.state(b, nnx.Param))
        for k in pb:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5, err_msg=k)
        assert abs(result["per_seed"][seed]["eval_top1/C1"] - one["eval_top1/C1"]) <= 1.0
    mean = np.mean([r["eval_top1/C1"] for r in result["per_seed"]])
    assert result["eval_top1/C1"] == pytest.approx(mean)
    # Gradient consistency per seed, and their mean.
    cos = [r["grad_cos/C2"] for r in result["per_seed"]]
    assert all(-1.0 <= c <= 1.0 for c in cos) and result["grad_cos/C2"] == pytest.approx(np.mean(cos))
    assert one["grad_cos/C2"] == pytest.approx(cos[1], abs=1e-4)


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_gradient_consistency_is_logged(cifar_subset, tmp_path):
    result = train.train_and_evaluate(tiny_config(cifar_subset, method="ds"), tmp_path)
    for head in ("C2", "C3"):
        assert -1.0 <= result[f"grad_cos/{head}"] <= 1.0
    assert any("grad_cos/C2" in r for r in metrics.read_metrics(tmp_path))
    off = train.train_and_evaluate(tiny_config(cifar_subset, method="ds", log_grad_consistency=False),
                                   tmp_path / "off")
    assert "eval_top1/C2" in off and not any(k.startswith("grad_cos") for k in off)
