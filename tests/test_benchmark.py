"""The benchmark harness on CPU at tiny sizes, the README table, and the PyTorch reference (if torch)."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from dks_jax import cli, losses, models
from dks_jax.tools import bench_compare, benchmark
from dks_jax.tools import bench_table as make_table

TINY = ["--model=cifar_resnet8", "--aux=paper", "--method=dks", "--batch_size=8",
        "--image_size=32", "--dtype=float32", "--steps=3", "--warmup=1"]


@pytest.fixture(scope="module")
def cli_record(tmp_path_factory):
    """One real measurement through the command-line entry point (3 heads, DKS loss, 8 devices).

    The smallest CIFAR ResNet (n=1) with its paper branches keeps XLA:CPU's compile time down; the
    loss is the full DKS objective over three heads.
    """
    out = tmp_path_factory.mktemp("results")
    argv = [*TINY, f"--output={out}"]
    return benchmark.record_from_argv(argv), out


def test_cli_writes_a_record_with_every_key_and_sane_values(cli_record):
    record, out = cli_record
    missing = [k for k in benchmark.REQUIRED_KEYS if k not in record]
    assert not missing
    files = list(out.glob("*.json"))
    assert len(files) == 1 and str(files[0]) == record["path"]
    written = json.loads(files[0].read_text())
    assert written == {k: v for k, v in record.items() if k != "path"}

    assert record["device"] == jax.devices()[0].device_kind and record["platform"] == "cpu"
    assert record["num_devices"] == jax.device_count() == 8  # batch sharded over the mesh
    assert record["jax_version"] == jax.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", record["date"])
    assert record["command"].startswith("python -m dks_jax.tools.benchmark --model=cifar_resnet8")
    assert (record["model"], record["aux"], record["method"], record["num_heads"]) == (
        "cifar_resnet8", "paper", "dks", 3)
    assert (record["batch_size"], record["image_size"], record["dtype"]) == (8, 32, "float32")

    assert 0 < record["step_ms_min"] <= record["step_ms"] <= record["step_ms_p90"]
    assert record["images_per_sec"] == pytest.approx(8 / (record["step_ms"] / 1e3))
    assert record["pipelined_step_ms"] > 0
    assert 0 < record["lower_s"] < record["compile_s"]
    assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"])

    comp = models.complexity("cifar_resnet8", 10, image_size=32, aux="paper")
    assert record["macs_per_image"] == comp["total"]["macs"] > record["macs_main_per_image"]
    assert record["train_flops_per_image"] == 6 * record["macs_per_image"]
    # XLA's own FLOP count of the compiled step agrees with 3 x 2 x MACs to within rounding terms.
    assert 0.5 < record["xla_flops_per_image"] / record["train_flops_per_image"] < 1.5
    assert record["mfu"] is None and record["peak_flops_per_device"] is None  # no CPU peak
    assert record["peak_memory_bytes"] is None or record["peak_memory_bytes"] > 0
    assert "torch_images_per_sec" not in record  # no comparison asked for

    text = benchmark.summary(record)
    assert "images/s" in text and "MFU           n/a" in text


def test_table_renders_the_real_record(cli_record):
    record, out = cli_record
    text = make_table.render(make_table.load_records([out]))
    row = next(line for line in text.splitlines() if "cifar_resnet8" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == ["8 x cpu", "cifar_resnet8", "paper", "dks", "8", "32", "float32"]
    assert cells[11] == "n/a"  # MFU


def test_options_defaults_and_validation():
    o = benchmark.Options(model="resnet18", method="baseline").resolved()
    assert (o.aux, o.image_size, o.num_classes) == ("none", 224, 1000)
    o = benchmark.Options(model="cifar_resnet32", method="dks").resolved()
    assert (o.aux, o.image_size, o.num_classes) == ("paper", 32, 10)
    with pytest.raises(ValueError, match="cannot be benchmarked"):
        benchmark.Options(method="kd").resolved()
    with pytest.raises(ValueError, match="unknown model"):
        benchmark.Options(model="resnet9").resolved()
    with pytest.raises(ValueError, match="at least 1"):
        benchmark.Options(steps=0).resolved()


@pytest.mark.slow  # two compilations, over 30 s on 2 cores: `make test-all`
def test_vmapped_seeds_are_timed_as_one_step_over_every_seed():
    """--num_seeds=S times config.num_seeds' vmapped step: S batches per step, all counted."""
    o = benchmark.Options(model="cifar_resnet8", method="baseline", batch_size=8,
                          dtype="float32", steps=2, warmup=1, num_seeds=2, num_devices=1)
    r = benchmark.measure_jax(o)
    assert r["num_seeds"] == 2 and math.isfinite(r["loss_last"])
    assert r["images_per_sec"] == pytest.approx(2 * 8 / (r["step_ms"] / 1e3))
    with pytest.raises(ValueError, match="num_seeds=1"):
        benchmark.run(o, command="x", output="", compare_torch=True)
    with pytest.raises(ValueError, match="num_seeds must be at least 1"):
        benchmark.Options(num_seeds=0).resolved()


