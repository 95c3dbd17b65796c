"""Every file in configs/ loads, with each of its presets, and builds its model and train state
abstractly (jax.eval_shape: nothing is allocated or trained)."""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from dks_jax import config_base, errors, optim, train
from dks_jax import state as state_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
METHOD_PRESETS = ("baseline", "ds", "dks")
PRESETS = {
    "ablation_aux_resnet32.py": [f"{d},{m}" for d in ("simple", "ap_2fc", "ap_conv_2fc", "narrow",
                                                      "shallow", "paper") for m in ("ds", "dks")],
    "ablation_branches_resnet18.py": ["C1", "C1C2", "C1C3", "C1C4", "C1C2C3", "C1C2C3C4"],
    "ablation_pairs_resnet18.py": ["top_down", "bottom_up", "bidirectional"],
    "ablation_alone_resnet18.py": ["C2", "C3"],
    "cpu_study.py": ["baseline", "ds", "dks", "dhm", "baseline,0.5", "dks,0.5"],
    "densenet40_noisy_cifar10.py": [f"{m},{n}" for m in ("baseline", "ds", "dks") for n in (0, .5, .8)],
    "dhm_cifar100.py": ["cifar_resnet32", "densenet40_k12", "wrn28_10"],
    "kd_resnet18.py": ["c1", "c1_ds", "c2c3_ds"],
    "resnet152_dks.py": [None],
    "quickstart.py": [None],
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


def load(path: pathlib.Path, preset):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if preset is None else module.get_config(preset)


def cases():
    for path in sorted(CONFIGS.glob("*.py")):
        for preset in PRESETS.get(path.name, METHOD_PRESETS):
            yield pytest.param(path, preset, id=f"{path.stem}:{preset}")


def test_every_config_file_is_covered():
    names = {p.name for p in CONFIGS.glob("*.py")}
    assert "resnet152_dks.py" in names and "quickstart.py" in names
    # The 8 backbones of DKS Table 1 and the 3 of Table 2 have a file each.
    for stem in ("resnet32", "resnet110", "densenet40", "densenet100", "wrn28_4", "wrn28_10",
                 "wrn28_10_dropout", "mobilenet"):
        assert f"cifar100_{stem}.py" in names
    for stem in ("resnet18", "resnet50", "resnet152"):
        assert f"imagenet_{stem}.py" in names


@pytest.mark.parametrize("path,preset", list(cases()))
def test_config_builds_model_and_state(path, preset):
    config = load(path, preset)
    if config.method == "kd":
        assert config.loss.teacher_model, "KD configs name their teacher"
        config.loss.teacher_checkpoint = "/teacher/export"  # given on the command line in practice
    train.validate_config(config)
    assert set(config.keys()) == set(config_base.base().keys()), "configs only set base fields"
    num_classes = config.num_classes or NUM_CLASSES.get(config.dataset, 10)
    heads = {}

    def build():
        model = state_lib.create_model(config, num_classes)
        heads["n"] = model.num_heads
        tx, _ = optim.create_optimizer(config, steps_per_epoch=100)
        return state_lib.initial_state(model, tx)[1]

    state = jax.eval_shape(build)
    if config.aux == "none" or config.branch_alone:
        assert heads["n"] == 1
    else:
        n_branches = len(set(re.findall(r"C[2-9]", config.branches)))
        assert heads["n"] == 1 + (n_branches or (3 if "1202" in config.model else 2))
    leaves = jax.tree.leaves(state["params"])
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)


@pytest.mark.parametrize("bad", ["not_a_preset", "dks,99"])
def test_bad_preset_is_a_clear_error(bad):
    path = CONFIGS / ("densenet40_noisy_cifar10.py" if "," in bad else "cifar100_resnet32.py")
    with pytest.raises(ValueError, match="preset|noise"):
        load(path, bad)


def test_from_run_fills_fields_added_since(tmp_path):
    """A run's config.json from before a field existed loads with that field's default."""
    saved = config_base.to_dict(config_base.with_method(config_base.base(), "dks"))
    saved["loss"]["beta"] = 0.25
    del saved["train_examples"], saved["loss"]["byot_lambda"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_base.from_run(tmp_path)
    assert config.method == "dks" and config.loss.beta == 0.25
    assert config.train_examples == config_base.base().train_examples
    assert config.loss.byot_lambda == config_base.base().loss.byot_lambda
    with pytest.raises(errors.ConfigError, match="no config.json"):
        config_base.from_run(tmp_path / "elsewhere")


RECIPE_LINE = re.compile(r"^    epochs, batch  (\d+), (\d+)\s*$|^    learning rate  ([\d.]+), step schedule: "
                         r"x([\d.]+) at epochs ([\d, ]+?)\s*$", re.M)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_docstring_recipe_states_the_config_values(path):
    """The "Recipe:" block of a config's docstring says what its default preset sets (epochs,
    batch, learning rate and step schedule), so the recipes stay readable and true."""
    text = path.read_text()
    assert "Recipe:" in text, f"{path.name} has no Recipe block"
    found = RECIPE_LINE.findall(text.split('"""')[1])
    if not found:  # a block that describes several backbones in words: nothing to parse
        return
    config = load(path, None)  # the default preset, which the block describes
    for epochs, batch, lr, factor, boundaries in found:
        if epochs:
            assert (float(epochs), int(batch)) == (config.num_epochs, config.batch_size), path.name
        else:
            assert float(lr) == config.learning_rate and config.lr_schedule == "step", path.name
            assert float(factor) == pytest.approx(config.lr_decay_factor), path.name
            assert [float(b) for b in boundaries.split(",")] == list(config.lr_boundaries)
