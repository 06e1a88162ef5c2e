"""Scaled WS conv, activation gammas and the normaliser-free ResNets."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.layers.nf_layers import Scale, ScaledActivation
from efficientnet_advprop.layers.stochastic_depth import StochasticDepth
from efficientnet_advprop.layers.weight_standardization import (
    GAMMA_TABLE, WS_EPSILON, WeightStandardizedConv2D, standardize_kernel)
from efficientnet_advprop.models.nf_resnet import (NOFROST_PRESET, block_betas,
                                                   count_nf_resnet_params,
                                                   default_image_size, model_names,
                                                   nf_resnet)

from conftest import assert_keras_round_trip

NF_RESNET_50_PARAMS = 25_557_032  # 1000 classes; kernels + bias + gain of every conv


def _np_standardize(kernel, gain=None):
    axes = tuple(range(kernel.ndim - 1))
    fan_in = np.prod(kernel.shape[:-1])
    mean = kernel.mean(axis=axes, keepdims=True)
    var = kernel.var(axis=axes, keepdims=True)
    w = (kernel - mean) / np.sqrt(np.maximum(var * fan_in, WS_EPSILON))
    return w if gain is None else w * gain


def _ws_layer(filters=6, kernel_size=3, **kwargs):
    kwargs.setdefault("kernel_initializer", keras.initializers.RandomUniform(-1.0, 2.0,
                                                                             seed=1))
    return WeightStandardizedConv2D(filters, kernel_size, **kwargs)


# --- weight standardisation --------------------------------------------------------

def test_standardized_kernel_statistics():
    layer = _ws_layer(6, 3)
    layer.build((None, 8, 8, 5))
    w = np.asarray(layer.standardized_kernel())
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    fan_in = 3 * 3 * 5
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)) * fan_in, 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.gain), 1.0)


def test_ws_conv_matches_manual_convolution():
    layer = _ws_layer(4, 3, padding="same", bias_initializer="ones")
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3)).astype("float32")
    y = np.asarray(layer(x))
    w = _np_standardize(np.asarray(layer.kernel))
    ref = tf.nn.conv2d(x, w.astype("float32"), 1, "SAME").numpy() + 1.0
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_gain_scales_output():
    layer = _ws_layer(4, 3, padding="same", bias_initializer="ones")
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype("float32")
    base = np.asarray(layer(x)) - 1.0
    gain = np.array([2.0, 0.5, -1.0, 0.0], "float32")
    layer.gain.assign(gain)
    np.testing.assert_allclose(np.asarray(layer(x)) - 1.0, base * gain, rtol=1e-5,
                               atol=1e-5)
    zero = _ws_layer(4, 3, gain_initializer="zeros", bias_initializer="ones")
    np.testing.assert_array_equal(np.asarray(zero(x)), 1.0)


def test_epsilon_floor():
    # A constant channel standardises to exactly 0; a tiny-variance one is divided by
    # sqrt(1e-4) (the floor), not blown up to unit variance.
    kernel = np.zeros((1, 1, 4, 2), "float32")
    kernel[..., 0] = 3.0
    kernel[..., 1] = [0.0, 1e-4, 0.0, 1e-4]
    w = np.asarray(standardize_kernel(kernel))
    np.testing.assert_array_equal(w[..., 0], 0.0)
    expected = (kernel[..., 1] - 5e-5) / math.sqrt(WS_EPSILON)
    np.testing.assert_allclose(w[..., 1], expected, rtol=1e-5)


def test_grouped_strided_valid_conv():
    layer = _ws_layer(6, 3, strides=2, padding="valid", groups=3, use_bias=False)
    x = np.random.default_rng(2).standard_normal((2, 9, 9, 6)).astype("float32")
    y = np.asarray(layer(x))
    kernel = np.asarray(layer.kernel)
    assert kernel.shape == (3, 3, 2, 6)
    w = _np_standardize(kernel).astype("float32")  # fan_in = 3 * 3 * 6 / 3
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)) * 18, 1.0, rtol=1e-5)
    parts = [tf.nn.conv2d(x[..., 2 * g:2 * g + 2], w[..., 2 * g:2 * g + 2], 2,
                          "VALID").numpy() for g in range(3)]
    np.testing.assert_allclose(y, np.concatenate(parts, axis=-1), rtol=1e-5, atol=1e-5)


def test_ws_conv_serialization_round_trip(tmp_path):
    layer = _ws_layer(4, 3, strides=2, padding="same", groups=1, epsilon=1e-3,
                      gain_initializer="zeros")
    config = layer.get_config()
    clone = WeightStandardizedConv2D.from_config(config)
    assert clone.epsilon == 1e-3 and clone.strides == (2, 2)
    assert isinstance(clone.gain_initializer, keras.initializers.Zeros)

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, _ws_layer(4, 3, padding="same", name="ws")(inputs))
    model.get_layer("ws").gain.assign([1.5, -2.0, 0.25, 3.0])
    path = str(tmp_path / "ws.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded.get_layer("ws").gain),
                               [1.5, -2.0, 0.25, 3.0])
    x = np.random.default_rng(3).standard_normal((1, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)


def test_ws_conv_mixed_precision_output_dtype():
    layer = _ws_layer(4, 3, dtype="mixed_float16")
    y = layer(np.ones((1, 5, 5, 3), "float32"))
    assert y.dtype == "float16"


# --- gammas ---------------------------------------------------------------------------

_REFERENCE_FUNCTIONS = {
    "identity": lambda z: z,
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
    "swish": lambda z: z / (1.0 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0))),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0.0))),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "softplus": lambda z: np.logaddexp(0.0, z),
}


def test_gamma_table_by_numerical_integration():
    assert set(GAMMA_TABLE) == set(_REFERENCE_FUNCTIONS)
    z = np.linspace(-12.0, 12.0, 240_001)
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    for name, f in _REFERENCE_FUNCTIONS.items():
        fz = f(z)
        mean = np.trapezoid(fz * pdf, z)
        var = np.trapezoid(fz * fz * pdf, z) - mean ** 2
        assert GAMMA_TABLE[name] == pytest.approx(1.0 / math.sqrt(var), rel=1e-3), name
    assert GAMMA_TABLE["relu"] == pytest.approx(math.sqrt(2.0 / (1.0 - 1.0 / math.pi)))
    # The NFNet code's Monte-Carlo ReLU constant agrees within 1e-3.
    assert GAMMA_TABLE["relu"] == pytest.approx(1.7139588594436646, rel=1e-3)


def test_scaled_activation_has_unit_variance():
    z = np.random.default_rng(4).standard_normal(400_000).astype("float32")
    for name in GAMMA_TABLE:
        y = np.asarray(ScaledActivation(name)(z), np.float64)
        assert y.var() == pytest.approx(1.0, abs=0.01), name
    # input_scale is applied before the activation.
    y = ScaledActivation("tanh", input_scale=0.5)(np.array([1.0], "float32"))
    np.testing.assert_allclose(np.asarray(y), GAMMA_TABLE["tanh"] * np.tanh(0.5),
                               rtol=1e-6)
    with pytest.raises(ValueError):
        ScaledActivation("mish")
    layer = ScaledActivation.from_config(ScaledActivation("gelu", 0.5).get_config())
    assert (layer.activation, layer.input_scale) == ("gelu", 0.5)
    assert Scale.from_config(Scale(0.2).get_config()).scale == 0.2


# --- NF-ResNet --------------------------------------------------------------------

@pytest.fixture(scope="module")
def nf50():
    keras.utils.set_random_seed(0)
    return nf_resnet("nf-resnet-50", image_size=64, preprocessing="none")


def _block_names(model):
    return [l.name[:-len("out")] for l in model.layers if l.name.endswith("_out")]


def test_parameter_count_and_no_normalisation(nf50):
    assert nf50.count_params() == NF_RESNET_50_PARAMS
    assert count_nf_resnet_params("nf-resnet-50") == NF_RESNET_50_PARAMS
    assert nf50.output.shape == (None, 1000)
    assert len(_block_names(nf50)) == 16
    for layer in nf50.layers:
        kind = type(layer).__name__.lower()
        assert "norm" not in kind or kind == "inputnormalization", layer.name
        assert not isinstance(layer, (keras.layers.BatchNormalization,
                                      keras.layers.GroupNormalization,
                                      keras.layers.LayerNormalization))
        if isinstance(layer, keras.layers.Conv2D):
            assert isinstance(layer, WeightStandardizedConv2D), layer.name


def test_parameter_count_helper_matches_built_models():
    for name in ("nf-resnet-26", "nf-resnet-26-cifar"):
        model = nf_resnet(name, num_classes=10, image_size=32)
        assert model.count_params() == count_nf_resnet_params(name, 10), name


def test_block_betas():
    betas = block_betas("nf-resnet-26", alpha=0.2)
    expected_vars = [1.0, 1.04, 1.08, 1.04, 1.08, 1.04, 1.08, 1.04]
    assert [(s, b) for s, b, _ in betas] == [(s, b) for s in range(1, 5) for b in (1, 2)]
    np.testing.assert_allclose([beta for _, _, beta in betas],
                               1.0 / np.sqrt(expected_vars))
    beta_50 = dict(((s, b), beta) for s, b, beta in block_betas("nf-resnet-50"))
    assert beta_50[(2, 1)] == pytest.approx(1.0 / math.sqrt(1.12))
    assert beta_50[(3, 6)] == pytest.approx(1.0 / math.sqrt(1.2))


def test_zero_init_blocks_are_identity(nf50):
    names = _block_names(nf50)
    outputs = []
    for p in names:
        out = nf50.get_layer(p + "out")
        outputs += [out.output, out.input[1], nf50.get_layer(p + "conv3").output]
    probe = keras.Model(nf50.input, outputs)
    x = np.random.default_rng(5).standard_normal((2, 64, 64, 3)).astype("float32")
    values = probe(x)
    for i, p in enumerate(names):
        out, shortcut, branch = (np.asarray(v) for v in values[3 * i:3 * i + 3])
        np.testing.assert_array_equal(branch, 0.0, err_msg=p)
        np.testing.assert_array_equal(out, shortcut, err_msg=p)
        assert np.abs(out).max() > 0, p


def _channel_var(y):
    return float(np.asarray(y).var(axis=(0, 1, 2)).mean())


def test_transition_shortcut_follows_the_reference_by_default(nf50):
    """avg-pool -> 1x1 WS conv, as timm's DownsampleAvg and the NoFrost code: no x 2."""
    names = {layer.name for layer in nf50.layers}
    assert "stage2_block1_shortcut_pool" in names
    assert not any(n.endswith("shortcut_pool_gain") for n in names)
    conv = nf50.get_layer("stage2_block1_shortcut_conv")
    assert conv.input is nf50.get_layer("stage2_block1_shortcut_pool").output
    gained = nf_resnet("nf-resnet-26", image_size=32, include_top=False,
                       compensate_avgpool_var=True)
    gains = [l for l in gained.layers if l.name.endswith("shortcut_pool_gain")]
    assert [l.name for l in gains] == [f"stage{s}_block1_shortcut_pool_gain"
                                       for s in (2, 3, 4)]
    assert all(isinstance(l, Scale) and l.scale == 2.0 for l in gains)
    assert gained.count_params() == nf_resnet("nf-resnet-26", image_size=32,
                                              include_top=False).count_params()


