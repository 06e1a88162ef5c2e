"""SplitBatchNorm: routing, statistics isolation, distribution, XLA, serialisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.layers import AUX, MAIN, SplitBatchNorm, bn_route
from efficientnet_advprop.layers.split_batch_norm import (is_auxiliary_variable,
                                                          official_sync_group_size,
                                                          sync_moving_statistics)
from efficientnet_advprop.seam._tensorflow import group_pick, group_scatter


def _data(n=8, c=3, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 4, 4, c)) * 2.0 + shift).astype("float32")


def _stats(layer):
    return [[v.numpy().copy() for v in (layer.moving_means[i], layer.moving_variances[i])]
            for i in range(layer.num_sets)]


def _built(num_aux=1, **kw):
    layer = SplitBatchNorm(num_aux=num_aux, momentum=0.9, **kw)
    layer.build((None, 4, 4, 3))
    return layer


def test_variables_named_and_counted():
    layer = _built(num_aux=2)
    names = sorted(v.path for v in layer.variables)
    assert len(layer.trainable_variables) == 6 and len(layer.non_trainable_variables) == 6
    assert sum(is_auxiliary_variable(v) for v in layer.variables) == 8
    assert not any(is_auxiliary_variable(v) for v in (layer.gamma, layer.beta,
                                                      layer.moving_mean,
                                                      layer.moving_variance))
    assert any(n.endswith("aux2_moving_variance") for n in names)


def test_main_traffic_leaves_auxiliary_statistics_untouched_and_reverse():
    layer = _built()
    before = _stats(layer)
    with bn_route(MAIN):
        layer(_data(shift=3.0), training=True)
    after_main = _stats(layer)
    assert not np.allclose(after_main[MAIN][0], before[MAIN][0])
    np.testing.assert_array_equal(after_main[AUX][0], before[AUX][0])
    np.testing.assert_array_equal(after_main[AUX][1], before[AUX][1])
    with bn_route(AUX):
        layer(_data(shift=-5.0), training=True)
    after_aux = _stats(layer)
    np.testing.assert_array_equal(after_aux[MAIN][0], after_main[MAIN][0])
    np.testing.assert_array_equal(after_aux[MAIN][1], after_main[MAIN][1])
    assert not np.allclose(after_aux[AUX][0], after_main[AUX][0])


def test_moving_statistics_follow_batch_moments():
    layer = _built()
    x = _data(shift=3.0)
    with bn_route(AUX):
        layer(x, training=True)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(layer.moving_means[AUX].numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variances[AUX].numpy(), 0.9 + 0.1 * var,
                               rtol=1e-5)


def test_update_stats_false_freezes_all_statistics():
    layer = _built()
    before = _stats(layer)
    for route in ([MAIN], [AUX], [MAIN, AUX]):
        with bn_route(route, update_stats=False):
            out = layer(_data(n=8, shift=2.0), training=True)
        # Batch statistics are still used: the output is normalised.
        assert abs(float(tf.reduce_mean(out))) < 1e-4
    after = _stats(layer)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b[0], a[0])
        np.testing.assert_array_equal(b[1], a[1])


def test_segment_routing_equals_separate_calls():
    gamma = keras.initializers.RandomUniform(0.5, 1.5, seed=1)
    joint, split = _built(gamma_initializer=gamma), _built(gamma_initializer=gamma)
    for target in (joint, split):  # distinct parameter sets per BN set
        target.gammas[AUX].assign(target.gammas[AUX] * 2.0)
        target.betas[AUX].assign(tf.fill([3], 0.5))
    clean, adv = _data(n=6, shift=1.0, seed=1), _data(n=4, shift=-3.0, seed=2)
    with bn_route([MAIN, AUX], sizes=[6, 4]):
        both = joint(np.concatenate([clean, adv]), training=True)
    with bn_route(MAIN):
        c = split(clean, training=True)
    with bn_route(AUX):
        a = split(adv, training=True)
    np.testing.assert_allclose(both.numpy(), np.concatenate([c, a]), atol=1e-5)
    for j, s in zip(_stats(joint), _stats(split)):
        np.testing.assert_allclose(j[0], s[0], atol=1e-6)
        np.testing.assert_allclose(j[1], s[1], atol=1e-6)


def test_inference_uses_main_by_default_and_moving_statistics():
    layer = _built()
    layer.moving_means[MAIN].assign([1.0, 2.0, 3.0])
    layer.moving_means[AUX].assign([-1.0, -2.0, -3.0])
    x = np.ones((2, 4, 4, 3), "float32")
    out_main = layer(x, training=False).numpy()
    expected = (1.0 - np.array([1.0, 2.0, 3.0])) / np.sqrt(1.0 + 1e-3)
    np.testing.assert_allclose(out_main[0, 0, 0], expected, rtol=1e-5)
    with bn_route(AUX):
        out_aux = layer(x, training=False).numpy()
    np.testing.assert_allclose(out_aux[0, 0, 0], (1.0 + np.array([1.0, 2.0, 3.0]))
                               / np.sqrt(1.0 + 1e-3), rtol=1e-5)


def test_unknown_set_is_a_clear_error():
    layer = _built(num_aux=1)
    with pytest.raises(ValueError, match="set 2"):
        with bn_route(2):
            layer(_data(), training=True)


def test_route_inside_tf_function_and_jit():
    layer = _built()

    @tf.function(jit_compile=True)
    def step(x):
        with bn_route([MAIN, AUX], sizes=[4, 4]):
            return layer(x, training=True)

    out = step(_data(n=8))
    assert out.shape == (8, 4, 4, 3)
    assert not np.allclose(layer.moving_means[AUX].numpy(), 0.0)


def _model(num_aux=1, synchronized=False, sync_group_size=None):
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = SplitBatchNorm(num_aux=num_aux, momentum=0.9, synchronized=synchronized,
                       sync_group_size=sync_group_size, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))


def test_per_replica_statistics_are_averaged_on_read(two_device_strategy):
    strategy = two_device_strategy
    with strategy.scope():
        model = _model()
    x = _data(n=8, seed=3)
    x[4:] += 10.0  # replica 1 sees very different data
    ds = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8))

    @tf.function
    def step(batch):
        def replica(b):
            with bn_route(AUX):
                model(b, training=True)
        strategy.run(replica, args=(batch,))

    step(next(iter(ds)))
    bn = model.get_layer("bn")
    per_replica = [v.numpy() for v in bn.moving_means[AUX].value._values]
    assert not np.allclose(per_replica[0], per_replica[1])
    np.testing.assert_allclose(bn.moving_means[AUX].numpy(),
                               (per_replica[0] + per_replica[1]) / 2, rtol=1e-5)
    sync_moving_statistics(model)
    synced = [v.numpy() for v in bn.moving_means[AUX].value._values]
    np.testing.assert_allclose(synced[0], synced[1])


def test_synchronized_statistics_match_single_device(two_device_strategy):
    strategy = two_device_strategy
    x = _data(n=8, seed=4)
    x[4:] += 5.0
    with strategy.scope():
        model = _model(synchronized=True)
    single = _model()
    single.set_weights(model.get_weights())

    dist_out = _run_on_replicas(strategy, model, x)
    with bn_route(MAIN):
        ref = single(x, training=True).numpy()
    np.testing.assert_allclose(dist_out, ref, atol=1e-4)
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(),
                               single.get_layer("bn").moving_mean.numpy(), atol=1e-5)


def _run_on_replicas(strategy, model, x):
    """Training-mode outputs of `model` on `x` split over the strategy's replicas."""
    @tf.function
    def step(batch):
        def replica(b):
            with bn_route(MAIN):
                return model(b, training=True)
        return strategy.run(replica, args=(batch,))

    ds = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(len(x)))
    return np.concatenate([t.numpy() for t in step(next(iter(ds))).values])