def test_peak_table_and_mfu_by_hand():
    assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")[:2] == (790e12, 989.4e12)
    assert benchmark.peak_flops("NVIDIA H200", "bfloat16")[0] == 790e12
    assert benchmark.peak_flops("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12  # before "H100"
    assert benchmark.peak_flops("cpu", "float32") == (None, None, "")
    assert benchmark.mfu(1e9, 1000.0, None, 1) is None
    # ResNet-50: 4.09 GMAC forward = 24.5 GFLOP per training image; 790 TFLOP/s -> ~32,000 img/s.
    macs = models.complexity("resnet50", 1000, image_size=224, aux="none")["total"]["macs"]
    assert 6 * macs / 1e9 == pytest.approx(24.5, abs=0.1)
    assert benchmark.mfu(macs, 32_000.0, 790e12, 1) == pytest.approx(
        6 * macs * 32_000 / 790e12) == pytest.approx(0.99, abs=0.01)
    assert benchmark.mfu(macs, 1000.0, 790e12, 4) == pytest.approx(6 * macs * 1000 / (4 * 790e12))


def test_resnet18_dks_mac_ratio_is_the_targets():
    base = models.complexity("resnet18", 1000, image_size=224, aux="none")["total"]["macs"]
    dks = models.complexity("resnet18", 1000, image_size=224, aux="paper")["total"]["macs"]
    assert base / 1e9 == pytest.approx(1.81, abs=0.01)
    assert dks / 1e9 == pytest.approx(3.92, abs=0.01)
    assert dks / base == pytest.approx(2.16, abs=0.01)


def _fake_record(method, aux, step_ms, macs, torch_ips=None, timestamp="2026-11-22T06:00:00Z"):
    r = {"device": "NVIDIA H100 80GB HBM3", "num_devices": 1, "jax_version": "0.11.2",
         "date": timestamp[:10], "timestamp": timestamp, "command": "python -m dks_jax.benchmark",
         "model": "resnet18", "aux": aux, "branches": "", "method": method, "batch_size": 256,
         "image_size": 224, "dtype": "bfloat16", "bn_group_size": 0,
         "images_per_sec": 256 / (step_ms / 1e3), "step_ms": step_ms, "compile_s": 30.0,
         "macs_per_image": macs, "mfu": 0.4, "peak_memory_bytes": 20 * 2**30}
    if torch_ips is not None:
        r["torch_images_per_sec"] = torch_ips
    return r


def test_make_table_latest_overhead_and_targets(tmp_path):
    assert make_table.REQUIRED_KEYS == benchmark.REQUIRED_KEYS
    records = [
        _fake_record("baseline", "none", 100.0, 1_814_073_344, timestamp="2026-11-22T05:00:00Z"),
        _fake_record("baseline", "none", 80.0, 1_814_073_344),  # newer: replaces the one above
        _fake_record("dks", "paper", 150.0, 3_922_198_528, torch_ips=256 / 0.2),
    ]
    for i, r in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))  # not a record: skipped
    loaded = make_table.load_records([tmp_path])
    assert len(loaded) == 3
    latest = make_table.latest(loaded)
    assert [r["step_ms"] for r in latest] == [80.0, 150.0]

    (row,) = make_table.overhead_rows(latest)
    assert row["step_ratio"] == pytest.approx(150 / 80)
    assert row["mac_ratio"] == pytest.approx(3_922_198_528 / 1_814_073_344)
    assert row["dks_vs_torch"] == pytest.approx(200 / 150)
    text = make_table.render(latest)
    assert "| 1.88x | 2.16x | met | 1.33x (met) |" in text
    assert "| 1,707 |" in text and "| 40.0% |" in text and "| 20.0 |" in text  # images/s, MFU, GiB

    out = tmp_path / "table.md"
    assert make_table.main([str(tmp_path), f"--output={out}", "--all"]) == out.read_text()
    assert out.read_text().count("| resnet18 |") == 3 + 1  # every record, plus the overhead row
    assert make_table.render([]) == "_No benchmark records._\n"
    assert make_table.main([str(tmp_path), "--device=A100"]) == "_No benchmark records._\n"