def test_compensated_pool_keeps_white_noise_at_unit_variance():
    """Unit-variance white-noise input (after preprocessing), weights at init: with
    compensate_avgpool_var=True every block output of every stage keeps a variance
    near 1 (the x 2 undoes the 2x2 mean's 1/4 variance on uncorrelated values; real
    images are correlated: see test_pool_gain_signal_statistics and
    results/signal_propagation)."""
    keras.utils.set_random_seed(0)
    model = nf_resnet("nf-resnet-26", image_size=64, preprocessing="none",
                      include_top=False, compensate_avgpool_var=True, stem_gain=False)
    names = _block_names(model)
    probe = keras.Model(model.input, [model.get_layer(p + "out").output for p in names])
    x = np.random.default_rng(6).standard_normal((8, 64, 64, 3)).astype("float32")
    var = dict(zip(names, (_channel_var(y) for y in probe(x))))
    for name, v in var.items():
        assert 0.5 <= v <= 2.0, (name, v)


def test_reference_pool_quarters_white_noise_variance_at_each_stage_change():
    keras.utils.set_random_seed(0)
    model = nf_resnet("nf-resnet-26", image_size=64, preprocessing="none",
                      include_top=False)
    outs = [model.get_layer(f"stage{s}_block2_out").output for s in (1, 2, 3, 4)]
    x = np.random.default_rng(6).standard_normal((8, 64, 64, 3)).astype("float32")
    var = [_channel_var(y) for y in keras.Model(model.input, outs)(x)]
    for before, after in zip(var, var[1:]):
        assert 0.15 <= after / before <= 0.4, var


