"""The trainer on models it did not write: ``config.model = "module:function"`` (``dks_jax.attach``).

Three models: the ViT of ``examples/vit.py`` (plain NNX, a call without ``train=``), the Linen CNN of
``examples/linen_cnn.py`` (through ``nnx.bridge``, BatchNorm in Linen) and a registry ResNet built
without branches by the factory below (taps from ``config.taps``, named by file path).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dks_jax import attach, checkpointing, config_base, errors, export, models, parallel, steps, train
from dks_jax import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve()

MODELS = {
    "vit": ("examples.vit:vit_tiny", "blocks.0=transformer_cls, blocks.1=tokens_cls", "head"),
    "linen": ("examples.linen_cnn:linen_cnn", "stage1=simple, stage2=conv", ""),
    "resnet": (f"{HERE}:resnet8_plain", "stages.0.0=conv, stages.1.0=simple", ""),
}


def resnet8_plain(num_classes, *, rngs):
    """A factory: the registry's ResNet-8 without branches (the taps come from the config)."""
    return models.create("cifar_resnet8", num_classes, aux="none", rngs=rngs)


def factory_config(name: str, method: str = "dks", **fields):
    model, taps, classifier = MODELS[name]
    c = config_base.with_method(config_base.base(), method)
    c.model, c.taps, c.classifier = model, taps, classifier
    c.num_epochs, c.batch_size, c.learning_rate = 1.0, 8, 0.05
    c.update(fields)
    return c


def batch(n=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(k1, (n, 32, 32, 3)), "label": jax.random.randint(k2, (n,), 0, 10)}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # "examples.vit" imports from the repository root, as on the CLI


# ---------------------------------------------------------------------------------------------
# (b) the ViT trains with DKS through the command line; its export is the main path.


# About 55 s on 2 cores (mostly the eager initialisation and compilation of a subprocess on 8
# devices): `make test-all`. The default run keeps its parts: a factory model trained in process
# (`test_every_method_on_a_factory_model`), a sharded step and an export
# (`test_linen_cnn_trains_one_step_and_exports`), `config.taps` parsing, and the CLI (test_main).
@pytest.mark.slow
def test_vit_trains_with_dks_through_the_cli(cifar_subset, tmp_path):
    workdir = tmp_path / "vit"
    overrides = {
        "model": "examples.vit:vit_tiny",
        "taps": "blocks.1=tokens_cls,blocks.2=tokens_cls",
        "dataset": str(cifar_subset),
        "num_classes": 10,
        "train_examples": 0,
        "batch_size": 16,
        "eval_batch_size": 40,
        "num_epochs": 3 * 16 / 400,
        "warmup_epochs": 0.0,
        "log_every_steps": 1,
        "eval_every_epochs": 100.0,
        "checkpoint_every_epochs": 100.0,
        "async_checkpointing": False,
    }
    argv = [f"--config.{k}={v}" for k, v in overrides.items()]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dks_jax.main",
            "--config=configs/vit_cifar10_dks.py:dks",
            f"--workdir={workdir}",
            *argv,
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if "num_devices" in r)["num_devices"] == 8  # batch sharded over 8
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert {"loss/synergy", "train_top1/C3"} <= set(next(r for r in rows if "loss" in r))
    final = rows[-1]
    assert final["eval_count"] == 200 and "eval_top1/ensemble" in final and "grad_cos/C2" in final
    assert "branches/0" in log and "branches/1" in log  # the parameter table splits them

    # The export holds the ViT alone; with the trained weights its logits are the main head's.
    exported, meta = export.load_exported_model(workdir / "export")
    assert meta["model"] == "examples.vit:vit_tiny" and meta["heads"] == ["C1", "C2", "C3"]
    config = config_base.from_run(workdir)
    trained = state_lib.create_model(config, 10)
    ck = checkpointing.Checkpoints(workdir, async_save=False)
    saved = ck._manager.restore(ck.latest_step())
    ck.close()
    graphdef, _ = nnx.split(trained)
    trained = nnx.merge(
        graphdef, jax.tree.map(jnp.asarray, saved["params"]), jax.tree.map(jnp.asarray, saved["batch_stats"])
    )
    images = batch(4)["image"]
    main = trained(images, train=False)[0]
    np.testing.assert_allclose(exported(images, train=False)[0], main, rtol=1e-5, atol=1e-5)
    assert not any(p[0] == "branches" for p, _ in nnx.to_flat_state(nnx.state(exported)))


# ---------------------------------------------------------------------------------------------
# (c) the Linen CNN through the bridge: one step updates its Linen BatchNorm statistics.


