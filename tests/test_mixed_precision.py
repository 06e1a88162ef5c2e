"""Mixed precision: bfloat16/float16 training steps, float32 attacks, loss scaling."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import build_model
from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.attacks.model_attack import logits_fn_for
from efficientnet_advprop.attacks.pgd import attack
from efficientnet_advprop.layers import SplitBatchNorm
from efficientnet_advprop.recipes import make_recipe
from efficientnet_advprop.training import TrainConfig, Trainer, set_global_seed
from efficientnet_advprop.training.trainer import dtype_policy

TINY = dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25)


def tiny_model(num_aux=1):
    return build_model("efficientnet-b0", 10, normalizer="split_batch_norm",
                       num_aux=num_aux, dropout_rate=0.0, survival_prob=1.0, **TINY)


def _config(tmp_path, precision, **kw):
    base = dict(model_dir=str(tmp_path), train_steps=2, global_batch_size=8,
                steps_per_epoch=10, optimizer="momentum", base_learning_rate=0.5,
                lr_warmup_epochs=0, moving_average_decay=0.0, seed=1, precision=precision,
                summary_every_steps=100, checkpoint_every_steps=100)
    base.update(kw)
    return TrainConfig(**base)


def _dataset_fn(cifar_small):
    (x, y), _ = cifar_small
    x, y = x[:32].astype("float32"), y[:32]

    def fn(ctx, start_step):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
        return ds.batch(ctx.get_per_replica_batch_size(8), drop_remainder=True)
    return fn


def test_bfloat16_steps_train_with_float32_variables_and_statistics(tmp_path, cifar_small):
    recipe = make_recipe("advprop", 10, attack=AttackConfig(epsilon=2.0))
    trainer = Trainer(tf.distribute.get_strategy(), tiny_model, recipe,
                      _config(tmp_path, "bfloat16"))
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    conv = trainer.model.get_layer("stem_conv")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    before = [w.copy() for w in trainer.model.get_weights()]
    metrics = trainer.train(_dataset_fn(cifar_small))
    assert np.isfinite(metrics["loss/clean"]) and np.isfinite(metrics["loss/adversarial"])
    assert all(v.dtype == "float32" for v in trainer.model.weights)
    after = trainer.model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(after) // 2
    bn = trainer.model.get_layer("stem_bn")
    assert isinstance(bn, SplitBatchNorm)
    assert not np.allclose(bn.moving_means[1].numpy(), 0.0)  # aux statistics moved
    assert trainer.model.get_layer("predictions").compute_dtype == "float32"  # logits


def test_attack_under_a_mixed_policy_runs_in_float32(cifar_small):
    (x, y), _ = cifar_small
    images, labels = tf.constant(x[:8], tf.float32), tf.constant(y[:8])
    set_global_seed(3)
    with dtype_policy("mixed_bfloat16"):
        mixed = tiny_model(num_aux=0)
    reference = tiny_model(num_aux=0)
    reference.set_weights(mixed.get_weights())
    config = AttackConfig(epsilon=8.0, step_size=2.0, num_iter=4)
    seed = tf.constant([5, 6], tf.int64)
    ours = attack_model(mixed, images, labels, config, seed=seed).numpy()
    expected = attack_model(reference, images, labels, config, seed=seed).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    assert np.abs(ours - images.numpy()).max() > 1.0  # the attack did move the images
    # The same attack traced in bfloat16 (no float32_compute) takes other steps.
    rounded = attack(logits_fn_for(mixed), images, labels, config, num_classes=10,
                     seed=seed).numpy()
    assert np.abs(rounded - expected).max() > 1.0


@pytest.mark.parametrize("replicas", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_float16_uses_dynamic_loss_scaling_and_skips_overflowing_steps(
        tmp_path, cifar_small, two_device_strategy, replicas):
    strategy = two_device_strategy if replicas == 2 else tf.distribute.get_strategy()
    trainer = Trainer(strategy, lambda: tiny_model(num_aux=0), make_recipe("vanilla", 10),
                      _config(tmp_path, "float16", train_steps=1))
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert trainer.model.get_layer("stem_conv").compute_dtype == "float16"
    assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0 ** 15  # Keras' default
    # This untrained micro model overflows float16 at the first scales; start where the
    # first step is applied (the halving is checked below).
    trainer.optimizer.dynamic_scale.assign(2.0 ** 8)
    before = [w.copy() for w in trainer.model.get_weights()]
    metrics = trainer.train(_dataset_fn(cifar_small))
    assert np.isfinite(metrics["loss/clean"])
    after = trainer.model.get_weights()
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(after) // 2
    assert all(np.isfinite(w).all() for w in after)
    assert int(trainer.optimizer.iterations.numpy()) == 1
    # A scale that overflows float16 in the backward pass: the step is skipped on every
    # replica and the scale halves; the step counter still advances.
    trainer.optimizer.dynamic_scale.assign(2.0 ** 60)
    batch = next(iter(strategy.distribute_datasets_from_function(
        lambda ctx: _dataset_fn(cifar_small)(ctx, 0))))
    loss, _ = trainer._train_step(*batch)
    assert np.isfinite(float(loss))  # the forward pass is fine, the backward overflows
    assert int(trainer.step.numpy()) == 2 and int(trainer.optimizer.iterations.numpy()) == 1
    assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0 ** 59
    trainable = {id(v) for v in trainer.model.trainable_variables}
    for a, b, var in zip(after, trainer.model.get_weights(), trainer.model.weights):
        if id(var) in trainable:  # (the forward pass still moved the BN statistics)
            np.testing.assert_array_equal(a, b, err_msg=var.path)