def test_torch_command_and_a_failed_reference_is_recorded():
    o = benchmark.Options(model="resnet18", method="dks", batch_size=4, image_size=32, steps=2)
    cmd = benchmark.torch_command(o, "/tmp/x.json", python="py")
    assert cmd[:2] == ["py", str(benchmark.TORCH_SCRIPT)]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert flags["--aux"] == "paper" and flags["--method"] == "dks"
    assert flags["--num_classes"] == "1000" and flags["--json_out"] == "/tmp/x.json"
    assert "--serve" not in cmd
    with pytest.raises(ValueError, match="PyTorch reference has models"):
        benchmark.torch_command(benchmark.Options(model="wrn16_8"), "x")
    with pytest.raises(ValueError, match="PyTorch reference has aux"):
        benchmark.torch_command(benchmark.Options(model="cifar_resnet110", aux="narrow"), "x")
    with pytest.raises(ValueError, match="PyTorch reference has methods"):
        benchmark.torch_command(benchmark.Options(method="dhm"), "x")
    cifar = benchmark.torch_command(benchmark.Options(model="cifar_resnet32", aux="narrow"), "",
                                    python="py", serve=True)
    assert cifar[-1] == "--serve" and "--json_out" not in cifar
    flags = dict(zip(cifar[2:-1:2], cifar[3:-1:2], strict=True))
    assert (flags["--model"], flags["--aux"], flags["--method"]) == ("cifar_resnet32", "narrow", "dks")
    assert (flags["--image_size"], flags["--num_classes"]) == ("32", "10")

    failed = benchmark.measure_torch(o, python="/bin/false")
    assert failed["error"].startswith("exit 1")
    record = benchmark.make_record({"images_per_sec": 10.0}, "cmd", failed)
    assert record["torch_images_per_sec"] is None and "exit 1" in record["torch_error"]
    with pytest.raises(benchmark.TorchError, match="exit 1"):
        benchmark.TorchServer(o, python="/bin/false", timeout=60)


class _FakeSide:
    def __init__(self, name, log, step_s, fail_at=None):
        self.name, self.log, self.step_s, self.fail_at = name, log, step_s, fail_at

    def timed(self, n):
        self.log.append(self.name)
        if self.fail_at is not None and self.log.count(self.name) == self.fail_at:
            raise benchmark.TorchError("gone")
        return [self.step_s] * n


_FAKE_SERVER = """
import json, sys
print("a line that is not JSON")
print(json.dumps({"event": "ready", "compile_s": 0.5}), flush=True)
rounds = []
for line in sys.stdin:
    if line.startswith("run "):
        rounds.append([0.25] * int(line.split()[1]))
        print(json.dumps({"event": "times", "times": rounds[-1]}), flush=True)
    elif line.strip() == "sleep":
        pass
    else:
        break
print(json.dumps({"event": "result", "rounds": len(rounds), "images_per_sec": 16.0}), flush=True)
"""


def _fake_python(tmp_path, body):
    """An executable that runs ``body`` with this Python, ignoring the reference's arguments."""
    (tmp_path / "fake.py").write_text(body)
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake.py'}\n")
    exe.chmod(0o755)
    return str(exe)


def test_torch_server_protocol_and_its_failures(tmp_path):
    o = benchmark.Options(model="resnet18", method="dks", batch_size=4, image_size=32, steps=2)
    server = benchmark.TorchServer(o, python=_fake_python(tmp_path, _FAKE_SERVER), timeout=60)
    assert server.info == {"compile_s": 0.5}
    log = []
    jax_r, torch_r, error = benchmark.interleave(_FakeSide("jax", log, 0.1), server, 2, 3)
    assert error is None and torch_r == [[0.25] * 3] * 2 and len(jax_r) == 2
    assert server.finish() == {"rounds": 2, "images_per_sec": 16.0}
    assert server.proc.returncode == 0

    server = benchmark.TorchServer(o, python=_fake_python(tmp_path, _FAKE_SERVER), timeout=2)
    server._send("sleep")
    with pytest.raises(benchmark.TorchError, match="no 'times' answer after 2 s"):
        server._answer("times")
    assert server.proc.returncode is not None  # killed
    crash = "import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n"
    with pytest.raises(benchmark.TorchError, match="exit 3: boom"):
        benchmark.TorchServer(o, python=_fake_python(tmp_path, crash), timeout=60)


