"""enable_determinism: the same seed gives bitwise the same training run.

Without it, the embedded default's AdvProp step is not reproducible on a CPU: the
gradient of resnet-26-cifar on 128 images (64 clean + 64 adversarial) comes out
different from one call to the next (oneDNN kernels under concurrent op scheduling;
see efficientnet_advprop.training.determinism), with or without TF_DETERMINISTIC_OPS.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from efficientnet_advprop.training import (DeterminismError, TrainingError,
                                           determinism_requested, enable_determinism)

SCRIPT = os.path.join(REPO_ROOT, "tests", "determinism_run.py")


def test_determinism_requested_reads_tf_deterministic_ops():
    assert determinism_requested({"TF_DETERMINISTIC_OPS": "1"})
    assert determinism_requested({"TF_DETERMINISTIC_OPS": "true"})
    assert not determinism_requested({"TF_DETERMINISTIC_OPS": "0"})
    assert not determinism_requested({})


def test_enabling_it_after_the_runtime_started_is_an_error_not_a_silent_no_op():
    tf.constant(1.0) + 1.0  # the runtime is running (as in any test process)
    if tf.config.threading.get_inter_op_parallelism_threads() == 1:
        pytest.skip("this test process already runs with one inter-op thread")
    with pytest.raises(DeterminismError, match="before the first op") as raised:
        enable_determinism(0)
    assert isinstance(raised.value, TrainingError)


@pytest.mark.slow  # a fresh process: 6 gradients and two 4-step AdvProp runs, ~1-2 min
def test_two_runs_with_determinism_are_bitwise_identical(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ,
                                                           TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "result.json") as f:
        assert json.load(f)["distinct_gradients"] == 1
    a, b = np.load(tmp_path / "run_a.npz"), np.load(tmp_path / "run_b.npz")
    initial = np.load(tmp_path / "initial.npz")
    assert len(a.files) == len(b.files) > 200
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # tolerance 0
    moved = sum(not np.array_equal(a[key], initial[key]) for key in initial.files)
    assert moved > len(initial.files) // 2  # the four steps really trained