def test_sync_group_of_one_is_per_replica_and_of_two_is_global(two_device_strategy):
    strategy = two_device_strategy
    x = _data(n=8, seed=6)
    x[4:] = x[4:] * 3.0 + 5.0  # the replicas' halves have very different statistics
    with strategy.scope():
        per_group = {k: _model(synchronized=True, sync_group_size=k) for k in (1, 2)}
        synchronized = _model(synchronized=True)
    single = _model()
    for model in (*per_group.values(), synchronized):
        model.set_weights(single.get_weights())
    with bn_route(MAIN):
        halves = np.concatenate([single(x[:4], training=True).numpy(),
                                 single(x[4:], training=True).numpy()])
        whole = single(x, training=True).numpy()
    assert not np.allclose(halves, whole, atol=1e-2)  # the two references differ
    np.testing.assert_allclose(_run_on_replicas(strategy, per_group[1], x), halves,
                               atol=1e-4)
    two = _run_on_replicas(strategy, per_group[2], x)
    np.testing.assert_allclose(two, whole, atol=1e-4)
    np.testing.assert_allclose(two, _run_on_replicas(strategy, synchronized, x), atol=1e-5)


def test_group_scatter_and_pick_average_consecutive_replicas():
    # Four emulated replicas: the all-reduce is the sum of every replica's scatter.
    rng = np.random.default_rng(7)
    values = rng.normal(size=(4, 5)).astype("float32")
    for group_size in (1, 2, 4):
        groups = 4 // group_size
        summed = sum(group_scatter(tf.constant(values[r]), r, groups, group_size)
                     for r in range(4))
        for r in range(4):
            first = r // group_size * group_size
            np.testing.assert_allclose(group_pick(summed, r, group_size).numpy(),
                                       values[first:first + group_size].mean(axis=0),
                                       rtol=1e-6, atol=1e-6)


def test_official_tpu_group_size_rule():
    # utils.TpuBatchNormalization: no sync up to 8 replicas, then max(8, replicas // 8).
    assert [official_sync_group_size(n) for n in (1, 2, 8)] == [1, 1, 1]
    assert [official_sync_group_size(n) for n in (16, 32, 64)] == [8, 8, 8]
    assert [official_sync_group_size(n) for n in (128, 1024)] == [16, 128]


def test_sync_group_size_is_checked(two_device_strategy):
    with pytest.raises(ValueError, match="sync_group_size needs synchronized=True"):
        SplitBatchNorm(sync_group_size=2)
    with pytest.raises(ValueError, match="sync_group_size must be an integer >= 1"):
        SplitBatchNorm(synchronized=True, sync_group_size=0)
    with two_device_strategy.scope():
        model = _model(synchronized=True, sync_group_size=3)
    with pytest.raises(ValueError, match="sync_group_size=3 does not divide the 2 replicas"):
        _run_on_replicas(two_device_strategy, model, _data(n=8))


def test_keras_serialisation_round_trip(tmp_path):
    model = _model(num_aux=2, synchronized=True, sync_group_size=4)
    with bn_route(AUX):
        model(_data(shift=2.0), training=True)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    layer = loaded.get_layer("bn")
    assert isinstance(layer, SplitBatchNorm) and layer.num_aux == 2
    assert layer.synchronized and layer.sync_group_size == 4
    assert layer.get_config()["momentum"] == 0.9
    x = _data(seed=5)
    for route in (MAIN, AUX, 2):
        with bn_route(route):
            np.testing.assert_allclose(loaded(x, training=False).numpy(),
                                       model(x, training=False).numpy(), atol=1e-6)