def test_interleave_alternates_pytorch_then_jax_every_round():
    log = []
    jax_r, torch_r, error = benchmark.interleave(
        _FakeSide("jax", log, 0.1), _FakeSide("torch", log, 0.2), rounds=3, steps=4)
    assert log == ["torch", "jax"] * 3 and error is None
    assert jax_r == [[0.1] * 4] * 3 and torch_r == [[0.2] * 4] * 3
    # A PyTorch failure ends its side; JAX's rounds go on.
    log = []
    jax_r, torch_r, error = benchmark.interleave(
        _FakeSide("jax", log, 0.1), _FakeSide("torch", log, 0.2, fail_at=2), rounds=3, steps=1)
    assert log == ["torch", "jax", "torch", "jax", "jax"] and len(jax_r) == 3 and len(torch_r) == 1
    assert error == "round 2: gone"
    jax_r, torch_r, error = benchmark.interleave(_FakeSide("jax", [], 0.1), None, rounds=2, steps=1)
    assert len(jax_r) == 2 and torch_r == [] and error is None
    with pytest.raises(ValueError, match="at least 1"):
        benchmark.interleave(_FakeSide("jax", [], 0.1), None, rounds=0, steps=1)


# ---- the PyTorch reference (skipped without torch) ---------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torch_reference():
    pytest.importorskip("torch")
    from dks_jax.tools import torch_reference

    return torch_reference


@pytest.fixture(scope="module")
def torch_python():
    """A Python with torch for the reference's subprocess: $DKS_TORCH_PYTHON, this one, or the
    checkout's .venv-torch (``make torch-env``); skips when none has torch."""
    candidates = [os.environ.get("DKS_TORCH_PYTHON", ""), sys.executable,
                  str(REPO / ".venv-torch" / "bin" / "python")]
    for python in filter(None, candidates):
        try:
            ok = subprocess.run([python, "-c", "import torch"], capture_output=True,
                                timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python
    pytest.skip("no Python with torch (make torch-env, or set DKS_TORCH_PYTHON)")


def _script_counts(python, model, aux, num_classes):
    out = subprocess.run(
        [python, str(benchmark.TORCH_SCRIPT), "--model", model, "--aux", aux,
         "--num_classes", str(num_classes), "--params_only"],
        capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("aux", ["none", "paper"])
def test_cifar_resnet32_reference_has_dks_jax_parameter_counts(torch_python, aux, num_classes):
    """The script's own count (its JSON, read from a subprocess) equals dks_jax's, branch by branch."""
    got = _script_counts(torch_python, "cifar_resnet32", aux, num_classes)
    want = models.complexity("cifar_resnet32", num_classes, aux=aux)
    assert got["num_params"] == want["total"]["params"]
    assert got["num_params_main"] == want["main"]["params"]
    assert got["num_params_branches"] == [b["params"] for b in want["branches"]]
    assert (got["model"], got["aux"], got["num_classes"]) == ("cifar_resnet32", aux, num_classes)
    if (aux, num_classes) == ("paper", 10):
        assert got["num_params"] == 2_124_334  # the figure in torch_reference's docstring


def test_torch_models_match_dks_jax_parameter_counts(torch_reference):
    assert torch_reference.MODELS == benchmark.TORCH_MODELS
    for aux in ("none", "paper"):
        model = torch_reference.ResNet("resnet18", 10, aux)
        n = sum(p.numel() for p in model.parameters())
        assert n == models.complexity("resnet18", 10, image_size=224, aux=aux)["total"]["params"]
    for name, designs in torch_reference.MODELS.items():
        if not name.startswith("cifar_"):
            continue
        assert designs == models.aux_designs(name)[:1] + tuple(
            d for d in models.aux_designs(name) if d in ("paper", "narrow"))
        for aux in designs:
            for num_classes in (10, 100):
                model, impl = torch_reference.create_model(name, num_classes, aux)
                counts = torch_reference.parameter_counts(model)
                want = models.complexity(name, num_classes, aux=aux)
                assert impl == "own" and counts["num_params"] == want["total"]["params"], (name, aux)
                assert counts["num_params_branches"] == [b["params"] for b in want["branches"]]


@pytest.mark.parametrize("method", ["baseline", "ds", "dks"])
def test_torch_objective_equals_dks_jax(torch_reference, method):
    import torch

    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(5, 7)).astype(np.float32) * 3 for _ in range(3)]
    labels = rng.integers(0, 7, size=5)
    spec = losses.ObjectiveSpec(method=method, num_heads=3)
    want, _ = losses.objective(tuple(logits), labels, spec=spec, step=0, rng=None)
    got = torch_reference.objective([torch.tensor(z) for z in logits], torch.tensor(labels), method)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # Detached soft targets: the synergy gradient reaches only the student of each pair.
    zs = [torch.tensor(z, requires_grad=True) for z in logits]
    torch_reference.objective(zs, torch.tensor(labels), method).backward()
    import jax.numpy as jnp

    grads = jax.grad(lambda zz: losses.objective(zz, jnp.asarray(labels), spec=spec, step=0,
                                                 rng=None)[0])(tuple(map(jnp.asarray, logits)))
    for z, g in zip(zs, grads, strict=True):
        got_grad = np.zeros_like(logits[0]) if z.grad is None else z.grad.numpy()  # unused head
        np.testing.assert_allclose(got_grad, np.asarray(g), rtol=1e-4, atol=1e-6)


