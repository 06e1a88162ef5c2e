"""EfficientNet builder: architecture, parameter counts, normalisers, serialisation."""

import math

import keras
import numpy as np
import pytest

import efficientnet_advprop
from efficientnet_advprop.layers import (AUX, MAIN, InputNormalization, SplitBatchNorm,
                                         StochasticDepth, bn_route)
from efficientnet_advprop.models import (build_model, default_image_size,
                                         make_normalizer, model_names)
from efficientnet_advprop.models.efficientnet import (BlockArgs, block_specs,
                                                      count_efficientnet_params,
                                                      decode_block_string, efficientnet,
                                                      round_filters, round_repeats)
from efficientnet_advprop.models.normalization import NORMALIZERS

from conftest import assert_keras_round_trip

# Trainable parameters with 1000 classes and plain batch norm (official / Keras apps).
EXPECTED_PARAMS = {
    "efficientnet-b0": 5_288_548,
    "efficientnet-b1": 7_794_184,
    "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232,
    "efficientnet-b4": 19_341_616,
    "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704,
    "efficientnet-b7": 66_347_960,
    "efficientnet-b8": 87_413_142,
    "efficientnet-l2": 480_309_308,
}

TINY = dict(width_coefficient=0.25, depth_coefficient=0.25, image_size=32)


def _count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def _conv_dense_kernels(model):
    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    out = {}
    for layer in model.layers:
        if isinstance(layer, kinds):
            out[layer.name] = tuple(layer.kernel.shape)
    return out


@pytest.fixture(scope="module")
def b0():
    return build_model("efficientnet-b0", image_size=64)


# ------------------------------------------------------------------ pure functions

def test_decode_block_string():
    assert decode_block_string("r2_k3_s22_e6_i16_o24_se0.25") == BlockArgs(
        kernel_size=3, num_repeat=2, input_filters=16, output_filters=24, expand_ratio=6,
        se_ratio=0.25, strides=(2, 2), id_skip=True)
    args = decode_block_string("r1_k5_s11_e1_i32_o16_noskip")
    assert args.se_ratio is None and args.id_skip is False and args.strides == (1, 1)
    with pytest.raises(ValueError):
        decode_block_string("r1_k3_s2_e1_i32_o16")


def test_round_filters_and_repeats():
    assert round_filters(32, 1.0) == 32
    assert round_filters(32, 1.1) == 32    # 35.2 -> 32 (>= 0.9 * 35.2)
    assert round_filters(1280, 1.1) == 1408
    assert round_filters(16, 0.25) == 8    # never below the divisor
    assert round_filters(40, 1.4) == 56
    assert round_filters(112, 4.3) == 480  # 481.6 -> 480
    assert round_filters(24, 0.6) == 16    # 14.4 -> 16
    assert round_filters(36, 0.5) == 24    # 18 -> 16 < 0.9 * 18 -> + 8
    assert round_filters(32, None) == 32
    assert round_repeats(3, 1.1) == 4 and round_repeats(4, 1.0) == 4
    assert round_repeats(1, 3.1) == 4 and round_repeats(4, 5.3) == 22


@pytest.mark.parametrize("model_name", sorted(EXPECTED_PARAMS))
def test_analytic_param_counts(model_name):
    assert count_efficientnet_params(model_name) == EXPECTED_PARAMS[model_name]


def test_analytic_count_aux_adds_only_bn_params():
    plain = count_efficientnet_params("efficientnet-b0")
    one = count_efficientnet_params("efficientnet-b0", num_aux=1)
    two = count_efficientnet_params("efficientnet-b0", num_aux=2)
    assert 0 < one - plain == two - one
    assert count_efficientnet_params("efficientnet-b0", num_classes=10) == (
        plain - 1280 * 990 - 990)


def test_survival_probabilities_follow_official_formula():
    specs = block_specs("efficientnet-b0")
    assert len(specs) == 16
    probs = [s.survival_prob for s in specs]
    assert probs[0] == 1.0
    assert probs[-1] == pytest.approx(1 - 0.2 * 15 / 16)
    for i, p in enumerate(probs):
        assert p == pytest.approx(1 - 0.2 * i / 16)
    assert all(s.survival_prob is None for s in block_specs("b0", survival_prob=None))
    assert [s.name for s in specs[:4]] == ["block1a", "block2a", "block2b", "block3a"]


# ------------------------------------------------------------------ built models

