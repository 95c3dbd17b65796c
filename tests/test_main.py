"""The command line: flags, config overrides, preemption (SIGTERM) and resume, in subprocesses."""

import os
import signal
import subprocess
import sys
import time

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
