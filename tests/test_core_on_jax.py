"""The backend-neutral core on Keras' JAX backend, in this process, with TensorFlow
blocked from import (tests/conftest.py does it under KERAS_BACKEND=jax):

    KERAS_BACKEND=jax python -m pytest -q tests/test_core_on_jax.py

Under the TensorFlow backend (the main suite) this file is skipped; the main suite runs
the JAX engine in child processes with TensorFlow blocked: every recipe's step
(tests/test_recipes_jax.py), main.py (test_jax_engine.py) and the parity with the TF
engine (test_engine_parity.py).
"""

import importlib
import os
import sys

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") != "jax":
    pytest.skip("the JAX tier: run with KERAS_BACKEND=jax", allow_module_level=True)

import jax  # noqa: E402
import keras  # noqa: E402

from efficientnet_advprop import seam  # noqa: E402
from efficientnet_advprop.models import build_model  # noqa: E402
from efficientnet_advprop.recipes import make_recipe  # noqa: E402
from efficientnet_advprop.training.jax_engine import JaxTrainer  # noqa: E402
from efficientnet_advprop.training.loop import TrainConfig  # noqa: E402

CORE = ["efficientnet_advprop.layers", "efficientnet_advprop.models",
        "efficientnet_advprop.attacks", "efficientnet_advprop.attacks.model_attack",
        "efficientnet_advprop.recipes", "efficientnet_advprop.training.gradients",
        "efficientnet_advprop.training.agc", "efficientnet_advprop.training.schedules",
        "efficientnet_advprop.training.optimizers", "efficientnet_advprop.training.loop",
        "efficientnet_advprop.training.jax_engine", "efficientnet_advprop.jax_experiment",
        "efficientnet_advprop.data.numpy_input", "efficientnet_advprop.config",
        "efficientnet_advprop.seam"]


def tiny_model(num_aux=1):
    return build_model("resnet-18-cifar", 10, normalizer="split_batch_norm", num_aux=num_aux,
                       width_multiplier=0.125, image_size=32, dropout_rate=0.0)


def embedded_batches(batch_size, seed=0):
    from efficientnet_advprop.data import numpy_input

    stream = numpy_input.make_numpy_input("embedded", None, "train", batch_size, 32, seed,
                                          True)[0]
    return lambda start: iter(numpy_input.NumpyStream(
        stream.images, stream.labels, batch_size, seed, True, start_step=start))


def test_the_core_imports_with_tensorflow_blocked():
    assert sys.modules.get("tensorflow", "absent") is None
    for name in CORE:
        importlib.import_module(name)
    loaded = [m for m, module in sys.modules.items()
              if (m == "tensorflow" or m.startswith("tensorflow.")) and module is not None]
    assert not loaded
    assert seam.backend() == "jax"


def test_advprop_trains_on_two_devices_as_on_one(tmp_path):
    """The data-parallel step (two XLA host devices, the batch split between them)
    gives the one-device step's weights: BN statistics are over the global batch."""
    assert len(jax.devices()) == 2
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        keras.utils.set_random_seed(0)
        config = TrainConfig(model_dir=str(tmp_path / f"d{len(devices)}"), train_steps=2,
                             global_batch_size=16, steps_per_epoch=100, optimizer="momentum",
                             base_learning_rate=0.1, lr_warmup_epochs=0,
                             moving_average_decay=0.99, checkpoint_every_steps=2)
        trainer = JaxTrainer(tiny_model, make_recipe("advprop", 10), config, devices=devices)
        start = [np.asarray(v) for v in trainer.state["trainable"]]
        trainer.train(embedded_batches(16))
        results.append((start, trainer))
        keras.distribution.set_distribution(None)
    (start, one), (_, two) = results
    moved = sum(not np.allclose(a, np.asarray(b)) for a, b in
                zip(start, one.state["trainable"]))
    assert moved > len(start) // 2
    for a, b in zip(one.state["trainable"] + one.state["non_trainable"],
                    two.state["trainable"] + two.state["non_trainable"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    assert two.images_per_second is None or two.images_per_second > 0


def test_runs_that_differ_only_in_seed_compile_one_program(tmp_path):
    """The run's seed is an argument of the compiled step, not a constant in it: two
    seeds lower to the same HLO (so JAX's persistent cache compiles a tier's seeds of
    one run once), and the step still draws from it (the attack's start differs)."""
    import hashlib

    programs, losses = [], []
    for seed in (0, 1):
        keras.utils.set_random_seed(0)  # the same initial weights for both
        config = TrainConfig(model_dir=str(tmp_path / f"s{seed}"), train_steps=1,
                             global_batch_size=16, steps_per_epoch=100, seed=seed,
                             optimizer="momentum", base_learning_rate=0.1,
                             lr_warmup_epochs=0, checkpoint_every_steps=1)
        trainer = JaxTrainer(lambda: tiny_model(), make_recipe("advprop", 10), config,
                             devices=jax.devices()[:1])
        batch = next(embedded_batches(16)(0))
        stacked = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], batch)
        fn = trainer._loop_fn(1)
        text = fn.lower(trainer.state, stacked, np.int32(0), trainer.run_seed).as_text()
        programs.append(hashlib.sha256(text.encode()).hexdigest())
        _, (loss, _) = fn(trainer.state, stacked, np.int32(0), trainer.run_seed)
        losses.append(float(np.asarray(loss)[0]))
    assert programs[0] == programs[1]
    assert losses[0] != losses[1]  # the random-start attack drew differently
