"""The CPU study's runner (results/cpu_study/run.sh): with several workers every run is trained
once, finished runs are skipped, and each run's files are committed as it lands.

The training is a stand-in ``$PY`` that writes a run's result files after a short sleep, in a
scratch git repository holding a copy of the script; nothing here trains a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "results" / "cpu_study" / "run.sh"
CONFIGS = ["baseline", "ds", "dks", "baseline-0.5", "dks-0.5", "dhm"]

# Stands in for the Python interpreter: `-c` goes to the real one; the table and curve tools do
# nothing; a training run logs "<config> <seed> <cpus>" and writes the run's files.
FAKE_PY = r"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec "$REAL_PY" "$@"; fi
[[ $2 == dks_jax.tools.curves ]] && exit 0
for a in "$@"; do
  case $a in
    --table_only) exit 0 ;;
    --configs=*) c=${a#--configs=configs/cpu_study.py:} ;;
    --seeds=*) s=${a#--seeds=}; s=${s%-*} ;;
    --workdir=*) w=${a#--workdir=} ;;
  esac
done
n=cpu_study-${c//,/-}
echo "$n $s $(taskset -p $$ | awk '{print $NF}')" >> "$LOG"
sleep 0.2
mkdir -p "$w/$n/seed$s"
echo '{"metrics": {"eval_top1/C1": 50.0}}' > "$w/$n/seed$s/result.json"
touch "$w/$n/seed$s/metrics.jsonl" "$w/$n/seed$s/config.json"
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def study(tmp_path):
    if shutil.which("taskset") is None or shutil.which("flock") is None:
        pytest.skip("taskset and flock (util-linux) are needed by the runner")
    repo = tmp_path / "repo"
    (repo / "results" / "cpu_study").mkdir(parents=True)
    shutil.copy(RUN_SH, repo / "results" / "cpu_study" / "run.sh")
    for name in ["cpu_study.md", "cpu_study.csv", "cpu_study/curves-x.png", "cpu_study/curves.md"]:
        (repo / "results" / name).write_text("")
    (repo / ".gitignore").write_text("/results/*/runs/\n")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    env = {**os.environ, "PY": str(fake), "REAL_PY": sys.executable,
           "LOG": str(tmp_path / "trained.log"), "COMMIT": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return repo, env, tmp_path / "trained.log"


@pytest.mark.timeout(120)
def test_two_workers_train_every_run_once_and_commit_each(study):
    repo, env, log = study
    finished = {(f"cpu_study-{c}", str(s)) for c in CONFIGS[:-1] for s in range(3)}
    for n, s in finished:  # finished before: skipped
        (repo / "results" / "cpu_study" / "runs" / n / f"seed{s}").mkdir(parents=True)
        (repo / "results" / "cpu_study" / "runs" / n / f"seed{s}" / "result.json").write_text("{}")
    result = subprocess.run(["results/cpu_study/run.sh"], cwd=repo, env={**env, "JOBS": "2"},
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    trained = [line.split() for line in log.read_text().splitlines()]
    runs = Counter((n, s) for n, s, _ in trained)
    assert set(runs.values()) == {1}, runs  # no run trained twice
    expected = {(f"cpu_study-{c}", str(s)) for c in CONFIGS for s in range(5)}
    assert set(runs) == expected - finished
    # Each worker is confined to one core (both cores when there are two).
    assert {len(cpus.split(",")) for _, _, cpus in trained} == {1}
    if (os.cpu_count() or 1) >= 2:
        assert len({cpus for _, _, cpus in trained}) == 2
    # The runs start in the protocol's order (seed k of every config before seed k + 1, DHM
    # last), up to two workers' starts swapping places.
    protocol = [(f"cpu_study-{c}", str(s)) for s in range(5) for c in CONFIGS[:-1]]
    protocol += [("cpu_study-dhm", str(s)) for s in range(5)]
    position = [protocol.index((n, s)) for n, s, _ in trained]
    assert all(b >= a - 1 for i, a in enumerate(position) for b in position[i + 1:]), position
    # One commit per finished run, holding its result file.
    messages = _git(repo, "log", "--format=%s").splitlines()
    assert len(messages) == 1 + len(runs)
    committed = _git(repo, "log", "--name-only", "--format=")
    for n, s in runs:
        assert f"results/cpu_study/runs/{n}/seed{s}/result.json" in committed
        assert json.loads((repo / "results/cpu_study/runs" / n / f"seed{s}" /
                           "result.json").read_text())["metrics"]


@pytest.mark.timeout(60)
def test_a_failed_run_fails_the_two_worker_runner(study):
    repo, env, log = study
    fake = Path(env["PY"])
    fake.write_text(fake.read_text().replace('mkdir -p "$w/$n/seed$s"',
                                             '[[ $n == cpu_study-dhm ]] && exit 1\nmkdir -p "$w/$n/seed$s"'))
    runs = repo / "results" / "cpu_study" / "runs"
    for c in CONFIGS[:-1]:
        for s in range(5):
            (runs / f"cpu_study-{c}" / f"seed{s}").mkdir(parents=True)
            (runs / f"cpu_study-{c}" / f"seed{s}" / "result.json").write_text("{}")
    result = subprocess.run(["results/cpu_study/run.sh"], cwd=repo, env={**env, "JOBS": "2"},
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a worker stopped on a failed run" in result.stdout
    assert "all workers finished" not in result.stdout


@pytest.mark.timeout(60)
def test_one_worker_skips_what_is_finished(study):
    repo, env, log = study
    runs = repo / "results" / "cpu_study" / "runs"
    for c in CONFIGS[:-1]:
        for s in range(5):
            (runs / f"cpu_study-{c}" / f"seed{s}").mkdir(parents=True)
            (runs / f"cpu_study-{c}" / f"seed{s}" / "result.json").write_text("{}")
    result = subprocess.run(["results/cpu_study/run.sh"], cwd=repo, env={**env, "COMMIT": "0"},
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[:2] for line in log.read_text().splitlines()] == [
        ["cpu_study-dhm", str(s)] for s in range(5)]
    assert "all runs finished" in result.stdout
    assert _git(repo, "log", "--format=%s").splitlines() == ["init"]
