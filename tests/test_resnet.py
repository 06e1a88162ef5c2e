"""ResNet builder (counts, geometry, normalisers, serialisation) and feature endpoints."""

import math
import sys

import keras
import numpy as np
import pytest

from efficientnet_advprop.export import strip_auxiliary_bn
from efficientnet_advprop.layers import (AUX, MAIN, InputNormalization, SplitBatchNorm,
                                         bn_route)
from efficientnet_advprop.models import (build_model, default_image_size,
                                         feature_endpoints, feature_model,
                                         make_normalizer, model_names)
from efficientnet_advprop.models.efficientnet import efficientnet
from efficientnet_advprop.models.normalization import NORMALIZERS
from efficientnet_advprop.models.resnet import (MAX_BLOCKS_PER_GROUP, RESNET_BLOCKS,
                                                RESNET_NAMES, block_specs,
                                                canonical_name, count_resnet_params,
                                                resnet, stage_groups)

from conftest import assert_keras_round_trip

# Trainable parameters with 1000 classes and plain batch norm. 18, 34, 50, 101, 152:
# torchvision's published counts. 200: torchvision's layout with [3, 24, 36, 3] (also
# timm's resnet200), as given by the analytic counter. 26, 338, 518, 638: the analytic
# counter with the block counts chosen in efficientnet_advprop/models/resnet.py.
EXPECTED_PARAMS = {
    "resnet-18": 11_689_512,
    "resnet-34": 21_797_672,
    "resnet-26": 15_995_176,
    "resnet-50": 25_557_032,
    "resnet-101": 44_549_160,
    "resnet-152": 60_192_808,
    "resnet-200": 64_673_832,
    "resnet-338": 116_064_296,
    "resnet-518": 183_095_336,
    "resnet-638": 227_782_696,
}

EXPECTED_BLOCKS = {
    "resnet-338": (3, 24, 82, 3),
    "resnet-518": (3, 24, 142, 3),
    "resnet-638": (3, 24, 182, 3),
}


def _trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _leaf_layers(model):
    return {layer.name: layer for layer in model._flatten_layers(include_self=False)
            if not isinstance(layer, keras.Model)}


