"""Training attacks: budget, pixel range, reproducibility, effect, BN isolation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.attacks import (AttackConfig, advprop_num_iter, attack,
                                          attack_model, float32_compute, linf_attack,
                                          random_targets)
from efficientnet_advprop.layers import AUX, MAIN, SplitBatchNorm

SEED = tf.constant([1, 2], tf.int64)


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False).numpy(), -1) == y))


def test_advprop_iteration_rule():
    assert [advprop_num_iter(e) for e in (1, 2, 3, 4, 6)] == [1, 3, 4, 5, 7]
    assert AttackConfig(epsilon=4).iterations == 5
    assert AttackConfig(attacker="fgsm", epsilon=4, num_iter=9).iterations == 1
    with pytest.raises(ValueError, match="epsilon"):
        AttackConfig(epsilon=-1)
    with pytest.raises(ValueError, match="attacker"):
        AttackConfig(attacker="cw")


@pytest.mark.parametrize("attacker", ["pgd", "ifgsm", "fgsm"])
def test_stays_in_ball_and_pixel_range(trained_linear_model, cifar_small, attacker):
    _, (x, y) = cifar_small
    x = x[:64].astype("float32")
    config = AttackConfig(attacker=attacker, epsilon=4.0, num_iter=6)
    adv = attack(trained_linear_model, x, y[:64], config, num_classes=10, seed=SEED).numpy()
    assert adv.dtype == np.float32
    assert np.max(np.abs(adv - x)) <= 4.0 + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    assert np.max(np.abs(adv - x)) > 3.0  # it moved to the budget's edge


def test_gd_is_not_projected(trained_linear_model, cifar_small):
    _, (x, y) = cifar_small
    x = x[:32].astype("float32")
    adv = linf_attack(trained_linear_model, x, y[:32], epsilon=2.0, step_size=1.0,
                      num_iter=6, random_start=False, project=False).numpy()
    assert np.max(np.abs(adv - x)) == pytest.approx(6.0, abs=1e-4)
    assert adv.min() >= 0.0 and adv.max() <= 255.0


def test_reproducible_under_seed(trained_linear_model, cifar_small):
    _, (x, y) = cifar_small
    x, y = x[:32].astype("float32"), y[:32]
    config = AttackConfig(epsilon=4.0, num_iter=2)
    a = attack(trained_linear_model, x, y, config, seed=SEED).numpy()
    b = attack(trained_linear_model, x, y, config, seed=SEED).numpy()
    c = attack(trained_linear_model, x, y, config, seed=tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pgd_lowers_accuracy_of_trained_model(trained_linear_model, cifar_small):
    _, (x, y) = cifar_small
    x = x.astype("float32")
    clean = _accuracy(trained_linear_model, x, y)
    assert clean > 0.2  # the model really learned something
    adv = attack(trained_linear_model, x, y, AttackConfig(epsilon=4.0), seed=SEED)
    robust = _accuracy(trained_linear_model, adv, y)
    assert robust < clean / 2, (clean, robust)


def test_targeted_attack_never_targets_true_class_and_moves_towards_target(
        trained_linear_model, cifar_small):
    labels = tf.constant(np.arange(10_000) % 10, tf.int32)
    targets = random_targets(labels, 10, SEED).numpy()
    assert not np.any(targets == labels.numpy())
    assert set(np.unique(targets)) == set(range(10))
    _, (x, y) = cifar_small
    x, y = x[:100].astype("float32"), y[:100]
    config = AttackConfig(epsilon=8.0, num_iter=10, targeted=True)
    seed = SEED
    adv = attack(trained_linear_model, x, y, config, num_classes=10, seed=seed)
    target = random_targets(y, 10, tf.random.experimental.stateless_fold_in(seed, 1))
    hit = np.mean(np.argmax(trained_linear_model(adv).numpy(), -1) == target.numpy())
    before = np.mean(np.argmax(trained_linear_model(x).numpy(), -1) == target.numpy())
    assert hit > before + 0.3


def _bn_model():
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(4, 3, strides=4, name="conv")(inputs)
    h = SplitBatchNorm(num_aux=1, name="bn")(h)
    h = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, keras.layers.Dense(10)(h))


@pytest.mark.parametrize("bn_mode", ["inference", "batch"])
@pytest.mark.parametrize("bn_set", [MAIN, AUX])
def test_attack_never_changes_moving_statistics(cifar_small, bn_mode, bn_set):
    _, (x, y) = cifar_small
    model = _bn_model()
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    config = AttackConfig(epsilon=4.0, bn_mode=bn_mode)
    adv = attack_model(model, x[:16].astype("float32"), y[:16], config, bn_set=bn_set,
                       seed=SEED)
    assert adv.shape == (16, 32, 32, 3)
    for b, v in zip(before, model.non_trainable_variables):
        if "seed_generator" in v.path:
            continue  # dropout's RNG state advances in batch mode, as in training
        np.testing.assert_array_equal(b, v.numpy(), err_msg=v.path)


def test_batch_mode_refuses_stock_batch_norm():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    with pytest.raises(ValueError, match="SplitBatchNorm"):
        attack_model(model, tf.zeros([2, 8, 8, 3]), tf.zeros([2], tf.int32),
                     AttackConfig(bn_mode="batch"), seed=SEED)


def test_attack_runs_in_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = _bn_model()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    x = tf.random.uniform([4, 32, 32, 3], 0, 255)
    assert model(x).dtype == tf.bfloat16
    with float32_compute(model):
        assert model(x).dtype == tf.float32
    assert model(x).dtype == tf.bfloat16  # restored afterwards
    adv = attack_model(model, x, tf.zeros([4], tf.int32), AttackConfig(epsilon=2.0),
                       seed=SEED)
    assert adv.dtype == tf.float32
    assert model(x).dtype == tf.bfloat16  # the attack left the policy as it was
    assert np.max(np.abs(adv.numpy() - x.numpy())) <= 2.0 + 1e-4
