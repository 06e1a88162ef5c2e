"""Crash-resume at the embedded default (AdvProp, batch 64): a run killed at any moment
and resumed ends with the same checkpoint as an uninterrupted one, and a newest
checkpoint that cannot be read back makes the resume fall back to the one before.

The exact-resume scenarios run in a fresh process (tests/resume_run.py) because they
need enable_determinism before TensorFlow starts: without it even two uninterrupted runs
differ at this batch (tests/test_determinism.py). A real SIGKILL of main.py is in
tests/test_crash_resume.py.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from efficientnet_advprop.recipes import make_recipe
from efficientnet_advprop.training import TrainConfig, Trainer, TrainingError

SCRIPT = os.path.join(REPO_ROOT, "tests", "resume_run.py")


def checkpoint_variables(model_dir, step=None):
    """{name: value} of every variable of a checkpoint (the newest by default)."""
    path = (tf.train.latest_checkpoint(str(model_dir)) if step is None
            else os.path.join(str(model_dir), f"ckpt-{step}"))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


# ----------------------------------------------------- unreadable newest checkpoint
def _tiny_trainer(model_dir, steps=4):
    def model_fn():  # a micro convnet: what is checkpointed matters here, not its size
        return keras.Sequential([
            keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0),
            keras.layers.Conv2D(4, 3, strides=2, name="conv"),
            keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="logits")],
            name="micro")

    config = TrainConfig(model_dir=str(model_dir), train_steps=steps, global_batch_size=8,
                         steps_per_epoch=10, optimizer="momentum", base_learning_rate=0.1,
                         lr_warmup_epochs=0, moving_average_decay=0.99, seed=1,
                         checkpoint_every_steps=2, summary_every_steps=100)
    return Trainer(tf.distribute.get_strategy(), model_fn, make_recipe("vanilla", 10),
                   config)


def _dataset_fn(ctx, start_step):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8, drop_remainder=True)
    return ds.skip(start_step)


def _damage(model_dir, how, step):
    prefix = os.path.join(model_dir, f"ckpt-{step}")
    if how == "truncated_data":
        data = prefix + ".data-00000-of-00001"
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == "missing_index":
        os.remove(prefix + ".index")
    elif how == "garbage_index":
        with open(prefix + ".index", "wb") as f:
            f.write(b"\x00" * 64)
    elif how == "missing_data":
        os.remove(prefix + ".data-00000-of-00001")


def _state(trainer):
    """Every checkpointed value of a trainer (model, optimizer, EMA, step), in order."""
    return ([v.numpy() for v in trainer.model.weights]
            + [v.numpy() for v in trainer.optimizer.variables]
            + [s.numpy() for s in trainer.ema.shadows] + [trainer.step.numpy()])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, and its state at step 2."""
    model_dir = tmp_path_factory.mktemp("two_checkpoints") / "run"
    states = {}
    _tiny_trainer(model_dir).train(
        _dataset_fn, on_checkpoint=lambda t: states.setdefault(int(t.step.numpy()),
                                                               _state(t)))
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    return model_dir, states[2]


@pytest.mark.parametrize("how", ["truncated_data", "missing_index", "garbage_index",
                                 "missing_data"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(
        tmp_path, capfd, two_checkpoints, how):
    source, at_2 = two_checkpoints
    model_dir = tmp_path / "run"
    shutil.copytree(source, model_dir)
    _damage(model_dir, how, 4)

    trainer = _tiny_trainer(model_dir, steps=6)
    assert trainer.restore() == 2
    assert "skipped unreadable checkpoint(s) ckpt-4" in capfd.readouterr().err
    assert trainer.manager.latest_checkpoint.endswith("ckpt-2")
    # Every value is checkpoint 2's, whatever the failed attempt had assigned.
    restored = _state(trainer)
    assert len(restored) == len(at_2) > 10
    for a, b in zip(restored, at_2):
        np.testing.assert_array_equal(a, b)


def test_the_run_goes_on_over_the_damaged_checkpoint(tmp_path, two_checkpoints):
    source, _ = two_checkpoints
    model_dir = tmp_path / "run"
    shutil.copytree(source, model_dir)
    _damage(model_dir, "truncated_data", 4)
    trainer = _tiny_trainer(model_dir, steps=6)
    trainer.train(_dataset_fn)
    assert trainer.start_step == 2  # resumed from the readable ckpt-2, not from 0
    assert int(trainer.step.numpy()) == 6
    assert _tiny_trainer(model_dir, steps=6).restore() == 6  # ckpt-4 rewritten, ckpt-6


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, two_checkpoints):
    source, _ = two_checkpoints
    model_dir = tmp_path / "run"
    shutil.copytree(source, model_dir)
    _damage(model_dir, "missing_index", 4)
    _damage(model_dir, "truncated_data", 2)
    with pytest.raises(TrainingError, match=r"no checkpoint in .* can be read: ckpt-4 .*; "
                                            r"ckpt-2 "):
        _tiny_trainer(model_dir, steps=6).train(_dataset_fn)
    assert sorted(f for f in os.listdir(model_dir) if f.endswith(".index")) == [
        "ckpt-2.index"]  # nothing overwritten


# ------------------------------------------------------------ exact resume, batch 64
@pytest.mark.slow  # a fresh process: 5 short AdvProp runs of resnet-26-cifar, ~2-4 min
def test_killed_at_any_moment_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), "--model=resnet-26-cifar", "--steps=6",
         "--every=2"], capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "result.json") as f:
        restored = json.load(f)
    # The kill before checkpoint 4 was complete resumes from 2; a named but unreadable
    # checkpoint 4 falls back to 2.
    assert restored == {"after_checkpoint": 2, "during_write": 2, "truncated_data": 2,
                        "missing_index": 2}
    assert "skipped unreadable checkpoint(s) ckpt-4" in done.stderr

    straight = checkpoint_variables(tmp_path / "straight")
    assert int(straight["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6 and len(straight) > 800
    for scenario in restored:
        resumed = checkpoint_variables(tmp_path / scenario)
        assert resumed.keys() == straight.keys(), scenario
        for name, value in straight.items():  # tolerance 0: bitwise
            np.testing.assert_array_equal(resumed[name], value,
                                          err_msg=f"{scenario}: {name}")