def test_torch_reference_runs_through_the_comparison_path(torch_reference):
    o = benchmark.Options(model="resnet18", method="baseline", batch_size=2, image_size=32,
                          num_classes=10, dtype="float32", steps=2, warmup=1)
    result = benchmark.measure_torch(o, timeout=300)
    assert "error" not in result, result
    assert result["device"] == "cpu" and result["compile"] is False
    assert result["images_per_sec"] == pytest.approx(2 / (result["step_ms"] / 1e3))
    assert math.isfinite(result["loss_first"])
    assert result["num_params"] == models.complexity(
        "resnet18", 10, image_size=224, aux="none")["total"]["params"]
    record = benchmark.make_record({"images_per_sec": 3.0, "step_ms": 1.0}, "cmd", result)
    assert record["torch_images_per_sec"] == result["images_per_sec"]
    assert record["torch_version"] == result["torch_version"] and record["torch_device"] == "cpu"
    assert record["jax_over_torch"] == pytest.approx(3.0 / result["images_per_sec"])


def test_interleaved_comparison_end_to_end(torch_python):
    """--compare_torch through the persistent reference: rounds alternate, each side's medians,
    the reference's thread count, and its parameter count equal to the JAX state's."""
    o = benchmark.Options(model="cifar_resnet8", aux="narrow", method="ds", batch_size=4,
                          dtype="float32", steps=2, warmup=1, num_devices=1)
    record = benchmark.run(o, command="cmd", output="", compare_torch=True,
                           torch_python=torch_python, torch_timeout=300, rounds=2)
    assert "torch_error" not in record, record.get("torch_error")
    assert record["comparison"] == "interleaved"
    assert record["rounds"] == record["torch_rounds"] == 2 and record["torch_steps"] == 2
    assert len(record["step_ms_rounds"]) == len(record["torch_step_ms_rounds"]) == 2
    assert min(record["step_ms_rounds"]) <= record["step_ms"] <= max(record["step_ms_rounds"])
    assert (min(record["torch_step_ms_rounds"]) <= record["torch_step_ms"]
            <= max(record["torch_step_ms_rounds"]))
    assert record["torch_images_per_sec"] == pytest.approx(4 / (record["torch_step_ms"] / 1e3))
    assert record["jax_over_torch"] == pytest.approx(
        record["images_per_sec"] / record["torch_images_per_sec"])
    assert record["torch_num_threads"] == len(os.sched_getaffinity(0))
    assert record["torch_num_params"] == record["num_params"] == models.complexity(
        "cifar_resnet8", 10, aux="narrow")["total"]["params"]
    assert (record["torch_image_size"], record["torch_num_classes"]) == (32, 10)
    assert math.isfinite(record["torch_loss_last"]) and math.isfinite(record["loss_last"])
    text = benchmark.summary(record)
    assert "2 rounds x 2 steps" in text and "round medians JAX" in text


def test_compare_dry_run_lists_the_cases(capsys):
    compare = bench_compare
    assert compare.main(["--dry_run", "--python=py", "--steps=7"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert [line.split(":")[0][3:] for line in lines] == list(compare.CASES)
    first = lines[0]
    assert "py -m dks_jax.tools.benchmark --model=resnet18 --method=baseline" in first
    assert "--steps=7" in first and "--compare_torch" in first
    assert "--compare_torch" not in lines[-1]  # CIFAR: JAX only
    with pytest.raises(cli.UsageError, match="unknown cases"):
        compare.main(["--dry_run", "--cases=resnet9"])


def test_dtype_auto_is_float32_on_the_cpu():
    """The CPU has no bfloat16 units: the default dtype there is float32 (bfloat16 elsewhere)."""
    options = benchmark.Options(model="cifar_resnet8").resolved()
    assert benchmark.Options().dtype == "auto" and options.dtype == "float32"
