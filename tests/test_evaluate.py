"""Evaluation without training (dks_jax.evaluate) and the export's predictor (dks_jax.load)."""

import json
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from test_train import tiny_config

import dks_jax
from dks_jax import config_base, data, errors, evaluate, export, parallel, train


@pytest.fixture(scope="module")
def trained(cifar_subset, tmp_path_factory):
    """A tiny DKS run (4 steps, evaluated at the end): its workdir, config and final metrics."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(cifar_subset, method="dks", aux="paper")
    final = train.train_and_evaluate(config, workdir)
    return workdir, config, final


def _heads(result):
    return {k: v for k, v in result.items() if k.startswith(("eval_top1/", "eval_top5/"))}


def test_latest_and_best_reproduce_the_final_evaluation(trained):
    workdir, _, final = trained
    latest = evaluate.evaluate(workdir, source="latest")
    assert latest["step"] == 4 and latest["eval_count"] == final["eval_count"] == 200
    assert _heads(latest) == _heads(final) and "eval_top1/ensemble" in latest
    best = evaluate.evaluate(workdir, source="best")  # evaluated once, at the end: the same state
    assert best["step"] == 4 and _heads(best) == _heads(final)
    exported = evaluate.evaluate(workdir, source="export")  # the main path alone
    assert {k for k in _heads(exported)} == {"eval_top1/C1", "eval_top5/C1"}
    assert exported["eval_top1/C1"] == final["eval_top1/C1"]


def test_cli_writes_json_and_markdown(trained, tmp_path, capsys):
    workdir, _, final = trained
    assert evaluate.main([f"--workdir={workdir}", f"--out={tmp_path}", "--batch_size=40"]) == 0
    (written,) = tmp_path.glob("latest-step4-*.json")
    result = json.loads(written.read_text())
    assert _heads(result) == pytest.approx(_heads(final))  # another batch size: the same sums
    text = written.with_suffix(".md").read_text()
    assert f"| C1 | {final['eval_top1/C1']:.2f} |" in text and "| ensemble |" in text
    assert "| C1 |" in capsys.readouterr().out
    with pytest.raises(errors.ConfigError, match="cannot apply"):
        evaluate.main([f"--workdir={workdir}", "--config.no_such_field=1"])


@pytest.mark.slow  # about 14 s more on 2 cores: `make test-all`
def test_another_data_set_given_as_a_folder_with_only_a_test_split(trained, cifar_subset, tmp_path):
    workdir, _, final = trained
    shifted = tmp_path / "shifted"
    shutil.copytree(cifar_subset / "test", shifted / "test")  # no train split at all
    config = config_base.from_run(workdir)
    config.dataset = str(shifted)
    result = evaluate.evaluate(workdir, config)
    assert result["dataset"] == str(shifted) and _heads(result) == _heads(final)
    assert evaluate.main([f"--workdir={workdir}", f"--config.dataset={shifted}",
                          f"--out={tmp_path / 'out'}"]) == 0
    assert list((tmp_path / "out").glob("latest-step4-shifted-test.json"))


def test_predictor_applies_the_evaluation_preprocessing(trained):
    workdir, config, _ = trained
    predictor = dks_jax.load(workdir)
    meta = predictor.meta
    assert meta["step"] == 4 and meta["heads"] == ["C1", "C2", "C3"]
    assert predictor.class_names == tuple(sorted(predictor.class_names)) and \
        len(predictor.class_names) == 10
    assert meta["preprocess"]["image_size"] == 32 and len(meta["preprocess"]["mean"]) == 3
    # The probabilities of raw uint8 test images equal the model's on the evaluation pipeline.
    mesh = parallel.create_mesh(jax.devices()[:1])
    dataset = data.create(config, mesh)
    raw = dataset.source.eval.decode_all()[:48]
    batch = next(iter(dataset.eval_iterator(48)))
    model = export.load_exported_model(workdir / "export")[0]
    want = jax.nn.softmax(model(batch["image"], train=False)[0], axis=-1)
    got = predictor(raw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)
    # Other sizes are resized and centre-cropped; a list may mix sizes.
    big = np.asarray(jax.image.resize(raw[:2].astype(np.float32), (2, 48, 40, 3), "linear"))
    mixed = predictor([big[0].astype(np.uint8), raw[0]])
    assert mixed.shape == (2, 10)
    np.testing.assert_allclose(np.asarray(mixed[1]), np.asarray(got[0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 images"):
        predictor(raw.astype(np.float32))


def test_example_classifies_test_jpegs(trained, cifar_tar, capsys):
    workdir, _, _ = trained
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import classify_cifar_jpegs

    assert classify_cifar_jpegs.main([f"--export={workdir}", f"--archive={cifar_tar}",
                                      "--count=5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(" -> " in line and line.endswith("%)") for line in lines)
