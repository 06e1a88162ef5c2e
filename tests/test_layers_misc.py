"""StochasticDepth and InputNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import efficientnet_advprop.layers as layers_pkg
from efficientnet_advprop.layers import InputNormalization, StochasticDepth


def test_layers_package_exports():
    for name in ("SplitBatchNorm", "bn_route", "BNRoute", "current_route", "MAIN", "AUX",
                 "is_auxiliary_variable", "sync_moving_statistics", "StochasticDepth",
                 "InputNormalization"):
        assert hasattr(layers_pkg, name), name


# ----------------------------------------------------------------- InputNormalization

def test_advprop_mode_maps_range_to_minus_one_one():
    layer = InputNormalization("advprop")
    x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)


def test_imagenet_mode_hand_computed():
    layer = InputNormalization("imagenet")
    x = np.array([[[[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [100.0, 50.0, 200.0]]]],
                 np.float32)
    expected = [[[
        [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
        [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
        [(100 - 123.675) / 58.395, (50 - 116.28) / 57.12, (200 - 103.53) / 57.375],
    ]]]
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_none_mode_is_identity():
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(InputNormalization("none")(x)), x)


def test_mode_survives_config_and_serialization():
    for mode in ("imagenet", "advprop", "none"):
        layer = InputNormalization(mode, name="input_normalization")
        assert layer.get_config()["mode"] == mode
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert isinstance(clone, InputNormalization) and clone.mode == mode
        assert not clone.weights


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown input normalization mode"):
        InputNormalization("torch")


def test_output_in_compute_dtype_and_uint8_input():
    layer = InputNormalization("advprop", dtype="mixed_float16")
    y = layer(np.full((1, 2, 2, 3), 255, np.uint8))
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0)
    sym = InputNormalization("imagenet", dtype="mixed_bfloat16")(keras.Input((4, 4, 3)))
    assert sym.dtype == "bfloat16"


# -------------------------------------------------------------------- StochasticDepth

def test_stochastic_depth_identity_at_inference():
    x = np.random.default_rng(1).normal(size=(8, 3, 3, 4)).astype(np.float32)
    layer = StochasticDepth(0.5, seed=3)
    np.testing.assert_array_equal(np.asarray(layer(x)), x)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_stochastic_depth_survival_one_is_identity_in_training():
    x = np.random.default_rng(2).normal(size=(8, 3, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(StochasticDepth(1.0)(x, training=True)), x)


def test_stochastic_depth_training_per_sample_mask_and_mean():
    p = 0.8
    n = 4000
    rng = np.random.default_rng(3)
    x = (rng.uniform(0.5, 1.5, size=(n, 1, 1, 1))
         * np.ones((n, 2, 2, 3))).astype(np.float32)
    x += rng.normal(scale=0.01, size=x.shape).astype(np.float32)
    y = np.asarray(StochasticDepth(p, seed=7)(x, training=True))
    flat_y, flat_x = y.reshape(n, -1), x.reshape(n, -1)
    dropped = np.all(flat_y == 0.0, axis=1)
    kept = np.all(np.isclose(flat_y, flat_x / p, rtol=1e-6), axis=1)
    assert np.all(dropped | kept)  # a whole sample is either dropped or kept
    assert abs(kept.mean() - p) < 0.03
    np.testing.assert_allclose(y.mean(), x.mean(), rtol=0.05)  # expectation preserved


def test_stochastic_depth_draws_fresh_masks_and_works_in_tf_function():
    layer = StochasticDepth(0.5, seed=11)
    x = tf.ones((64, 1, 1, 1))
    fn = tf.function(lambda t: layer(t, training=True))
    a, b = np.asarray(fn(x)).ravel(), np.asarray(fn(x)).ravel()
    assert set(np.unique(a)) <= {0.0, 2.0}
    assert not np.array_equal(a, b)


def test_stochastic_depth_config_round_trip_and_validation():
    layer = StochasticDepth(0.9, seed=5, name="block2b_drop")
    config = layer.get_config()
    assert config["survival_prob"] == 0.9 and config["seed"] == 5
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, StochasticDepth) and clone.survival_prob == 0.9
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            StochasticDepth(bad)


def test_stochastic_depth_masks_differ_between_replicas(two_device_strategy):
    strategy = two_device_strategy
    with strategy.scope():
        layer = StochasticDepth(0.5, seed=13)

    @tf.function
    def step():
        return strategy.run(lambda: layer(tf.ones((64, 1, 1, 1)), training=True))

    first, second = (np.asarray(v).ravel()
                     for v in strategy.experimental_local_results(step()))
    assert set(np.unique(first)) <= {0.0, 2.0} and set(np.unique(second)) <= {0.0, 2.0}
    assert not np.array_equal(first, second)


def test_stochastic_depth_jit_compile():
    layer = StochasticDepth(0.75, seed=2)
    fn = tf.function(lambda t: layer(t, training=True), jit_compile=True)
    y = np.asarray(fn(tf.ones((32, 2, 2, 1)))).reshape(32, -1)
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
