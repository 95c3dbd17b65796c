"""A lean installation (no TensorFlow): the CLI trains, writes TensorBoard events and a profile."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
from dks_jax import config_base


def get_config():
    c = config_base.with_method(config_base.base(), "dks")
    c.model = "cifar_resnet8"
    c.dataset, c.num_classes, c.loader = {root!r}, 10, "in_memory"
    c.batch_size, c.eval_batch_size = 16, 40
    c.num_epochs = 4 * 16 / 400  # 4 steps on the 400 training images
    c.learning_rate, c.lr_boundaries = 0.05, (1.0,)
    c.log_every_steps, c.eval_every_epochs, c.checkpoint_every_epochs = 1, 100.0, 100.0
    c.async_checkpointing = False
    c.profile_steps = 2
    return c
"""

# The CLI with TensorFlow (and TFDS, which needs it) unimportable, as on a lean GPU image.
LEAN_MAIN = (
    "import runpy, sys\n"
    "sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
    "sys.argv = ['dks_jax.main'] + sys.argv[1:]\n"
    "runpy.run_module('dks_jax.main', run_name='__main__')\n"
)


def test_without_tensorflow_events_hparams_profile(cifar_subset, tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG.format(root=str(cifar_subset)))
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", LEAN_MAIN, f"--config={config}", f"--workdir={workdir}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    # The one-time note of what is off, and the parameter table (main path vs branches).
    assert log.count("Off in this installation: TFDS data sets") == 1
    assert "Parameters (clu.parameter_overview counts)" in log
    assert "main path" in log and "branches/0" in log and "branches/1" in log
    # TensorBoard events with the tags of metrics.jsonl, and the hyperparameters.
    from tensorboard.backend.event_processing import event_accumulator

    (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    acc = event_accumulator.EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    logged = {k for line in (workdir / "metrics.jsonl").read_text().splitlines()
              for k, v in json.loads(line).items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "loss/ce/0", "eval_top1/C1", "eval_top5/ensemble", "grad_cos/C2"} <= tags
    assert logged <= tags
    final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    assert acc.Scalars("eval_top1/C1")[-1].value == final["eval_top1/C1"]
    hparams = events.read_bytes()
    assert b"hparams" in hparams and b"loss.beta" in hparams and b"learning_rate" in hparams
    # A jax.profiler trace of the profiled steps, in TensorBoard's profile folder.
    traces = list((workdir / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert "Profile of steps 2-3 written" in log
