"""Checks that need an accelerator: every recipe's step under XLA against the plain step,
bfloat16 and float16 steps, MirroredStrategy over the local GPUs, and a SavedModel
exported on the GPU that loads and agrees on the CPU.

Every test here is marked `accelerator` and skips, with the reason, where TensorFlow
sees no GPU (TPU hosts included: these checks place work on GPUs and hide them with
CUDA_VISIBLE_DEVICES). scripts/device_check.py runs them as
``python -m pytest tests/test_accelerator.py -m accelerator``.

Numerics: the comparisons turn TensorFloat-32 off (on by default on Ampere and later,
where it rounds float32 matmul/conv inputs to 10 mantissa bits) so that they compare
float32 with float32.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import build_model
from efficientnet_advprop.attacks import AttackConfig
from efficientnet_advprop.export import export_saved_model
from efficientnet_advprop.layers import AUX, MAIN, bn_route
from efficientnet_advprop.recipes import RECIPES, make_recipe
from efficientnet_advprop.training import TrainConfig, Trainer, set_global_seed
from test_recipes import NUM_CLASSES, micro_model

GPUS = tf.config.list_physical_devices("GPU")


def _skip_reason():
    if tf.config.list_physical_devices("TPU"):
        return "a TPU but no GPU: these checks are written for GPUs"
    return "no GPU visible to TensorFlow"


pytestmark = [pytest.mark.accelerator, pytest.mark.skipif(not GPUS, reason=_skip_reason())]

TINY_B0 = dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
               dropout_rate=0.0, survival_prob=1.0)


@pytest.fixture
def float32_matmuls():
    """TensorFloat-32 off for the test (restored after)."""
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(previous)


def _on_gpu(variable):
    """Where a Keras (or tf) variable lives."""
    return "GPU" in getattr(variable, "value", variable).device.upper()


# ------------------------------------------------------ XLA against the plain step
# XLA draws other random numbers than TensorFlow's kernels for the same stateless seed
# (measured: tf.random.stateless_uniform differs under jit_compile=True, Philox
# included). The comparison therefore uses attacks without a random start (I-FGSM; FGSM
# for Fast AdvProp, whose shuffle-BN groups of one image make its permutation a mere
# reordering), so that both steps compute the same function. Recipes that still draw
# random numbers inside the step (TRADES' Gaussian start, MBN-AT's random targets,
# NoFrost*'s augmentations) are compared on the direction of the update instead.
DETERMINISTIC_ATOL = 1e-4  # weights after one step: |xla - plain| <= atol + rtol |plain|
DETERMINISTIC_RTOL = 1e-3
LOSS_RTOL = 1e-4  # the step's loss, deterministic recipes
RANDOM_UNDER_XLA = {"trades", "trades_fat", "mbn_at", "nofrost_star"}
RANDOM_MIN_COSINE = 0.99  # cosine of the two updates (all weights), random recipes
RANDOM_LOSS_RTOL = 0.05


def deterministic_recipe(name):
    """`name` with an attack that draws no random numbers where the recipe allows."""
    attack = AttackConfig(attacker="ifgsm", epsilon=2.0, step_size=1.0, num_iter=2)
    options = {"label_smoothing": 0.1}
    if name != "vanilla":
        options["attack"] = attack
    if name == "fast_advprop":  # 4 adversarial images of 20: ghost groups of 1
        options.update(attack=AttackConfig(attacker="fgsm", epsilon=2.0),
                       shuffle_bn_group_size=1)
    if name == "mbn_at":
        options.update(attack=AttackConfig(attacker="ifgsm", epsilon=4.0, num_iter=2,
                                           targeted=True), alp_weight=0.5)
    return make_recipe(name, NUM_CLASSES, **options)


def one_step(name, jit_compile, model_dir):
    """(trainer, weights before, loss) after one step of recipe `name` on the micro
    model and a fixed batch of 20, on the default device."""
    recipe = deterministic_recipe(name)
    config = TrainConfig(model_dir=str(model_dir), train_steps=1, global_batch_size=20,
                         steps_per_epoch=1, optimizer="momentum", base_learning_rate=0.1,
                         lr_warmup_epochs=0, moving_average_decay=0.9, seed=5,
                         jit_compile=jit_compile)
    set_global_seed(0)
    trainer = Trainer(tf.distribute.get_strategy(),
                      lambda: micro_model(max(1, recipe.num_aux)), recipe, config)
    rng = np.random.default_rng(0)
    inputs = (tf.constant(rng.uniform(0, 255, (20, 16, 16, 3)), tf.float32),
              tf.constant(rng.integers(0, NUM_CLASSES, 20), tf.int32))
    if recipe.needs_source_tags:
        inputs += (tf.constant(np.arange(20) % 2, tf.int32),)
    before = [w.copy() for w in trainer.model.get_weights()]
    loss, _ = trainer._train_step(*inputs)
    return trainer, before, float(loss)


def compare_xla_step(name, tmp_path):
    """Runs both steps and checks them against this module's tolerances; returns the
    largest weight difference and the cosine of the two updates."""
    plain, before, plain_loss = one_step(name, False, tmp_path / "plain")
    xla, before_xla, xla_loss = one_step(name, True, tmp_path / "xla")
    for a, b in zip(before, before_xla):
        np.testing.assert_array_equal(a, b)  # the same initial weights
    assert np.isfinite(plain_loss) and np.isfinite(xla_loss)
    plain_w, xla_w = plain.model.get_weights(), xla.model.get_weights()
    delta_plain = np.concatenate([(a - b).ravel() for a, b in zip(plain_w, before)])
    delta_xla = np.concatenate([(a - b).ravel() for a, b in zip(xla_w, before)])
    assert np.abs(delta_plain).max() > 0  # the step did train
    cosine = float(delta_plain @ delta_xla / (np.linalg.norm(delta_plain)
                                              * np.linalg.norm(delta_xla)))
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(plain_w, xla_w))
    if name in RANDOM_UNDER_XLA:
        assert cosine >= RANDOM_MIN_COSINE, (name, cosine)
        np.testing.assert_allclose(xla_loss, plain_loss, rtol=RANDOM_LOSS_RTOL)
    else:
        np.testing.assert_allclose(xla_loss, plain_loss, rtol=LOSS_RTOL)
        for a, b, var in zip(xla_w, plain_w, plain.model.weights):
            np.testing.assert_allclose(a, b, atol=DETERMINISTIC_ATOL,
                                       rtol=DETERMINISTIC_RTOL, err_msg=f"{name}: {var.path}")
    return xla, max_diff, cosine


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_step_compiles_with_xla_on_the_gpu_and_matches_the_plain_step(
        name, tmp_path, float32_matmuls):
    xla, _, _ = compare_xla_step(name, tmp_path)
    assert xla._grad_fn.experimental_get_tracing_count() == 1  # one compiled step
    assert all(_on_gpu(v) for v in xla.model.trainable_variables)


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_steps_train_on_the_gpu_with_xla(precision, tmp_path):
    recipe = make_recipe("advprop", 10, attack=AttackConfig(epsilon=2.0))
    config = TrainConfig(model_dir=str(tmp_path), train_steps=3, global_batch_size=16,
                         steps_per_epoch=10, optimizer="momentum", base_learning_rate=0.5,
                         lr_warmup_epochs=0, moving_average_decay=0.0, seed=1,
                         precision=precision, jit_compile=True)
    set_global_seed(0)
    trainer = Trainer(tf.distribute.get_strategy(), lambda: build_model(
        "efficientnet-b0", 10, normalizer="split_batch_norm", num_aux=1, **TINY_B0),
        recipe, config)
    assert trainer.model.get_layer("stem_conv").compute_dtype == precision
    assert all(_on_gpu(v) and v.dtype == "float32" for v in trainer.model.trainable_variables)
    if precision == "float16":  # an untrained micro model overflows at Keras' 2 ** 15
        trainer.optimizer.dynamic_scale.assign(2.0 ** 8)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (16, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, 16), tf.int32)
    before = [w.copy() for w in trainer.model.get_weights()]
    for _ in range(3):
        loss, _ = trainer._train_step(images, labels)
        assert np.isfinite(float(loss))
    after = trainer.model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(after) // 2
    assert int(trainer.optimizer.iterations.numpy()) >= 1  # at least one step applied


# --------------------------------------------------------------- MirroredStrategy
@pytest.fixture(scope="module")
def gpu_strategy():
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(len(GPUS))])


@pytest.mark.parametrize("name", ["advprop", "fast_advprop"])
def test_mirrored_strategy_over_the_local_gpus_trains_a_step(name, tmp_path, gpu_strategy):
    replicas = gpu_strategy.num_replicas_in_sync
    assert replicas == len(GPUS)
    batch = 10 * replicas  # 2 adversarial images per replica for Fast AdvProp
    recipe = deterministic_recipe(name)
    config = TrainConfig(model_dir=str(tmp_path), train_steps=1, global_batch_size=batch,
                         steps_per_epoch=1, optimizer="momentum", base_learning_rate=0.1,
                         lr_warmup_epochs=0, moving_average_decay=0.9, jit_compile=True)
    trainer = Trainer(gpu_strategy, lambda: micro_model(1), recipe, config)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, batch).astype("int32")

    def dataset_fn(ctx, start):
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).shard(
            ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.batch(ctx.get_per_replica_batch_size(batch), drop_remainder=True).repeat()

    before = [w.copy() for w in trainer.model.get_weights()]
    metrics = trainer.train(dataset_fn)
    after = trainer.model.get_weights()
    assert int(trainer.step.numpy()) == 1
    assert all(np.isfinite(w).all() for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert np.isfinite(metrics["loss/clean"])
    assert all(_on_gpu(v) for v in trainer.model.trainable_variables)


# -------------------------------------------------- SavedModel: GPU export, CPU load
LOADER = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
export_dir, images_path = sys.argv[1:3]
out = tf.saved_model.load(export_dir).signatures["serving_default"](
    images=tf.constant(np.load(images_path)))
print(json.dumps({"logits": out["logits"].numpy().tolist(),
                  "gpus": len(tf.config.list_physical_devices("GPU"))}))
"""
EXPORT_ATOL = 2e-4  # logits, GPU float32 (TF32 off) against CPU float32
EXPORT_RTOL = 1e-4


def test_saved_model_exported_on_the_gpu_loads_and_matches_on_the_cpu(tmp_path,
                                                                       float32_matmuls):
    keras.utils.set_random_seed(1)
    model = build_model("efficientnet-b0", 10, normalizer="split_batch_norm", num_aux=1,
                        preprocessing="advprop", **TINY_B0)
    assert all(_on_gpu(v) for v in model.variables)  # TensorFlow's default placement
    rng = np.random.default_rng(0)
    for route, shift in ((MAIN, 20.0), (AUX, 120.0)):  # move both BN sets' statistics
        with bn_route(route):
            for _ in range(3):
                model(rng.uniform(0, 255 - shift, (16, 32, 32, 3)).astype("float32") + shift,
                      training=True)
    export_dir = str(tmp_path / "export")
    export_saved_model(model, export_dir, eval_crop="cifar")
    images = rng.uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    expected = model(images, training=False).numpy()
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "load.py").write_text(LOADER)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH="")
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), export_dir,
                             str(tmp_path / "images.npy")], capture_output=True, text=True,
                            env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["gpus"] == 0  # the load ran on the CPU
    np.testing.assert_allclose(np.array(out["logits"]), expected, atol=EXPORT_ATOL,
                               rtol=EXPORT_RTOL)
