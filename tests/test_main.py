"""The command line: flags, config overrides, preemption (SIGTERM) and resume, in subprocesses."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dks_jax import metrics

CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
from test_train import tiny_config


def get_config():
    c = tiny_config({data!r}, method="dks", num_epochs=30.0, log_every_steps=1,
                    checkpoint_every_epochs=1000.0)
    c.lock()
    return c
'''


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=1200")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _write_config(tmp_path, data_root):
    path = tmp_path / "tiny_config.py"
    path.write_text(CONFIG.format(tests=os.path.dirname(__file__), data=str(data_root)))
    return path


def test_unknown_override_is_rejected(cifar_subset, tmp_path):
    config = _write_config(tmp_path, cifar_subset)
    proc = subprocess.run(
        [sys.executable, "-m", "dks_jax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}",
         "--config.learning_rat=0.1"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_sigterm_saves_and_exits_then_resumes(cifar_subset, tmp_path):
    config, workdir = _write_config(tmp_path, cifar_subset), tmp_path / "run"
    cmd = [sys.executable, "-m", "dks_jax.main", f"--config={config}", f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env())
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if any("loss" in r for r in metrics.read_metrics(workdir)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "Stopped at step" in out
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < 750  # 30 epochs x 25 steps were planned
    assert not (workdir / "export").exists()  # not finished
    # Resuming continues from the saved step (shortened here to finish quickly).
    resume = subprocess.run(cmd + [f"--config.num_epochs={(saved[0] + 2) / 25}"],
                            capture_output=True, text=True, env=_env(), timeout=400)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    steps = [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r]
    assert steps[-1] == saved[0] + 2 and steps.count(saved[0] + 1) == 1
    assert (workdir / "export" / "model.json").exists()


def test_user_error_prints_one_message_without_traceback(tmp_path):
    missing = tmp_path / "no-such-data"
    cmd = [sys.executable, "-m", "dks_jax.main", "--config=configs/quickstart.py",
           f"--workdir={tmp_path / 'w'}", f"--config.dataset={missing}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and f"error: data set '{missing}' not found" in proc.stderr
    shown = subprocess.run(cmd + ["--traceback"], capture_output=True, text=True, env=_env(),
                           timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "DataNotFoundError" in shown.stderr


def test_console_lines_are_readable():
    console = metrics.ConsoleWriter()
    assert console.format(0, {"num_params": 331566, "num_heads": 3, "num_train": 50000,
                              "num_eval": 10000, "total_steps": 781, "num_devices": 1}) == (
        "331,566 parameters, 3 head(s), 50,000 training / 10,000 test images, 781 steps on 1 "
        "device(s)")
    line = console.format(50, {"loss": 19.36, "epoch": 0.064, "train_top1/C1": 0.17,
                               "images_per_sec": 137.2, "eta_min": 5.69, "lr": 0.06})
    assert line == ("step 50/781 (6%) | epoch 0.06 | loss 19.36 | train top-1 17.0% | 137 img/s | "
                    "eta 5m41s")
    assert console.format(781, {"eval_top1/C1": 52.0, "eval_top1/ensemble": 52.42,
                                "eval_top5/C1": 94.1}) == (
        "step 781/781 (100%) | test top-1 (%): C1 52.00 ensemble 52.42")
    assert console.format(60, {"steps_per_sec": 3.1, "uptime": 20.0}) == ""  # clu's notes
    assert metrics.format_duration(4000) == "1h06m" and metrics.format_duration(59.4) == "59s"


def test_summary_names_heads_time_and_workdir(tmp_path):
    from dks_jax import main

    (tmp_path / "export").mkdir()
    metrics.JsonlWriter(tmp_path / metrics.METRICS_FILE).write_scalars(5, {"images_per_sec": 300.0})
    text = main.summary({"eval_top1/C1": 55.5, "eval_top5/C1": 95.0, "eval_top1/ensemble": 56.0,
                         "eval_top5/ensemble": 95.5, "eval_top1/C2": 54.0, "eval_top5/C2": 94.0,
                         "eval_count": 10000}, tmp_path, 125.0)
    lines = text.splitlines()
    assert lines[0] == "Test accuracy (%) on 10000 images:"
    assert [ln.split()[0] for ln in lines[2:5]] == ["C1", "C2", "ensemble"]
    assert "Wall time 2m05s" in text and "300 images/s" in text
    assert "export/" in text and "checkpoints/" not in text  # only what the folder holds


CPU_FLAGS_SCRIPT = '''
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from dks_jax import losses, models
from dks_jax import state as state_lib
model = models.create("cifar_resnet8", 10, aux="none", rngs=nnx.Rngs(0))
images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
labels = jnp.arange(4)
graphdef, state = state_lib.initial_state(model, optax.sgd(0.1))
spec = losses.ObjectiveSpec(method="baseline", num_heads=1)
def loss_fn(params):
    m = nnx.merge(graphdef, params, state["batch_stats"])
    return losses.objective(m(images, train=True), labels, spec=spec, step=0,
                            rng=jax.random.key(0))[0]
loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state["params"])
m = nnx.merge(graphdef, state["params"], state["batch_stats"])
logits = jax.jit(lambda x: m(x, train=False))(images)
leaves = [np.asarray(loss), *map(np.asarray, logits), *map(np.asarray, jax.tree.leaves(grads))]
np.savez(sys.argv[1], *leaves)
'''


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_cpu_flags_change_no_result_beyond_float_tolerance(tmp_path):
    """The XNNPACK convolution flags the CLI sets on CPU: same loss, logits and gradients."""
    import numpy as np

    from dks_jax import xla_flags

    script = tmp_path / "step.py"
    script.write_text(CPU_FLAGS_SCRIPT)
    out = {}
    for name, flags in (("default", ""), ("xnnpack", " ".join(xla_flags.CPU_FLAGS))):
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npz")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(tmp_path / f"{name}.npz") as f:
            out[name] = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    assert len(out["default"]) == len(out["xnnpack"]) > 10  # loss, logits, every gradient
    for a, b in zip(out["default"], out["xnnpack"], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_cli_sets_cpu_flags_only_when_the_user_has_none():
    from dks_jax import xla_flags

    env = {}
    assert xla_flags.apply_cpu_defaults(env) and env["XLA_FLAGS"] == " ".join(xla_flags.CPU_FLAGS)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert not xla_flags.apply_cpu_defaults(env) and env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
