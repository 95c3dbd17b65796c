"""Two processes on localhost (jax.distributed, gloo CPU collectives) train, save and restore."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_pair(data_root, workdir, stop_at, tmp_path, tag):
    port = _free_port()
    outs = [tmp_path / f"{tag}-{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(data_root),
                          str(workdir), str(stop_at), str(outs[i])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow  # over 30 s on 2 cores: `make test-all`
def test_two_processes_train_save_and_restore(cifar_subset, tmp_path):
    workdir = tmp_path / "run"
    first = _run_pair(cifar_subset, workdir, 2, tmp_path, "first")
    assert [r["process_index"] for r in first] == [0, 1]
    assert all(r["devices"] == 4 and r["result"] == {"stopped_at_step": 2} for r in first)
    assert (workdir / "checkpoints" / "2").exists()
    second = _run_pair(cifar_subset, workdir, 0, tmp_path, "second")  # resumes at step 2
    a, b = (r["result"] for r in second)
    assert a == b, "both processes see the same global evaluation"
    assert a["eval_count"] == 200
    assert (workdir / "checkpoints" / "4").exists()
    assert np.isfinite(a["eval_top1/C1"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
