"""The backend-neutral layers and models (issue 22, first part): they import and run on
the JAX backend with TensorFlow blocked from import, and the same weights give the same
logits and BN statistics on both backends.

Each backend runs tests/backend_parity_run.py in its own process (Keras picks its
backend once per process): TensorFlow first, writing its weights and outputs; then JAX,
loading those weights, with `sys.modules["tensorflow"] = None`.

Tolerance: the inference logits agree to about 1e-6, the training-mode ones (batch
statistics, ghost groups) to about 1e-5 of the logits' scale (float32 reductions in a
different order); the moving statistics to 1e-6.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import with_quick_xla

# its module fixture runs once: every test of this file on one xdist worker
# (the test command's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("backend_neutral")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_parity_run.py")


def _run(backend, out, *extra):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax":  # cheap compilation (the bounds below hold with it too)
        env = with_quick_xla(env)
    done = subprocess.run([sys.executable, SCRIPT, str(out), *extra], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    pytest.importorskip("jax")  # the test extra installs it
    folder = tmp_path_factory.mktemp("parity")
    tf_out, jax_out = folder / "tf.npz", folder / "jax.npz"
    tf_log = _run("tensorflow", tf_out)
    jax_log = _run("jax", jax_out, f"--weights={tf_out}", "--block_tf")
    return dict(np.load(tf_out)), dict(np.load(jax_out)), tf_log, jax_log


def test_models_run_on_jax_with_tensorflow_blocked(outputs):
    _, jax_out, tf_log, jax_log = outputs
    assert "backend tensorflow" in tf_log
    assert "backend jax; tensorflow modules loaded: 0" in jax_log
    assert {"resnet:train_split_jit", "efficientnet:train_ghost",
            "nf_resnet:inference"} <= set(jax_out)


@pytest.mark.parametrize("key", [
    "resnet:inference", "resnet:inference_aux", "efficientnet:inference",
    "efficientnet:inference_aux", "nf_resnet:inference"])
def test_inference_logits_agree_through_main_and_auxiliary_bns(outputs, key):
    ref, got = outputs[0][key], outputs[1][key]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("key", [
    "resnet:train_split", "resnet:train_ghost", "efficientnet:train_split",
    "efficientnet:train_ghost"])
def test_training_forwards_agree_with_batch_statistics_and_ghost_groups(outputs, key):
    ref, got = outputs[0][key], outputs[1][key]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_jitted_stateless_forward_is_the_eager_one(outputs):
    ref, got = outputs[0]["resnet:train_split"], outputs[1]["resnet:train_split_jit"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_moving_statistics_move_the_same_on_both_backends(outputs):
    ref, got = outputs[0], outputs[1]
    keys = [k for k in ref if ":moving/" in k]
    assert len(keys) > 20
    for key in keys:
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    # ... and the training forward did move them (the comparison is not of loaded values)
    moved = [k for k in keys if not np.allclose(ref[k], ref[k.replace(":moving/",
                                                                      ":moving_loaded/")])]
    assert len(moved) > len(keys) // 4