def test_built_b0_params_and_layer_names(b0):
    assert _count(b0.trainable_weights) == EXPECTED_PARAMS["efficientnet-b0"]
    names = {layer.name for layer in b0.layers}
    for name in ("input_normalization", "stem_conv", "stem_bn", "block1a_dwconv",
                 "block1a_se_reduce", "block2a_expand_conv", "block2b_drop", "block2b_add",
                 "top_conv", "top_bn", "avg_pool", "top_dropout", "predictions"):
        assert name in names, name
    assert "block1a_expand_conv" not in names  # expand_ratio 1: no expansion
    assert "block1a_add" not in names and "block2a_add" not in names
    dwconvs = [n for n in names if n.startswith("block") and n.endswith("_dwconv")]
    assert len(dwconvs) == 16
    assert b0.input_shape == (None, 64, 64, 3) and b0.output_shape == (None, 1000)
    assert isinstance(b0.get_layer("stem_bn"), SplitBatchNorm)
    assert b0.get_layer("top_dropout").rate == 0.2
    assert b0.get_layer("input_normalization").mode == "imagenet"
    # No biases except the SE convolutions and the classifier.
    for layer in b0.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            assert layer.use_bias == ("_se_" in layer.name), layer.name


def test_built_b0_drop_connect_layers_match_formula(b0):
    expected = {s.name + "_drop": s.survival_prob for s in block_specs("efficientnet-b0")
                if s.has_skip}
    found = {layer.name: layer.survival_prob for layer in b0.layers
             if isinstance(layer, StochasticDepth)}
    assert found.keys() == expected.keys() and len(found) == 9
    for name, prob in expected.items():
        assert found[name] == pytest.approx(prob)
    # b0's last residual block is block6d, the 15th block (index 14) of 16.
    assert found["block6d_drop"] == pytest.approx(1 - 0.2 * 14 / 16)
    assert found["block2b_drop"] == pytest.approx(1 - 0.2 * 2 / 16)


def test_built_b0_initializers(b0):
    top = np.asarray(b0.get_layer("top_conv").kernel)       # 1x1, fan_out 1280
    assert np.std(top) == pytest.approx(math.sqrt(2.0 / 1280), rel=0.02)
    dw = np.asarray(b0.get_layer("block6a_dwconv").kernel)  # 5x5, mult 1
    assert np.std(dw) == pytest.approx(math.sqrt(2.0 / 25), rel=0.05)
    dense = b0.get_layer("predictions")
    limit = 1 / math.sqrt(1000)
    kernel = np.asarray(dense.kernel)
    assert kernel.min() >= -limit and kernel.max() <= limit and kernel.max() > 0.9 * limit
    assert not np.any(np.asarray(dense.bias))


def test_b0_matches_keras_applications(b0):
    reference = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3))
    ours, theirs = _conv_dense_kernels(b0), _conv_dense_kernels(reference)
    assert set(ours) == set(theirs)
    assert ours == theirs
    assert _count(reference.trainable_weights) == _count(b0.trainable_weights)


def test_built_b1_params():
    model = efficientnet("efficientnet-b1", image_size=64)
    assert _count(model.trainable_weights) == EXPECTED_PARAMS["efficientnet-b1"]
    assert _count(model.trainable_weights) == count_efficientnet_params("efficientnet-b1")
    assert model.input_shape == (None, 64, 64, 3)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", [f"efficientnet-b{i}" for i in range(2, 9)])
def test_built_big_params(model_name):
    model = build_model(model_name, image_size=64)
    assert _count(model.trainable_weights) == EXPECTED_PARAMS[model_name]
    assert _count(model.trainable_weights) == count_efficientnet_params(model_name)
    keras.backend.clear_session()


def test_split_batch_norm_adds_only_bn_parameters(b0):
    aux = build_model("efficientnet-b0", image_size=64, normalizer="split_batch_norm",
                      num_aux=1)
    bn_channels = sum(layer.gamma.shape[0] for layer in b0.layers
                      if isinstance(layer, SplitBatchNorm))
    extra = _count(aux.trainable_weights) - _count(b0.trainable_weights)
    assert extra == 2 * bn_channels
    assert _count(aux.trainable_weights) == count_efficientnet_params(
        "efficientnet-b0", num_aux=1)
    assert _count(b0.non_trainable_weights) == 2 * bn_channels
    assert _count(aux.non_trainable_weights) == 4 * bn_channels
    assert isinstance(aux.get_layer("block3b_project_bn"), SplitBatchNorm)
    assert aux.get_layer("block3b_project_bn").num_aux == 1


