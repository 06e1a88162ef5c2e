"""A training run killed with SIGKILL resumes from its last checkpoint when the same
command is run again, and ends with the same weights as an uninterrupted run.

The command is the embedded default's (batch 64: 64 clean + 64 adversarial images per
step), killed at three moments: right after a checkpoint, in the middle of the steps
after it, and as the next checkpoint's write starts (a small checkpoint is written in
milliseconds: the kill often lands just after it; tests/test_resume.py rebuilds the
exact state a kill in mid-write leaves). It runs deterministically
(one inter-op thread and TF op determinism, what
efficientnet_advprop.training.enable_determinism sets up): without that, two
uninterrupted runs at this batch already differ (tests/test_determinism.py), so a
resumed one cannot be compared.
"""

import os
import re
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT

MAIN = os.path.join(REPO_ROOT, "main.py")
STEPS, EVERY = 24, 8


def _command(model_dir):
    return [sys.executable, MAIN, "--advprop", "--model=resnet-26-cifar",
            "--width_multiplier=0.125", f"--model_dir={model_dir}",
            f"--train_steps={STEPS}", f"--checkpoint_every_steps={EVERY}", "--mode=train",
            f"--summary_every_steps={EVERY}", "--seed=3"]


def _env():
    # TF_NUM_INTEROP_THREADS=1 + TF_DETERMINISTIC_OPS=1: what enable_determinism does,
    # through the environment (main.py --deterministic calls it).
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_DETERMINISTIC_OPS="1",
                TF_NUM_INTEROP_THREADS="1")


def _final_variables(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def _names_checkpoint(model_dir, step):
    state = model_dir / "checkpoint"
    return state.exists() and f'"ckpt-{step}"' in state.read_text()


def _after_checkpoint(line, model_dir, seen):
    return _names_checkpoint(model_dir, EVERY)


def _mid_steps(line, model_dir, seen):
    match = re.search(r"\] (\d+)/%d " % STEPS, line)
    return bool(match) and EVERY + 3 <= int(match.group(1)) < 2 * EVERY


def _at_checkpoint_write(line, model_dir, seen):
    # TensorFlow logs this as it starts writing a checkpoint's tensors; the second one
    # is checkpoint 2 * EVERY. (Should a TF version stop logging it, the kill comes
    # right after that checkpoint instead: still a valid moment.)
    if "Sharding callback duration" in line:
        seen["saves"] = seen.get("saves", 0) + 1
    return seen.get("saves", 0) >= 2 or _names_checkpoint(model_dir, 2 * EVERY)


def _run_and_kill(model_dir, should_kill, timeout=900):
    """Runs the command, reading its stderr line by line (and looking at model_dir
    every 20 ms), and SIGKILLs it as soon as should_kill(line, model_dir, seen)."""
    process = subprocess.Popen(_command(model_dir), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    buffer, seen, deadline = b"", {}, time.time() + timeout
    try:
        while process.poll() is None and time.time() < deadline:
            lines = []
            if selector.select(timeout=0.02):
                chunk = os.read(process.stderr.fileno(), 65536)
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                lines = [line.decode(errors="replace") for line in complete]
            if any(should_kill(line, model_dir, seen) for line in lines or [""]):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        selector.close()
        process.stderr.close()
    return process.returncode


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(_command(model_dir), env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    variables = _final_variables(model_dir)
    assert int(variables["step/.ATTRIBUTES/VARIABLE_VALUE"]) == STEPS
    return variables


@pytest.mark.slow  # per moment: a killed and a resumed main.py run, 2-4 minutes
@pytest.mark.parametrize("moment,resumed_at", [
    (_after_checkpoint, {EVERY}), (_mid_steps, {EVERY}),
    (_at_checkpoint_write, {EVERY, 2 * EVERY})], ids=["after_checkpoint", "mid_steps",
                                                       "at_checkpoint_write"])
def test_sigkill_then_same_command_equals_uninterrupted_run(tmp_path, straight, moment,
                                                            resumed_at):
    killed = tmp_path / "killed"
    returncode = _run_and_kill(killed, moment)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved_step = int(tf.train.latest_checkpoint(str(killed)).rsplit("-", 1)[1])
    assert saved_step in resumed_at  # killed mid-run, with a checkpoint to resume from

    resumed = subprocess.run(_command(killed), env=_env(), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {saved_step}" in resumed.stderr  # resumed, not restarted
    b = _final_variables(killed)
    assert straight.keys() == b.keys() and len(straight) > 800
    for name in straight:  # tolerance 0: bitwise
        np.testing.assert_array_equal(straight[name], b[name], err_msg=name)
