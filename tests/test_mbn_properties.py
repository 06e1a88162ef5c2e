"""MBN inference modes, model-property metrics and BN statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.evaluation import (bn_statistics, boundary_thickness,
                                             decision_margin, kl_smoothness, mbn_logits_fn)
from efficientnet_advprop.layers.bn_statistics import summarize_bn_statistics
from efficientnet_advprop.evaluation.mbn import random_layer_subset, split_bn_layers
from efficientnet_advprop.layers import AUX, MAIN, SplitBatchNorm, bn_route


def _mbn_model(seed=0):
    """conv-SBN-relu x2 -> dense, with main and auxiliary sets made different."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for i in range(2):
        h = keras.layers.Conv2D(6, 3, padding="same", name=f"conv{i}")(h)
        h = SplitBatchNorm(num_aux=1, name=f"bn{i}")(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    rng = np.random.default_rng(seed)
    for layer in split_bn_layers(model):
        for index in (MAIN, AUX):
            for var in (layer.gammas[index], layer.betas[index], layer.moving_means[index]):
                var.assign(rng.normal(size=var.shape).astype("float32"))
            layer.moving_variances[index].assign(
                rng.uniform(0.5, 2.0, size=var.shape).astype("float32"))
    return model


def _images(n=6, seed=1):
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 3)), tf.float32)


def _through(model, bn_set, x):
    with bn_route(bn_set):
        return model(x, training=False).numpy()


def test_layer_mixing_endpoints_and_a_single_layer_midpoint():
    model, x = _mbn_model(), _images()
    main, aux = _through(model, MAIN, x), _through(model, AUX, x)
    assert not np.allclose(main, aux)
    np.testing.assert_allclose(mbn_logits_fn(model, "layers", 0.0)(x), main, atol=1e-5)
    np.testing.assert_allclose(mbn_logits_fn(model, "layers", 1.0)(x), aux, atol=1e-5)
    # One layer on its own: the route's output is the convex combination of the sets.
    layer = split_bn_layers(model)[0]
    h = tf.constant(np.random.default_rng(2).normal(size=(3, 4, 4, 6)), tf.float32)
    outs = {}
    for name, route in (("main", bn_route(MAIN)), ("aux", bn_route(AUX)),
                        ("mix", bn_route(mix=(MAIN, AUX), mix_weight=0.3))):
        with route:
            outs[name] = layer(h, training=False).numpy()
    np.testing.assert_allclose(outs["mix"], 0.7 * outs["main"] + 0.3 * outs["aux"],
                               atol=1e-5)


def test_mixing_is_inference_only_and_checks_its_arguments():
    layer = split_bn_layers(_mbn_model())[0]
    with pytest.raises(ValueError, match="inference"):
        with bn_route(mix=(MAIN, AUX), mix_weight=0.5):
            layer(tf.zeros([2, 4, 4, 6]), training=True)
    with pytest.raises(ValueError, match="pair"):
        bn_route(mix=(MAIN,)).__enter__()
    with pytest.raises(ValueError, match="MBN mode"):
        mbn_logits_fn(_mbn_model(), "average")


def test_logits_interpolation_and_gamma_as_a_tensor_without_retrace():
    model, x = _mbn_model(), _images()
    main, aux = _through(model, MAIN, x), _through(model, AUX, x)
    traces = []

    @tf.function
    def logits(x, gamma):
        traces.append(1)
        return mbn_logits_fn(model, "logits", gamma)(x)

    for g in (0.0, 0.25, 1.0):
        np.testing.assert_allclose(logits(x, tf.constant(g)), (1 - g) * main + g * aux,
                                   atol=1e-4)
    assert len(traces) == 1