def test_signal_propagation_with_active_branches():
    """With every branch's gain set to 1, block b of a stage adds ~alpha^2 of variance.

    (Measured relative to the stage's first block, so the white-noise pooling loss of
    the transitions drops out; without timm's stem gain, so that the stem hands the
    first block unit variance.)
    """
    keras.utils.set_random_seed(1)
    model = nf_resnet("nf-resnet-26", image_size=32, preprocessing="none",
                      include_top=False, stem_gain=False)
    for layer in model.layers:
        if layer.name.endswith("conv3"):
            layer.gain.assign(np.ones(layer.filters, "float32"))
    names = _block_names(model)
    probe = keras.Model(model.input, [model.get_layer(p + "out").output for p in names])
    x = np.random.default_rng(7).standard_normal((16, 32, 32, 3)).astype("float32")
    var = dict(zip(names, (_channel_var(y) for y in probe(x))))
    assert 0.8 <= var["stage1_block1_"] <= 1.3
    for stage in range(1, 5):
        ratio = var[f"stage{stage}_block2_"] / var[f"stage{stage}_block1_"]
        assert 1.0 < ratio < 1.15, (stage, ratio)


def test_stem_output_is_scaled_by_the_activation_gain_as_timm_folds_it():
    """NoFrost's timm nf_resnet folds the ReLU gain into every scaled-WS conv, the
    stem's included: the stem's output is gamma times the WS conv's."""
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    outs = {}
    for gain in (True, False):
        keras.utils.set_random_seed(3)
        model = nf_resnet("nf-resnet-26-cifar", num_classes=10, stem_gain=gain)
        conv = model.get_layer("stem_conv")
        after = model.get_layer("stem_gain").output if gain else conv.output
        outs[gain] = (keras.Model(model.input, [conv.output, after])(x))
        if not gain:
            with pytest.raises(ValueError):
                model.get_layer("stem_gain")
    conv_out, scaled = (np.asarray(t) for t in outs[True])
    # the project's exact ReLU gain (timm's empirical 1.71396 is 6e-4 above it)
    np.testing.assert_allclose(scaled, GAMMA_TABLE["relu"] * conv_out, rtol=1e-6)
    np.testing.assert_allclose(outs[False][0], conv_out, rtol=1e-5, atol=1e-5)  # same conv