@pytest.mark.parametrize("kind", NORMALIZERS)
def test_tiny_forward_every_normalizer(kind):
    num_aux = 2 if kind == "split_batch_norm" else 0
    model = build_model("efficientnet-b0", 10, normalizer=kind, num_aux=num_aux, **TINY)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    for training in (False, True):
        y = np.asarray(model(x, training=training))
        assert y.shape == (4, 10) and np.all(np.isfinite(y))
    if kind == "split_batch_norm":
        with bn_route([0, 1, 2], sizes=[2, 1, 1]):
            y = np.asarray(model(x, training=True))
        assert y.shape == (4, 10) and np.all(np.isfinite(y))


def test_tiny_model_structure():
    model = efficientnet("b0", num_classes=10, **TINY)
    specs = block_specs("b0", 0.25, 0.25)
    assert len(specs) == 7
    assert model.get_layer("stem_conv").filters == 8
    assert model.get_layer("top_conv").filters == round_filters(1280, 0.25) == 320
    # 8 -> 8 filters in block1a: a skip connection with survival probability 1.
    assert model.get_layer("block1a_drop").survival_prob == 1.0
    assert model.output_shape == (None, 10)


def test_include_top_false_and_options():
    model = efficientnet("efficientnet-b0", include_top=False, dropout_rate=0.0,
                         survival_prob=None, preprocessing="advprop", name="features",
                         **TINY)
    assert model.name == "features"
    assert model.output_shape == (None, 1, 1, 320)
    names = {layer.name for layer in model.layers}
    assert "predictions" not in names and "avg_pool" not in names
    assert not any(isinstance(layer, StochasticDepth) for layer in model.layers)
    assert model.get_layer("input_normalization").mode == "advprop"
    no_dropout = efficientnet("efficientnet-b0", num_classes=3, dropout_rate=0.0, **TINY)
    assert "top_dropout" not in {layer.name for layer in no_dropout.layers}


def test_keras_save_load_round_trip_with_aux_bn(tmp_path):
    model = build_model("efficientnet-b0", 10, normalizer="split_batch_norm", num_aux=1,
                        preprocessing="advprop", **TINY)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    # Move main and auxiliary moving statistics away from their initial values.
    model(x, training=True)
    with bn_route(AUX):
        model(x[::-1] * 0.5, training=True)
    loaded = assert_keras_round_trip(model, x, str(tmp_path / "tiny.keras"),
                                     routes=(MAIN, AUX))
    assert isinstance(loaded.get_layer("input_normalization"), InputNormalization)
    assert loaded.get_layer("input_normalization").mode == "advprop"
    assert loaded.get_layer("stem_bn").num_aux == 1
    assert isinstance(loaded.get_layer("block1a_drop"), StochasticDepth)


# ------------------------------------------------------------------ registry

def test_registry():
    names = model_names()
    assert names[:9] == [f"efficientnet-b{i}" for i in range(9)]
    assert "efficientnet-l2" in names
    assert default_image_size("efficientnet-b3") == 300
    assert default_image_size("efficientnet-l2") == 800
    with pytest.raises(ValueError, match="unknown model name 'resnet-7'; choose from"):
        build_model("resnet-7")
    with pytest.raises(ValueError, match="unknown model name"):
        default_image_size("b0")
    with pytest.raises(ValueError, match="either"):
        build_model("efficientnet-b0", norm=make_normalizer(), num_aux=1)
    assert efficientnet_advprop.build_model is build_model
    assert efficientnet_advprop.__version__ == "0.1.0"


def test_registry_passes_batch_norm_settings():
    model = build_model("efficientnet-b0", 10, normalizer="keras_batch_norm",
                        batch_norm_momentum=0.9, batch_norm_epsilon=1e-5, **TINY)
    bn = model.get_layer("block2a_bn")
    assert isinstance(bn, keras.layers.BatchNormalization)
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
    default = build_model("efficientnet-b0", 10, **TINY).get_layer("top_bn")
    assert default.momentum == 0.99 and default.epsilon == 1e-3 and default.num_aux == 0


def test_classifier_init_zeros_starts_every_logit_at_zero_and_official_is_the_builders():
    import numpy as np

    images = np.random.RandomState(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    official = build_model("efficientnet-b0", 10, image_size=32)
    kernel = official.get_layer("predictions").kernel.numpy()
    assert 0.2 < np.abs(kernel).max() <= 1 / np.sqrt(10)  # uniform +-1/sqrt(classes)
    # Scaled for 1,000 classes: at 10 the training-mode logits start far from 0.
    assert float(np.std(official(images, training=True))) > 1.5
    zeros = build_model("efficientnet-b0", 10, image_size=32, classifier_init="zeros")
    head = zeros.get_layer("predictions")
    assert not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    assert not np.any(zeros(images, training=True).numpy())
    with pytest.raises(ValueError, match="classifier_init='small'"):
        build_model("resnet-18-cifar", 10, width_multiplier=0.125, classifier_init="small")
