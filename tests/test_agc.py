"""Adaptive gradient clipping against hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.training.agc import (adaptive_clip_gradients,
                                               is_classifier_variable, unitwise_norm)


def test_unitwise_norm_shapes_and_values():
    conv = np.array([3.0, 0.0, 4.0, 1.0], "float32").reshape(1, 1, 2, 2)
    # unit 0: (3, 4) -> 5; unit 1: (0, 1) -> 1
    np.testing.assert_allclose(unitwise_norm(conv).numpy(), [[[[5.0, 1.0]]]])
    dense = np.array([[1.0, 2.0, 0.0], [2.0, 2.0, 0.0]], "float32")
    np.testing.assert_allclose(unitwise_norm(dense).numpy(),
                               [[np.sqrt(5.0), np.sqrt(8.0), 0.0]])
    np.testing.assert_allclose(unitwise_norm(np.array([-2.0, 0.5], "float32")).numpy(),
                               [2.0, 0.5])
    np.testing.assert_allclose(unitwise_norm(np.float32(-3.0)).numpy(), 3.0)


def _cases():
    # conv kernel [1, 1, 2, 2]: unit norms ||W|| = (5, 1) -> thresholds (0.05, 0.01)
    w_conv = np.array([3.0, 0.0, 4.0, 1.0], "float32").reshape(1, 1, 2, 2)
    # unit 0 grad (0.015, 0.02): norm 0.025 < 0.05 -> unchanged
    # unit 1 grad (0.3, 0.4): norm 0.5 > 0.01 -> scaled to norm 0.01: (0.006, 0.008)
    g_conv = np.array([0.015, 0.3, 0.02, 0.4], "float32").reshape(1, 1, 2, 2)
    want_conv = np.array([0.015, 0.006, 0.02, 0.008], "float32").reshape(1, 1, 2, 2)
    # dense [2, 3]: ||W|| per column = (1, 10, 0) -> thresholds (0.01, 0.1, 1e-5)
    w_dense = np.array([[1.0, 6.0, 0.0], [0.0, 8.0, 0.0]], "float32")
    # col 0 norm 0.005 (under), col 1 norm 1.0 -> x0.1, col 2 norm 5 -> eps floor:
    # 0.01 * 1e-3 = 1e-5, so (3, 4) * 1e-5 / 5
    g_dense = np.array([[0.003, 0.6, 3.0], [0.004, 0.8, 4.0]], "float32")
    want_dense = np.array([[0.003, 0.06, 6e-6], [0.004, 0.08, 8e-6]], "float32")
    # bias: every element its own unit; thresholds (0.02, 1e-5 (floor), 0.005)
    w_bias = np.array([2.0, 0.0, -0.5], "float32")
    g_bias = np.array([-1.0, 0.0, 0.001], "float32")
    want_bias = np.array([-0.02, 0.0, 0.001], "float32")
    return [(w_conv, g_conv, want_conv), (w_dense, g_dense, want_dense),
            (w_bias, g_bias, want_bias)]


def test_hand_computed_values():
    cases = _cases()
    variables = [tf.Variable(w) for w, _, _ in cases]
    grads = [tf.constant(g) for _, g, _ in cases]
    out = adaptive_clip_gradients(grads, variables, clip=0.01, eps=1e-3)
    for got, (_, g, want) in zip(out, cases):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)
    # Under the threshold the gradient is returned bit for bit.
    np.testing.assert_array_equal(out[0].numpy()[..., 0], cases[0][1][..., 0])
    np.testing.assert_array_equal(out[1].numpy()[:, 0], cases[1][1][:, 0])
    # Clipped units have exactly clip * max(||W||, eps) norm.
    np.testing.assert_allclose(np.linalg.norm(out[1].numpy(), axis=0)[1:], [0.1, 1e-5],
                               rtol=1e-5)


def test_none_and_excluded_pass_through():
    cases = _cases()
    variables = [tf.Variable(w) for w, _, _ in cases]
    grads = [tf.constant(g) for _, g, _ in cases]
    grads[2] = None
    excluded = variables[1]
    out = adaptive_clip_gradients(grads, variables,
                                  exclude=lambda v: v is excluded)
    assert out[2] is None
    assert out[1] is grads[1]
    np.testing.assert_allclose(out[0].numpy(), cases[0][2], rtol=1e-5)
    with pytest.raises(ValueError):
        adaptive_clip_gradients(grads, variables[:2])


def test_classifier_is_excluded_in_a_model():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="predictions")(h))
    excluded = is_classifier_variable(model)
    flags = [excluded(v) for v in model.trainable_variables]
    assert flags == [False, False, True, True]
    huge = [tf.ones_like(v) * 100.0 for v in model.trainable_variables]
    out = adaptive_clip_gradients(huge, model.trainable_variables, exclude=excluded)
    for o, g, flag in zip(out, huge, flags):
        if flag:
            assert o is g
        else:
            assert np.all(np.abs(o.numpy()) < 1.0)


def test_works_under_jit_compile():
    cases = _cases()
    variables = [tf.Variable(w) for w, _, _ in cases]

    @tf.function(jit_compile=True)
    def clip(*grads):
        return adaptive_clip_gradients(list(grads), variables, clip=0.01, eps=1e-3)

    out = clip(*[tf.constant(g) for _, g, _ in cases])
    for got, (_, _, want) in zip(out, cases):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)


def test_float16_gradients_keep_their_dtype():
    w = tf.Variable(np.array([[1.0], [0.0]], "float32"))
    g = tf.constant([[1.0], [0.0]], tf.float16)
    out = adaptive_clip_gradients([g], [w])[0]
    assert out.dtype == tf.float16
    np.testing.assert_allclose(out.numpy().astype("float32"), [[0.01], [0.0]], rtol=1e-3)