def test_fitted_stage_gains_start_every_stage_at_unit_variance():
    from efficientnet_advprop.models.signal import fit_stage_gains, gain_points

    rng = np.random.default_rng(4)
    # smooth, correlated "images": the case where stem and pooling lose variance
    base = rng.uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    images = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)
    gains = fit_stage_gains("nf-resnet-26-cifar", images, seed=2, width_multiplier=0.25)
    keras.utils.set_random_seed(2)
    model = nf_resnet("nf-resnet-26-cifar", include_top=False, width_multiplier=0.25,
                      stage_gains=gains)
    outs = keras.Model(model.input, [layer.output for layer in gain_points(model)])(images)
    for out in outs:
        assert _channel_var(out) == pytest.approx(1.0, rel=1e-3)
    default = nf_resnet("nf-resnet-26-cifar", include_top=False)  # the paper's model
    assert not any(layer.name.endswith("data_gain") for layer in default.layers)
    with pytest.raises(ValueError, match="5 positive numbers"):
        nf_resnet("nf-resnet-26-cifar", stage_gains=(1.0, 2.0))


def test_cifar_variant_and_drop_path_schedule():
    assert default_image_size("nf-resnet-26-cifar") == 32
    assert default_image_size("nf-resnet-101") == 224
    assert "nf-resnet-101-cifar" in model_names()
    model = nf_resnet("nf-resnet-26-cifar", num_classes=10, **NOFROST_PRESET)
    assert model.input.shape == (None, 32, 32, 3)
    assert model.get_layer("stem_conv").kernel.shape == (3, 3, 3, 64)
    assert model.get_layer("stage4_block2_out").output.shape == (None, 4, 4, 2048)
    with pytest.raises(ValueError):
        model.get_layer("stem_pool")
    assert model.get_layer("top_dropout").rate == 0.25
    drops = [l for l in model.layers if isinstance(l, StochasticDepth)]
    assert [l.name for l in drops][0] == "stage1_block2_drop"  # block 0 drops nothing
    np.testing.assert_allclose([1.0 - l.survival_prob for l in drops],
                               0.1 * np.arange(1, 8) / 7, rtol=1e-6)
    assert model.get_layer("predictions").dtype == "float32"


def test_builder_argument_checks():
    with pytest.raises(ValueError, match="norm"):
        nf_resnet("nf-resnet-26-cifar", norm=lambda name: None)
    with pytest.raises(ValueError):
        nf_resnet("nf-resnet-34")
    with pytest.raises(ValueError):
        nf_resnet("nf-resnet-26-cifar", activation="mish")
    model = nf_resnet("nf_resnet_26", image_size=32, small_stem=True, norm=None,
                      include_top=False)
    assert model.output.shape == (None, 4, 4, 2048)
    assert model.name == "nf-resnet-26"


