"""Weight import: keras.applications, official TF1 checkpoints, --init_checkpoint."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import build_model
from efficientnet_advprop.export import export_saved_model
from efficientnet_advprop.layers import SplitBatchNorm
from efficientnet_advprop.layers.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from efficientnet_advprop.models import weights as W
from efficientnet_advprop.models.init_checkpoint import init_from_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "convert_official_checkpoint.py")
OFFICIAL_SIZE = 32


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(
        np.float32)


def _randomise(model, seed):
    """Random BN sets (all of them), conv biases: non-trivial stats to transfer."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNorm):
            sets = [layer.gammas, layer.betas, layer.moving_means, layer.moving_variances]
        elif isinstance(layer, keras.layers.BatchNormalization):
            sets = [[layer.gamma], [layer.beta], [layer.moving_mean],
                    [layer.moving_variance]]
        elif (isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
              and layer.use_bias):
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
            continue
        else:
            continue
        for store, (low, high) in zip(sets, [(0.6, 1.4), (-0.2, 0.2), (-0.2, 0.2),
                                             (0.5, 2.0)]):
            for var in store:
                var.assign(rng.uniform(low, high, var.shape).astype(np.float32))


def _logits(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


# ---------------------------------------------------------------------------------------
# keras.applications.

_APPS = {"b0": keras.applications.EfficientNetB0, "b3": keras.applications.EfficientNetB3}
_APP_CACHE = {}


def _keras_app(size):
    """A randomised weights=None keras.applications model (built once per size)."""
    if size not in _APP_CACHE:
        app_model = _APPS[size](weights=None, input_shape=(64, 64, 3), classes=10,
                                classifier_activation=None)
        _randomise(app_model, seed=1)
        _APP_CACHE[size] = app_model
    return _APP_CACHE[size]


def _set_normalization(app_model, mean, variance):
    norm = next(layer for layer in app_model.layers
                if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(np.asarray(mean, np.float32))
    norm.adapt_variance.assign(np.asarray(variance, np.float32))
    norm.finalize_state()  # Normalization computes with a snapshot taken here


def _set_imagenet_normalization(app_model):
    _set_normalization(app_model, IMAGENET_MEAN, np.square(IMAGENET_STD))


def test_keras_applications_preprocessing_finding():
    app_model = _keras_app("b0")
    # As built with weights=None: Rescaling(1/255) + an un-adapted Normalization.
    _set_normalization(app_model, [0.0] * 3, [1.0] * 3)
    mode, scale, offset = W.keras_applications_preprocessing(app_model)
    assert mode is None
    np.testing.assert_allclose(scale, [1 / 255.0] * 3, rtol=1e-6)
    np.testing.assert_allclose(offset, [0.0] * 3, atol=1e-7)
    model = build_model("efficientnet-b0", num_classes=10, image_size=64)
    with pytest.raises(ValueError, match="preprocessing mismatch.*'imagenet'"):
        W.load_keras_applications_weights(model, app_model)
    report = W.load_keras_applications_weights(model, app_model,
                                               check_preprocessing=False)
    assert report["preprocessing"] is None
    # What weights="imagenet" computes: the stored variance is std (TF issue 49930)
    # and an extra Rescaling(1/sqrt(std)) follows; here the proper mean/std**2 stand
    # for both, and either way the map is (x / 255 - mean) / std.
    _set_imagenet_normalization(app_model)
    mode, scale, offset = W.keras_applications_preprocessing(app_model)
    assert mode == "imagenet"
    np.testing.assert_allclose(scale, 1 / (255.0 * np.array(IMAGENET_STD)), rtol=1e-5)
    np.testing.assert_allclose(offset, -np.divide(IMAGENET_MEAN, IMAGENET_STD),
                               rtol=1e-5)


@pytest.mark.parametrize("size,normalizer,num_aux", [
    ("b0", "split_batch_norm", 1), ("b0", "batch_norm", 0), ("b0", "keras_batch_norm", 0),
    ("b3", "split_batch_norm", 1), ("b3", "batch_norm", 0)])
def test_keras_applications_transfer_exact(size, normalizer, num_aux):
    app_model = _keras_app(size)
    _set_imagenet_normalization(app_model)
    model = build_model(f"efficientnet-{size}", num_classes=10, image_size=64,
                        normalizer=normalizer, num_aux=num_aux)
    _randomise(model, seed=2)  # auxiliary sets keep random values: must not matter
    report = W.load_keras_applications_weights(model, app_model)
    assert report["preprocessing"] == "imagenet" and "predictions" in report["loaded"]
    images = _images(3, 64)
    np.testing.assert_allclose(_logits(model, images), _logits(app_model, images),
                               atol=1e-5, rtol=0)
    if size == "b0" and num_aux:
        # The pure name table of the full b0 covers exactly the model's main variables.
        names = W.official_variable_names("efficientnet-b0")
        assert names == W.official_variable_names_for_model(model, "efficientnet-b0")
        targets = {id(W.target_variable(model, *t)) for t in names.values()}
        main = {id(v) for v in model.weights if "aux" not in v.path}
        assert targets == main and len(names) == 311


# ---------------------------------------------------------------------------------------
# Official TF1 layout.


def _write_official(prefix, values):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n]) for n in names])
    tf.compat.v1.train.update_checkpoint_state(os.path.dirname(prefix), prefix)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout b0 checkpoint with EMA shadows, and its source model."""
    root = tmp_path_factory.mktemp("official")
    source = build_model("efficientnet-b0", num_classes=10, image_size=OFFICIAL_SIZE,
                         preprocessing="advprop")
    _randomise(source, seed=3)
    images = _images(2, OFFICIAL_SIZE, seed=4)
    raw_logits = _logits(source, images)
    names = W.official_variable_names("efficientnet-b0")
    rng = np.random.default_rng(5)
    values, shadows = {}, {}
    for i, (name, target) in enumerate(sorted(names.items())):
        value = keras.ops.convert_to_numpy(W.target_variable(source, *target))
        values[name] = value
        if i % 3 == 0:  # EMA shadows for a third of the variables, different values
            shadow = value * rng.uniform(0.9, 1.1, value.shape).astype(np.float32)
            if target[1] == "moving_variance":
                shadow = np.abs(shadow)
            values[name + W.EMA_SUFFIX] = shadow
            shadows[name] = shadow
    values["global_step"] = np.array(1234, np.int64)
    values["efficientnet-b0/head/dense/kernel/Momentum"] = values[
        "efficientnet-b0/head/dense/kernel"]
    directory = root / "advprop" / "efficientnet-b0"
    prefix = str(directory / "model.ckpt-1234")
    _write_official(prefix, values)
    for name, shadow in shadows.items():
        W.target_variable(source, *names[name]).assign(shadow)
    return dict(root=root, directory=str(directory), prefix=prefix, values=values,
                images=images, raw_logits=raw_logits, ema_logits=_logits(source, images),
                num_shadows=len(shadows), shadows=sorted(shadows))


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_official_checkpoint_conversion_and_export(official, tmp_path):
    script = _load_script()
    output = str(tmp_path / "b0.keras")
    # Directory path, no --advprop: decided by the path ("advprop" in it).
    model, report = script.convert(official["directory"], "efficientnet-b0", output,
                                   image_size=OFFICIAL_SIZE)
    assert report["scope"] == "efficientnet-b0" and report["preprocessing"] == "advprop"
    assert report["ema"] == official["num_shadows"] and report["skipped"] == {}
    assert report["unused"] == []
    assert model.get_layer("predictions").units == 10  # read from the dense kernel
    images = official["images"]
    ema_logits = official["ema_logits"]
    assert np.abs(ema_logits - official["raw_logits"]).max() > 1e-3  # shadows matter
    np.testing.assert_allclose(_logits(model, images), ema_logits, atol=1e-5, rtol=0)

    # prefer_ema=False reads the raw variables.
    raw = W.load_official_checkpoint(model, official["prefix"], prefer_ema=False)
    assert raw["ema"] == 0
    np.testing.assert_allclose(_logits(model, images), official["raw_logits"],
                               atol=1e-5, rtol=0)

    # The saved model records its preprocessing, and keeps it through export.
    loaded = keras.saving.load_model(output, compile=False)
    assert loaded.get_layer("input_normalization").mode == "advprop"
    np.testing.assert_allclose(_logits(loaded, images), ema_logits, atol=1e-5, rtol=0)
    export_dir = str(tmp_path / "export")
    clean = export_saved_model(loaded, export_dir, metadata={
        "model_name": "efficientnet-b0",
        "preprocessing": loaded.get_layer("input_normalization").mode})
    assert clean.get_layer("input_normalization").get_config()["mode"] == "advprop"
    with open(os.path.join(export_dir, "efficientnet_advprop.json")) as f:
        assert json.load(f)["preprocessing"] == "advprop"
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    np.testing.assert_allclose(served(images=tf.constant(images))["logits"].numpy(),
                               ema_logits, atol=1e-5, rtol=0)

    # An explicit flag wins over the path; an existing output is refused.
    other = str(tmp_path / "b0_imagenet.keras")
    model, report = script.convert(official["prefix"], None, other, advprop=False,
                                   image_size=OFFICIAL_SIZE)
    assert report["preprocessing"] == "imagenet"
    assert model.get_layer("input_normalization").mode == "imagenet"
    with pytest.raises(FileExistsError, match="exists"):
        script.convert(official["prefix"], None, other)


def test_official_checkpoint_errors(official, tmp_path):
    script = _load_script()
    with pytest.raises(ValueError, match="no TF checkpoint"):
        script.convert(str(tmp_path / "nothing"), "efficientnet-b0")
    with pytest.raises(ValueError, match="checkpoint holds efficientnet-b0"):
        script.convert(official["prefix"], "efficientnet-b1")
    with pytest.raises(ValueError, match="unknown EfficientNet"):
        script.convert(official["prefix"], "efficientnet-b9")

    missing = "efficientnet-b0/blocks_3/tpu_batch_normalization_1/moving_mean"
    values = {k: v for k, v in official["values"].items()
              if not k.startswith(missing)}
    broken = str(tmp_path / "broken" / "model.ckpt")
    _write_official(broken, values)
    model = build_model("efficientnet-b0", num_classes=10, image_size=OFFICIAL_SIZE,
                        preprocessing="advprop")
    with pytest.raises(ValueError,
                       match=f"no variable '{missing}' .*block3a_bn/moving_mean"):
        W.load_official_checkpoint(model, broken)
    wrong = build_model("efficientnet-b0", num_classes=7, image_size=OFFICIAL_SIZE,
                        preprocessing="advprop")
    with pytest.raises(ValueError, match="'efficientnet-b0/head/dense/kernel.*shape"):
        W.load_official_checkpoint(wrong, official["prefix"], prefer_ema=False)

    # The script: an existing --output is one line on stderr and exit status 2.
    existing = tmp_path / "exists.keras"
    existing.write_text("x")
    run = subprocess.run([sys.executable, SCRIPT, f"--checkpoint={official['prefix']}",
                          f"--output={existing}"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "exists" in lines[0], run.stderr


# ---------------------------------------------------------------------------------------
# --init_checkpoint.


def test_init_from_checkpoint(official, tmp_path):
    output = str(tmp_path / "b0.keras")
    W.convert_official_checkpoint(official["prefix"], output=output, advprop=True,
                                  image_size=OFFICIAL_SIZE)
    model = build_model("efficientnet-b0", num_classes=5, image_size=OFFICIAL_SIZE,
                        normalizer="split_batch_norm", num_aux=1, preprocessing="advprop")
    before = keras.ops.convert_to_numpy(model.get_layer("predictions").kernel)
    report = init_from_checkpoint(model, output)
    assert report["source"] == "keras" and report["preprocessing"] == "advprop"
    assert list(report["skipped"]) == ["predictions"]
    assert "num_classes differs" in report["skipped"]["predictions"]
    assert "predictions" not in report["loaded"] and "top_bn" in report["loaded"]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("predictions").kernel), before)
    source = keras.saving.load_model(output, compile=False)
    # Up to the classifier the features are the converted model's.
    features = [keras.Model(m.input, m.get_layer("avg_pool").output)
                for m in (model, source)]
    np.testing.assert_allclose(*[_logits(f, official["images"]) for f in features],
                               atol=1e-5, rtol=0)

    # Official checkpoint path: same skip, EMA shadows read.
    report = init_from_checkpoint(model, official["directory"], advprop=True)
    assert report["source"] == "official" and list(report["skipped"]) == ["predictions"]
    assert report["ema"] == len([n for n in official["shadows"] if "/head/dense/" not in n])

    imagenet = build_model("efficientnet-b0", num_classes=5, image_size=OFFICIAL_SIZE)
    with pytest.raises(ValueError, match="'advprop' but the model uses 'imagenet'"):
        init_from_checkpoint(imagenet, output)
    with pytest.raises(ValueError, match="'advprop' but the model uses 'imagenet'"):
        init_from_checkpoint(imagenet, official["prefix"], advprop=True)