def test_random_layers_draws_a_seeded_subset_and_mixes_only_there():
    model, x = _mbn_model(), _images()
    names = [layer.name for layer in split_bn_layers(model)]
    assert random_layer_subset(model, 0.5, seed=3) == random_layer_subset(model, 0.5, seed=3)
    assert len(random_layer_subset(model, 0.5, seed=3)) == 1
    assert random_layer_subset(model, 1.0) == frozenset(names)
    assert random_layer_subset(model, 0.0) == frozenset()
    np.testing.assert_allclose(
        mbn_logits_fn(model, "random_layers", 1.0, layer_fraction=1.0)(x),
        _through(model, AUX, x), atol=1e-5)
    np.testing.assert_allclose(
        mbn_logits_fn(model, "random_layers", 1.0, layer_fraction=0.0)(x),
        _through(model, MAIN, x), atol=1e-5)
    half = mbn_logits_fn(model, "random_layers", 1.0, layer_fraction=0.5, seed=3)(x)
    assert not np.allclose(half, _through(model, MAIN, x))
    assert not np.allclose(half, _through(model, AUX, x))


def test_decision_margin_is_positive_exactly_when_correct():
    logits = tf.constant(np.random.default_rng(0).normal(size=(50, 5)) * 3, tf.float32)
    labels = tf.constant(np.random.default_rng(1).integers(0, 5, 50), tf.int32)
    margin = decision_margin(logits, labels).numpy()
    probs = tf.nn.softmax(logits).numpy()
    correct = probs.argmax(-1) == labels.numpy()
    np.testing.assert_array_equal(margin > 0, correct)
    best_other = np.where(np.eye(5)[labels.numpy()] > 0, -1, probs).max(-1)
    np.testing.assert_allclose(margin, probs[np.arange(50), labels.numpy()] - best_other,
                               atol=1e-6)


def test_boundary_thickness_on_a_linear_two_class_model():
    # logits (0, s * (x_0 - 100) / 255) along the first pixel; the segment from x_0 = 0
    # to x_0 = 200 crosses the band 0 < p_0 - p_1 < 0.75 on a computable stretch.
    scale = 20.0

    def logits_fn(x):
        t = tf.reshape(x, [tf.shape(x)[0], -1])[:, :1]
        return tf.concat([tf.zeros_like(t), scale * (t - 100.0) / 255.0], -1)

    x = tf.zeros([1, 2, 2, 1])
    end = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0]], [200.0])
    labels, targets = tf.constant([0]), tf.constant([1])
    got = boundary_thickness(logits_fn, x, end, labels, targets, num_points=2001).numpy()[0]
    # p_0 - p_1 = tanh(-z / 2) with z = scale (x_0 - 100) / 255: inside the band for
    # z in (-2 artanh(0.75), 0) -> x_0 in (100 - 255 * 2 artanh(0.75) / scale, 100).
    width = 255.0 * 2 * np.arctanh(0.75) / scale
    expected = (200.0 / 255.0) * (width / 200.0)
    assert got == pytest.approx(expected, rel=0.01)
    assert boundary_thickness(logits_fn, x, x, labels, targets).numpy()[0] == 0.0


def test_kl_smoothness_zero_on_identical_inputs_and_positive_otherwise(trained_linear_model,
                                                                       cifar_small):
    _, (x, _) = cifar_small
    x = tf.constant(x[:16], tf.float32)
    same = kl_smoothness(trained_linear_model, x, x).numpy()
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    moved = kl_smoothness(trained_linear_model, x, tf.clip_by_value(x + 8.0, 0, 255)).numpy()
    assert (moved >= -1e-6).all() and moved.mean() > 0


def test_bn_statistics_read_every_layer_of_each_set():
    model = _mbn_model()
    layer = split_bn_layers(model)[1]
    layer.moving_variances[AUX].assign(layer.moving_variances[MAIN] * 3.0)
    records = bn_statistics(model)
    assert [r["layer"] for r in records] == ["bn0", "bn1"]
    assert records[1]["aux_var"] == pytest.approx(3 * records[1]["main_var"], rel=1e-5)
    assert records[1]["aux_larger_var_fraction"] == 1.0
    assert records[0]["main_mean"] == pytest.approx(
        float(np.mean(split_bn_layers(model)[0].moving_means[MAIN].numpy())))
    summary = summarize_bn_statistics(records)
    assert summary["layers"] == 2 and summary["aux_larger_variance_layers"] >= 1
