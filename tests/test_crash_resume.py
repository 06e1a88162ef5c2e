"""A training run killed with SIGKILL resumes from its last checkpoint when the same
command is run again, and ends with the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT

MAIN = os.path.join(REPO_ROOT, "main.py")


def _command(model_dir):
    return [sys.executable, MAIN, "--advprop", "--model=resnet-18-cifar",
            "--width_multiplier=0.125", f"--model_dir={model_dir}", "--train_steps=40",
            "--train_batch_size=16", "--checkpoint_every_steps=10", "--mode=train",
            "--summary_every_steps=10", "--seed=3"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_DETERMINISTIC_OPS="1")


def _final_variables(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


@pytest.mark.slow  # three short main.py runs, about a minute
def test_sigkill_then_same_command_equals_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(_command(straight), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(killed), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        state = killed / "checkpoint"
        if state.exists() and "ckpt-10" in state.read_text():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved_step = int(tf.train.latest_checkpoint(str(killed)).rsplit("-", 1)[1])
    assert 10 <= saved_step < 40  # killed mid-run, with a checkpoint to resume from

    resumed = subprocess.run(_command(killed), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {saved_step}" in resumed.stderr  # resumed, not restarted
    a, b = _final_variables(straight), _final_variables(killed)
    assert a.keys() == b.keys() and len(a) > 50
    assert int(a["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 40
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