def test_model_config_round_trip():
    model = nf_resnet("nf-resnet-26-cifar", num_classes=10, activation="silu",
                      drop_path_rate=0.1)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(8).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(model(x)), rtol=1e-5,
                               atol=1e-5)


def test_one_gradient_step_reduces_loss():
    keras.utils.set_random_seed(2)
    model = nf_resnet("nf-resnet-26-cifar", num_classes=10)
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # NoFrost's rate, 0.1 per 256 images, for this batch of 16.
    optimizer = keras.optimizers.SGD(0.1 * 16 / 256)

    def loss():
        return loss_fn(y, model(x, training=True))

    with tf.GradientTape() as tape:
        before = loss()
    grads = tape.gradient(before, model.trainable_variables)
    assert all(g is not None for g in grads)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    after = loss()
    assert float(after) < float(before)


def test_registry_builds_normalizer_free_models_and_refuses_normalizers():
    from efficientnet_advprop.models import build_model, is_normalizer_free

    assert is_normalizer_free("nf-resnet-50") and not is_normalizer_free("resnet-50")
    model = build_model("nf-resnet-26-cifar", 10, dropout_rate=0.25)
    assert model.get_layer("top_dropout").rate == 0.25
    with pytest.raises(ValueError, match="normalizer-free"):
        build_model("nf-resnet-26-cifar", 10, normalizer="split_batch_norm", num_aux=1)


def test_nf_resnet_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(3)
    model = nf_resnet("nf-resnet-26-cifar", num_classes=10)
    for layer in model.layers:  # non-trivial gains, so a lost gain would show
        if isinstance(layer, WeightStandardizedConv2D):
            layer.gain.assign(np.linspace(0.5, 1.5, layer.filters).astype("float32"))
    x = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert_keras_round_trip(model, x, str(tmp_path / "nf26.keras"))


def test_pool_gain_signal_statistics():
    """compare_pool_gain on random images at tiny width. At initialisation every block
    is the identity on its shortcut and, with ReLU (positively homogeneous) and zero
    biases, everything after a transition scales with it: the x 2 multiplies the
    variance and the squared mean of stage s by exactly 4 ** (s - 1)."""
    from efficientnet_advprop.models.signal import compare_pool_gain, signal_statistics

    images = np.random.default_rng(10).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    stats = compare_pool_gain("nf-resnet-26-cifar", images, width_multiplier=0.125,
                              seed=0, batch_size=4)
    off, on = stats["off"], stats["on"]
    assert [r["block"] for r in off] == [f"stage{s}_block{b}" for s in range(1, 5)
                                         for b in (1, 2)]
    for a, b in zip(off, on):
        for key in ("channel_sq_mean", "channel_var", "branch_var"):
            assert np.isfinite(a[key]) and np.isfinite(b[key]), (a, b)
        assert a["channel_var"] > 0 and a["branch_var"] == 0.0  # zero-init last gains
        scale = 4.0 ** (a["stage"] - 1)
        assert b["channel_var"] == pytest.approx(scale * a["channel_var"], rel=1e-3)
        assert b["channel_sq_mean"] == pytest.approx(scale * a["channel_sq_mean"],
                                                     rel=1e-3)
    active = compare_pool_gain("nf-resnet-26-cifar", images, width_multiplier=0.125,
                               seed=0, active_branches=True, batch_size=4)
    var = {key: {r["block"]: r["channel_var"] for r in rows}
           for key, rows in active.items()}
    assert var["on"]["stage1_block2"] == pytest.approx(var["off"]["stage1_block2"])
    assert var["on"]["stage2_block1"] > 1.5 * var["off"]["stage2_block1"]
    assert all(np.isfinite(v) and v > 0 for rows in var.values() for v in rows.values())
    assert all(r["branch_var"] > 0 for rows in active.values() for r in rows)
    # The accumulated moments are those of one pass over all images.
    model = nf_resnet("nf-resnet-26-cifar", include_top=False, width_multiplier=0.125)
    whole = keras.Model(model.input, model.get_layer("stage3_block2_out").output)(images)
    row = {r["block"]: r for r in signal_statistics(model, images, batch_size=4)}
    np.testing.assert_allclose(row["stage3_block2"]["channel_var"],
                               np.asarray(whole).var(axis=(0, 1, 2)).mean(), rtol=1e-4)
