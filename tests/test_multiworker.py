"""MultiWorkerMirroredStrategy for real: two worker processes on loopback (TF_CONFIG)
train the same steps as one process with two replicas, and end with the same weights."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

WORKER = os.path.join(REPO_ROOT, "tests", "multiworker_run.py")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow  # three processes, about a minute
def test_two_worker_processes_match_the_single_process_run(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    single = subprocess.run([sys.executable, WORKER, str(tmp_path / "single.npz"),
                             "--single"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = []
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        workers.append(subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / f"worker{index}.npz")],
            env=dict(env, TF_CONFIG=json.dumps(config)), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]

    reference = _weights(tmp_path / "single.npz")
    for index in range(2):
        got = _weights(tmp_path / f"worker{index}.npz")
        assert len(got) == len(reference) > 10
        for a, b in zip(got, reference):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    initial = _weights(tmp_path / "single-initial.npz")
    assert max(np.abs(a - b).max() for a, b in zip(reference, initial)) > 1e-3  # it trained
