"""One run per model_dir: RunLock refuses a second owner while the first is alive and
takes over the lock of a run that is gone."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from efficientnet_advprop.training import RunLock, RunLockedError, TrainingError
from efficientnet_advprop.training.run_lock import LOCK_NAME, pid_alive

HOLDER = """
import sys
from efficientnet_advprop.training.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # holds the lock until it is killed
"""


def _holder(model_dir):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    line = process.stdout.readline()
    assert line.strip() == "locked", process.stderr.read()[-2000:]
    return process


def _exited_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_second_run_is_refused_while_the_owner_lives_and_takes_over_once_it_is_killed(
        tmp_path):
    model_dir = tmp_path / "run"
    holder = _holder(model_dir)
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(model_dir).acquire()
        message = str(refused.value)
        assert str(model_dir) in message and f"pid {holder.pid}" in message
        assert isinstance(refused.value, TrainingError)
        with open(model_dir / LOCK_NAME) as f:
            assert json.load(f)["pid"] == holder.pid  # the refused run left it alone

        holder.send_signal(signal.SIGKILL)  # dies holding the lock: no clean-up
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)
    assert (model_dir / LOCK_NAME).exists()
    notes = []
    with RunLock(model_dir, log=notes.append) as lock:
        assert lock.taken_over["pid"] == holder.pid
        assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "stale" in notes[0]
        with open(model_dir / LOCK_NAME) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not (model_dir / LOCK_NAME).exists()  # released on exit


def test_the_lock_is_released_when_the_block_raises_and_the_next_run_needs_no_takeover(
        tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with RunLock(tmp_path) as lock:
            assert lock.held and (tmp_path / LOCK_NAME).exists()
            raise ValueError("boom")
    assert not lock.held and not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path, log=pytest.fail) as again:  # no note: nothing was stale
        assert again.held and again.taken_over is None


def test_stale_lock_of_an_exited_process_is_taken_over(tmp_path):
    pid = _exited_pid()
    assert not pid_alive(pid)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": "earlier", "token": "x"}))
    notes = []
    lock = RunLock(tmp_path, log=notes.append).acquire()
    assert lock.taken_over["pid"] == pid and f"pid {pid}" in notes[0]
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # now ours, and we are alive
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_never_taken_over(tmp_path):
    # A live pid whose start time differs from the recorded one is another process.
    parent = os.getppid()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": parent, "host": socket.gethostname(), "start_time": "1", "token": "x"}))
    if not os.path.exists(f"/proc/{parent}/stat"):
        pytest.skip("no /proc: start times cannot be compared")
    with RunLock(tmp_path, log=lambda _: None) as lock:
        assert lock.taken_over["pid"] == parent

    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": _exited_pid(), "host": "another-host.example", "token": "y"}))
    with pytest.raises(RunLockedError, match="another-host.example.*delete the lock file"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "y"


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 1, "host": socket.gethostname(), "token": "someone-else"}))
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "someone-else"


def test_an_unreadable_lock_file_is_refused_not_stolen(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # another run between create and write
    with pytest.raises(RunLockedError, match="empty or unreadable"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == ""