def test_linen_cnn_trains_one_step_and_exports(tmp_path):
    config = factory_config("linen")
    setup = state_lib.create(config, 10, steps_per_epoch=10)
    assert setup.num_heads == 3
    step = jax.jit(steps.train_step(setup, 0))
    mesh = parallel.create_mesh()  # the state replicated, the batch split over 8 devices
    state = parallel.replicate(setup.state, mesh)
    new, metrics = step(state, jax.device_put(batch(), parallel.batch_sharded(mesh)))
    assert np.isfinite(float(metrics["loss"])) and "loss/synergy" in metrics
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), setup.state["batch_stats"], new["batch_stats"])
    assert jax.tree.leaves(moved) and all(jax.tree.leaves(moved)), "Linen BN stats not updated"
    assert float(metrics["grad_norm"]) > 0

    dataset = type(
        "D",
        (),
        {
            "num_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "image_shape": (32, 32, 3),
            "source": type("S", (), {"mean": (0.0,) * 3, "std": (1.0,) * 3}),
        },
    )
    export.export(setup.graphdef, new, tmp_path / "export", config, dataset)
    exported, _ = export.load_exported_model(tmp_path / "export")
    wrapped = nnx.merge(setup.graphdef, new["params"], new["batch_stats"])
    images = batch(4, seed=1)["image"]
    np.testing.assert_allclose(
        exported(images, train=False)[0], wrapped(images, train=False)[0], rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# (d) sharding: the step on a mesh of all (fake) devices equals the step on one device.


# The CLI test above trains sharded over the 8 fake devices and the Linen test takes a sharded
# step; equality with one device, per model, runs in `make test-all` (about 25 s each on 2 cores).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "linen", "resnet"])
def test_sharded_step_equals_one_device(name):
    config = factory_config(name, batch_size=16)
    setup = state_lib.create(config, 10, steps_per_epoch=10)
    step = steps.train_step(setup, 0)
    data = batch(16)
    one, m_one = jax.jit(step)(setup.state, data)
    mesh = parallel.create_mesh()
    assert mesh.devices.size == 8
    state = parallel.replicate(setup.state, mesh)
    sharded = jax.device_put(data, parallel.batch_sharded(mesh))
    many, m_many = jax.jit(step)(state, sharded)
    np.testing.assert_allclose(m_many["loss"], m_one["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(many["params"]), jax.tree.leaves(one["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every method trains a factory model unchanged.


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=pytest.mark.slow) if m != "byot" else m  # byot: 9 s
        for m in ("baseline", "ds", "dsn", "dks", "dhm", "byot")
    ],
)
def test_every_method_on_a_factory_model(method):
    config = factory_config("vit", method)
    train.validate_config(config)
    setup = state_lib.create(config, 10, steps_per_epoch=10)
    assert setup.num_heads == (1 if method == "baseline" else 3)
    _, metrics = jax.jit(steps.train_step(setup, 0))(setup.state, batch())
    assert np.isfinite(float(metrics["loss"]))
    if method == "byot":  # the hints compare each branch's adapted feature with the ViT's
        assert {"loss/hint/1", "loss/hint/2", "loss/distill/1"} <= set(metrics)
        assert float(metrics["loss/hint/1"]) > 0


def test_factory_matches_attach_and_keeps_registry_paths():
    """The factory route builds what ``attach`` builds: the plain model under ``model``, the
    branches deepest first, and (ResNet) the registry's parameter paths under ``model``."""
    config = factory_config("resnet")
    wrapped = state_lib.create_model(config, 10)
    assert isinstance(wrapped, attach.Attached) and wrapped.taps == ("stages.1.0", "stages.0.0")
    plain = models.create("cifar_resnet8", 10, aux="none", rngs=nnx.Rngs(0))
    have = {p for p, _ in nnx.to_flat_state(attach.export_state(wrapped, nnx.Param))}
    assert have == {p for p, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    config.aux = "none"  # the baseline: the model's own head alone
    assert state_lib.create_model(config, 10).num_heads == 1


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors that say what to do.


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"model": "no_such_module:fn"}, "cannot import 'no_such_module'"),
        ({"model": "examples.vit:nope"}, "has no function 'nope'"),
        ({"model": "examples/missing.py:fn"}, "is not a file"),
        ({"taps": ""}, "trains auxiliary branches: name where they attach"),
        ({"taps": "blocks.0=fancy"}, "each tap is written <path>=<design>"),
        ({"branches": "C1C2"}, "apply to the registry's models only"),
        ({"classifier": ""}, None),  # dks needs no classifier
    ],
)
def test_factory_config_errors(fields, match):
    config = factory_config("vit", **fields)
    if match is None:
        train.validate_config(config)
        return
    with pytest.raises(errors.ConfigError, match=match):
        train.validate_config(config)


def test_factory_model_errors():
    with pytest.raises(errors.ConfigError, match="classifier"):
        train.validate_config(factory_config("vit", "byot", classifier=""))
    with pytest.raises(errors.ConfigError, match="no 'nowhere'"):
        state_lib.create_model(factory_config("vit", taps="nowhere=simple"), 10)
    with pytest.raises(errors.ConfigError, match="design .* takes conv maps"):
        state_lib.create_model(factory_config("vit", taps="blocks.0=simple"), 10)
    with pytest.raises(errors.ConfigError, match="stored|other than parameters"):
        state_lib.create_model(factory_config("vit", model=f"{HERE}:dropout_with_keys"), 10)


def dropout_with_keys(num_classes, *, rngs):
    """A model that stores random keys (nnx.Dropout(rngs=...)): refused with advice."""

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(3, num_classes, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.drop(x.mean((1, 2))))

    return Net()