@pytest.fixture
def default_recursion_limit():
    """Python's default limit, which importing IPython (Keras does, when installed)
    raises to 3000: deep models must build without that accident."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(
        np.float32)


@pytest.fixture(scope="module")
def r18():
    return build_model("resnet-18", image_size=64)


@pytest.fixture(scope="module")
def r50():
    return build_model("resnet-50")  # 224 px: symbolic only, never run


# ------------------------------------------------------------------ pure functions

@pytest.mark.parametrize("model_name", list(EXPECTED_PARAMS))
def test_analytic_param_counts(model_name):
    assert count_resnet_params(model_name) == EXPECTED_PARAMS[model_name]


def test_depth_formula_and_deep_block_counts():
    for model_name, params in RESNET_BLOCKS.items():
        depth = int(model_name.split("-")[1])
        per_block = 3 if params.block == "bottleneck" else 2
        assert per_block * sum(params.blocks) + 2 == depth == params.depth, model_name
    for model_name, blocks in EXPECTED_BLOCKS.items():
        assert RESNET_BLOCKS[model_name].blocks == blocks
        assert 3 * sum(blocks) + 2 == int(model_name.split("-")[1])
    assert [sum(EXPECTED_BLOCKS[n]) for n in EXPECTED_BLOCKS] == [112, 172, 212]
    assert RESNET_BLOCKS["resnet-200"].blocks == (3, 24, 36, 3)


def test_analytic_count_variants():
    base = count_resnet_params("resnet-50")
    # Auxiliary BN sets add 2 * channels per norm layer, nothing else.
    bn_channels = (64 + sum(2 * s.width + s.out_filters
                            + (s.out_filters if s.has_projection else 0)
                            for s in block_specs("resnet-50")))
    assert count_resnet_params("resnet-50", num_aux=1) == base + 2 * bn_channels
    assert count_resnet_params("resnet-50", num_classes=10) == base - 990 * 2049
    # Small stem: 3x3x3x64 instead of 7x7x3x64.
    assert count_resnet_params("resnet-50-cifar") == base - (49 - 9) * 3 * 64


def test_canonical_names_and_block_specs():
    assert canonical_name("ResNet50") == "resnet-50"
    assert canonical_name("resnet_101_cifar") == "resnet-101-cifar"
    for bad in ("resnet-7", "resnet", "efficientnet-b0", "resnet-50-foo"):
        with pytest.raises(ValueError, match="unknown ResNet"):
            canonical_name(bad)
    specs = block_specs("resnet-50")
    assert len(specs) == 16 and specs[-1].name == "stage4_block3"
    assert [s.stride for s in specs if s.stride > 1] == [2, 2, 2]
    assert [s.name for s in specs if s.has_projection] == [
        "stage1_block1", "stage2_block1", "stage3_block1", "stage4_block1"]
    # Basic blocks: stage 1 keeps 64 channels, so no projection there.
    assert [s.name for s in block_specs("resnet-18") if s.has_projection] == [
        "stage2_block1", "stage3_block1", "stage4_block1"]


# ------------------------------------------------------------------ built models

def test_built_param_counts_equal_analytic(r18, r50):
    assert _trainable(r18) == count_resnet_params("resnet-18") == 11_689_512
    assert _trainable(r50) == count_resnet_params("resnet-50") == 25_557_032
    aux = build_model("resnet-18-cifar", 10, normalizer="split_batch_norm", num_aux=1)
    assert _trainable(aux) == count_resnet_params("resnet-18-cifar", 10, num_aux=1)


def test_resnet50_geometry_and_layers(r50):
    def hw(name):
        return tuple(r50.get_layer(name).output.shape[1:])

    assert hw("stem_conv") == (112, 112, 64)
    assert hw("stem_pool") == (56, 56, 64)
    assert hw("stage1_block3_out") == (56, 56, 256)
    assert hw("stage2_block4_out") == (28, 28, 512)
    assert hw("stage3_block6_out") == (14, 14, 1024)
    assert hw("stage4_block3_out") == (7, 7, 2048)
    assert r50.output.shape[1:] == (1000,)
    assert r50.layers[1].name == "input_normalization"
    assert isinstance(r50.layers[1], InputNormalization)
    assert r50.layers[1].mode == "imagenet"
    # torchvision padding: explicit symmetric zero padding before strided windows.
    assert r50.get_layer("stem_conv_pad").padding == ((3, 3), (3, 3))
    assert r50.get_layer("stem_pool_pad").padding == ((1, 1), (1, 1))
    assert r50.get_layer("stage2_block1_conv2_pad").padding == ((1, 1), (1, 1))
    # v1.5: the stride sits on the 3x3 conv; the projection is a strided 1x1 conv.
    assert r50.get_layer("stage2_block1_conv1").strides == (1, 1)
    assert r50.get_layer("stage2_block1_conv2").strides == (2, 2)
    assert r50.get_layer("stage2_block1_shortcut_conv").strides == (2, 2)
    assert isinstance(r50.get_layer("stage1_block1_shortcut_bn"), SplitBatchNorm)
    assert "stage1_block2_shortcut_conv" not in {layer.name for layer in r50.layers}
    convs = [layer for layer in r50.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 53 and not any(c.use_bias for c in convs)
    bn = r50.get_layer("stage3_block2_bn2")
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5 and bn.num_aux == 0
    dense = r50.get_layer("predictions")
    assert dense.dtype_policy.compute_dtype == "float32" and dense.use_bias
    # Initialisers: he-normal fan_out convs, torchvision's uniform(1/sqrt(fan_in)) dense.
    kernel = np.asarray(r50.get_layer("stage4_block1_conv2").kernel)
    assert abs(kernel.std() / math.sqrt(2.0 / (9 * 512)) - 1) < 0.02
    limit = 1 / math.sqrt(2048)
    for w in (dense.kernel, dense.bias):
        w = np.asarray(w)
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit


def test_odd_resolution_matches_torchvision_arithmetic():
    # torchvision at 65 px: conv 7/2 p3 -> 33, pool 3/2 p1 -> 17, then 9, 5, 3.
    model = resnet("resnet-18", 10, image_size=65)
    sizes = [model.get_layer(n).output.shape[1] for n in
             ("stem_conv", "stem_pool", "stage1_block2_out", "stage2_block2_out",
              "stage3_block2_out", "stage4_block2_out")]
    assert sizes == [33, 17, 17, 9, 5, 3]


@pytest.mark.parametrize("kind", NORMALIZERS)
def test_forward_with_every_normalizer(kind):
    norm = make_normalizer(kind, momentum=0.9, epsilon=1e-5)
    model = resnet("resnet-18", num_classes=7, image_size=32, norm=norm,
                   zero_init_last_bn=True)
    x = _images(2, 32)
    for training in (True, False):
        out = np.asarray(model(x, training=training))
        assert out.shape == (2, 7) and out.dtype == np.float32
        assert np.all(np.isfinite(out))
    if kind != "none":
        gamma = model.get_layer("stage2_block1_bn2").gamma
        assert not np.any(np.asarray(gamma))


def test_cifar_small_stem():
    model = build_model("resnet-18-cifar", 10)
    assert model.input.shape[1:] == (32, 32, 3)
    names = {layer.name for layer in model.layers}
    assert "stem_pool" not in names
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
    assert model.get_layer("stem_conv").kernel.shape == (3, 3, 3, 64)
    assert model.get_layer("stem_conv").strides == (1, 1)
    assert model.get_layer("stage1_block2_out").output.shape[1:] == (32, 32, 64)
    assert model.get_layer("stage4_block2_out").output.shape[1:] == (4, 4, 512)
    out = np.asarray(model(_images(2, 32), training=False))
    assert out.shape == (2, 10) and np.all(np.isfinite(out))
    # small_stem overrides the name either way.
    big = resnet("resnet-18-cifar", 10, image_size=64, small_stem=False)
    assert "stem_pool" in {layer.name for layer in big.layers}
    assert resnet("resnet-18", 10, small_stem=True).input.shape[1] == 32


def test_zero_init_last_bn_blocks_start_as_relu_of_shortcut():
    model = resnet("resnet-26", 10, image_size=32, zero_init_last_bn=True)
    for layer in model.layers:
        if layer.name.endswith(("_bn3", "_bn1", "_bn2", "shortcut_bn", "stem_bn")):
            expected = 0.0 if layer.name.endswith("_bn3") else 1.0
            assert np.all(np.asarray(layer.gamma) == expected), layer.name
    names = ["stem_pool", "stage1_block1_out", "stage1_block2_out",
             "stage2_block1_shortcut_bn", "stage2_block1_out"]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    stem, s1b1, s1b2, shortcut, s2b1 = (np.asarray(t) for t in probe(_images(2, 32)))
    np.testing.assert_allclose(s1b2, np.maximum(s1b1, 0.0), atol=1e-6)  # identity
    np.testing.assert_allclose(s2b1, np.maximum(shortcut, 0.0), atol=1e-6)  # projection
    assert stem.shape[1:] == (8, 8, 64)
    default = resnet("resnet-26", 10, image_size=32)
    assert np.all(np.asarray(default.get_layer("stage1_block1_bn3").gamma) == 1.0)


def test_options_top_dropout_preprocessing():
    model = resnet("resnet-18", 5, image_size=32, dropout_rate=0.3, include_top=True,
                   preprocessing="advprop", name="r")
    assert model.name == "r" and model.get_layer("top_dropout").rate == 0.3
    assert model.get_layer("input_normalization").mode == "advprop"
    headless = resnet("resnet-18", 5, image_size=64, include_top=False)
    names = {layer.name for layer in headless.layers}
    assert not names & {"avg_pool", "top_dropout", "predictions"}
    assert headless.output.shape[1:] == (2, 2, 512)
    assert "top_dropout" not in {layer.name for layer in
                                 resnet("resnet-18", 5, image_size=32).layers}


def test_registry():
    names = model_names()
    for name in RESNET_NAMES:
        assert name in names
        assert default_image_size(name) == (32 if name.endswith("-cifar") else 224)
    model = build_model("resnet-50", 10, normalizer="split_batch_norm", num_aux=1,
                        image_size=64)
    bn = model.get_layer("stage1_block1_bn1")
    assert bn.num_aux == 1 and bn.momentum == 0.9 and bn.epsilon == 1e-5
    assert _trainable(model) == count_resnet_params("resnet-50", 10, num_aux=1)
    stock = build_model("resnet-18-cifar", 10, normalizer="keras_batch_norm",
                        batch_norm_momentum=0.99)
    assert isinstance(stock.get_layer("stem_bn"), keras.layers.BatchNormalization)
    assert stock.get_layer("stem_bn").momentum == 0.99


def test_keras_save_load_round_trip_with_aux_bn(tmp_path):
    model = build_model("resnet-18", 10, normalizer="split_batch_norm", num_aux=1,
                        image_size=32, zero_init_last_bn=True, preprocessing="advprop")
    x = _images(4, 32, seed=1)
    # Move main and auxiliary moving statistics away from their initial values.
    model(x, training=True)
    with bn_route(AUX):
        model(x[::-1] * 0.5, training=True)
    loaded = assert_keras_round_trip(model, x, str(tmp_path / "r18.keras"),
                                     routes=(MAIN, AUX))
    assert loaded.get_layer("stem_bn").num_aux == 1
    assert loaded.get_layer("input_normalization").mode == "advprop"


# ------------------------------------------------------------------ feature endpoints

def test_efficientnet_b0_reduction_endpoints():
    model = efficientnet("efficientnet-b0", 10, image_size=224)
    ends = feature_endpoints(model)
    assert list(ends) == ["stem", "reduction_1", "reduction_2", "reduction_3",
                          "reduction_4", "reduction_5", "top"]
    shapes = {k: tuple(v.shape[1:]) for k, v in ends.items()}
    assert shapes["stem"] == (112, 112, 32)
    assert [shapes[f"reduction_{i}"] for i in range(1, 6)] == [
        (112, 112, 16), (56, 56, 24), (28, 28, 40), (14, 14, 112), (7, 7, 320)]
    assert shapes["top"] == (7, 7, 1280)
    # The official reduction blocks of B0: 1a, 2b, 3b, 5c, 7a.
    assert ends["reduction_2"] is model.get_layer("block2b_add").output
    assert ends["reduction_4"] is model.get_layer("block5c_add").output
    assert ends["reduction_5"] is model.get_layer("block7a_project_bn").output


def test_efficientnet_tiny_feature_model_runs():
    model = efficientnet("efficientnet-b0", 10, image_size=64, width_coefficient=0.25,
                         depth_coefficient=0.25, include_top=False)
    features = feature_model(model)
    out = features(_images(2, 64), training=False)
    assert [tuple(out[f"reduction_{i}"].shape[1:3]) for i in range(1, 6)] == [
        (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_resnet_feature_endpoints(r18):
    ends = feature_endpoints(r18)
    assert list(ends) == ["stem", "stage1", "stage2", "stage3", "stage4"]
    features = feature_model(r18)
    assert features.get_layer("stem_conv") is r18.get_layer("stem_conv")  # shared
    x = _images(2, 64)
    out = features(x, training=False)
    sizes = {k: tuple(v.shape[1:]) for k, v in out.items()}
    assert sizes == {"stem": (16, 16, 64), "stage1": (16, 16, 64), "stage2": (8, 8, 128),
                     "stage3": (4, 4, 256), "stage4": (2, 2, 512)}
    # The endpoint feeds the classifier: pooling stage4 + the dense gives the logits.
    dense = r18.get_layer("predictions")
    logits = np.asarray(dense(np.asarray(out["stage4"]).mean(axis=(1, 2))))
    np.testing.assert_allclose(logits, np.asarray(r18(x, training=False)),
                               rtol=1e-4, atol=1e-4)
    small = feature_endpoints(build_model("resnet-18-cifar", 10))
    assert small["stem"].shape[1:] == (32, 32, 64)
    assert small["stage4"].shape[1:] == (4, 4, 512)


def test_feature_endpoints_rejects_other_models():
    inputs = keras.Input((8, 8, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="neither an EfficientNet nor a ResNet"):
        feature_endpoints(other)


# ------------------------------------------------------------------ nested stage groups

def test_stage_groups():
    # Up to ResNet-200 the default is a flat model.
    for model_name in ("resnet-18", "resnet-50", "resnet-200-cifar"):
        assert stage_groups(model_name) == []
    sizes = {name: [(g, len(specs)) for g, specs in stage_groups(name)]
             for name in EXPECTED_BLOCKS}
    assert sizes["resnet-338"] == [("stage1_group1", 3), ("stage2_group1", 24),
                                   ("stage3_group1", 28), ("stage3_group2", 27),
                                   ("stage3_group3", 27), ("stage4_group1", 3)]
    assert [n for g, n in sizes["resnet-518"] if g.startswith("stage3")] == [
        29, 29, 28, 28, 28]
    assert [n for g, n in sizes["resnet-638"] if g.startswith("stage3")] == [
        31, 31, 30, 30, 30, 30]
    for model_name in list(EXPECTED_BLOCKS) + ["resnet-50"]:
        groups = stage_groups(model_name, None if model_name in EXPECTED_BLOCKS else 4)
        # Every block exactly once, in order, never across a stage boundary.
        assert [s.name for _, specs in groups for s in specs] == [
            s.name for s in block_specs(model_name)]
        for group, specs in groups:
            assert len(specs) <= MAX_BLOCKS_PER_GROUP
            assert {f"stage{s.stage}" for s in specs} == {group.split("_")[0]}
    assert [len(s) for _, s in stage_groups("resnet-50", 4)] == [3, 4, 3, 3, 3]
    assert stage_groups("resnet-338", 0) == []
    with pytest.raises(ValueError, match="blocks_per_group"):
        stage_groups("resnet-50", -1)


def test_analytic_count_with_width_multiplier():
    model = resnet("resnet-26-cifar", 10, width_multiplier=0.25)
    assert _trainable(model) == count_resnet_params("resnet-26-cifar", 10,
                                                    width_multiplier=0.25)
    assert count_resnet_params("resnet-50", width_multiplier=1.0) == 25_557_032


def test_resnet338_builds_under_default_recursion_limit(default_recursion_limit):
    """A flat ResNet-338 graph needs ~1,150 Python frames to build; the nested stage
    groups keep every graph under ~330."""
    model = build_model("resnet-338", 10, image_size=32, width_multiplier=0.125)
    assert [layer.name for layer in model.layers if isinstance(layer, keras.Model)] == [
        g for g, _ in stage_groups("resnet-338")]
    assert _trainable(model) == count_resnet_params("resnet-338", 10,
                                                    width_multiplier=0.125)
    leaves = _leaf_layers(model)
    assert "stage3_block82_out" in leaves and "stage3_block83_out" not in leaves
    ends = feature_endpoints(model)
    assert {k: tuple(v.shape[1:]) for k, v in ends.items()} == {
        "stem": (8, 8, 8), "stage1": (8, 8, 32), "stage2": (4, 4, 64),
        "stage3": (2, 2, 128), "stage4": (1, 1, 256)}
    assert ends["stage4"] is model.get_layer("avg_pool").input
    assert model.output.shape[1:] == (10,)


def test_nested_groups_equal_the_flat_model(tmp_path):
    """The same network (weights copied by layer name) with blocks nested one per group:
    identical logits through both BN sets, the route reaches the nested layers, and
    feature endpoints, export stripping and .keras files work."""
    kwargs = dict(normalizer="split_batch_norm", num_aux=1, width_multiplier=0.25)
    flat = build_model("resnet-26-cifar", 10, **kwargs)
    nested = build_model("resnet-26-cifar", 10, blocks_per_group=1, **kwargs)
    groups = [f"stage{s}_group{g}" for s in range(1, 5) for g in (1, 2)]
    assert [layer.name for layer in nested.layers if isinstance(layer, keras.Model)] == (
        groups)
    flat_leaves, nested_leaves = _leaf_layers(flat), _leaf_layers(nested)
    # The same layers, plus each group's input.
    assert set(nested_leaves) - set(flat_leaves) == {g + "_input" for g in groups}
    assert set(flat_leaves) <= set(nested_leaves)
    assert _trainable(nested) == _trainable(flat)
    for name, layer in flat_leaves.items():
        nested_leaves[name].set_weights(layer.get_weights())
    x = _images(4, 32, seed=2)
    for route in (MAIN, AUX):
        with bn_route(route):
            np.testing.assert_allclose(np.asarray(nested(x, training=True)),
                                       np.asarray(flat(x, training=True)),
                                       rtol=1e-4, atol=1e-4)
    # The AUX call updated the auxiliary statistics of a layer inside a group only.
    bn = nested_leaves["stage3_block2_bn2"]
    assert not np.allclose(np.asarray(bn.moving_means[AUX]), 0.0)
    np.testing.assert_allclose(np.asarray(bn.moving_means[AUX]),
                               np.asarray(flat_leaves["stage3_block2_bn2"]
                                          .moving_means[AUX]), rtol=1e-4, atol=1e-5)

    ends, flat_ends = feature_model(nested)(x), feature_model(flat)(x)
    assert list(ends) == ["stem", "stage1", "stage2", "stage3", "stage4"]
    for key in ends:
        np.testing.assert_allclose(np.asarray(ends[key]), np.asarray(flat_ends[key]),
                                   rtol=1e-4, atol=1e-4)

    stripped = strip_auxiliary_bn(nested, bn_set=AUX)
    stripped_leaves = _leaf_layers(stripped)
    assert not any(isinstance(layer, SplitBatchNorm)
                   for layer in stripped_leaves.values())
    assert isinstance(stripped_leaves["stage2_block1_shortcut_bn"],
                      keras.layers.BatchNormalization)
    with bn_route(AUX):
        np.testing.assert_allclose(np.asarray(stripped(x, training=False)),
                                   np.asarray(nested(x, training=False)),
                                   rtol=1e-4, atol=1e-4)
    loaded = assert_keras_round_trip(nested, x, str(tmp_path / "nested.keras"),
                                     routes=(MAIN, AUX))
    assert _leaf_layers(loaded)["stage4_block2_bn3"].num_aux == 1


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(EXPECTED_BLOCKS))
def test_deep_resnets_full_width_counts(model_name, default_recursion_limit):
    for num_classes in (1000, 10):
        model = build_model(model_name, num_classes, image_size=32)
        assert _trainable(model) == count_resnet_params(model_name, num_classes)
        if num_classes == 1000:
            assert _trainable(model) == EXPECTED_PARAMS[model_name]
        del model
        keras.backend.clear_session()


def _forward_backward(model, x, y, unused_bn_set=None):
    """The loss; asserts a finite gradient for every variable except the BN variables
    of `unused_bn_set` (not on the route), which must get none."""
    import tensorflow as tf

    from efficientnet_advprop.layers.split_batch_norm import bn_sets_of_variables

    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables)
    sets = bn_sets_of_variables(model)
    for grad, var in zip(grads, model.trainable_variables):
        if unused_bn_set is not None and sets.get(id(var)) == unused_bn_set:
            assert grad is None, var.path
        else:
            assert grad is not None, var.path
            assert np.all(np.isfinite(np.asarray(grad))), var.path
    return np.asarray(loss)


@pytest.mark.slow
def test_resnet638_forward_backward_and_keras_file(tmp_path, default_recursion_limit):
    """Small width: a gradient for every variable, a .keras round trip through both BN
    sets (the file is rebuilt from the config under the default limit too)."""
    model = build_model("resnet-638", 10, image_size=32, width_multiplier=0.125,
                        normalizer="split_batch_norm", num_aux=1)
    x, y = _images(2, 32, seed=3), np.array([3, 7])
    with bn_route(AUX):  # the main BN sets, in every group, are off the route
        loss = _forward_backward(model, x, y, unused_bn_set=MAIN)
    assert loss.shape == (2,) and np.all(np.isfinite(loss))
    assert_keras_round_trip(model, x, str(tmp_path / "r638.keras"), routes=(MAIN, AUX))


@pytest.mark.slow
def test_resnet638_full_width_forward_backward(default_recursion_limit):
    """227.8M parameters (about 2.9 GB of memory with the gradients at 32 px)."""
    model = build_model("resnet-638", 10, image_size=32)
    loss = _forward_backward(model, _images(2, 32, seed=4), np.array([0, 9]))
    assert np.all(np.isfinite(loss))
