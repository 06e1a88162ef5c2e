"""TFLite export: the main-BN network with its preprocessing, float32 and dynamic-range
quantised, agrees with the SavedModel export on held-out images."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import RecipeModel, build_model
from efficientnet_advprop.export import export_tflite, tflite_predict
from efficientnet_advprop.recipes import make_recipe
from efficientnet_advprop.training import set_global_seed

# Float32 TFLite runs the same float32 arithmetic with other kernels (XNNPACK).
FLOAT32_MAX_PROB_DIFF = 1e-5
# Dynamic-range quantisation stores weights in int8. Measured on this model: 100%
# agreement, max difference 0.0064 (float32: 4.5e-7); the bounds leave a margin.
DYNAMIC_MIN_AGREEMENT = 0.9
DYNAMIC_MAX_PROB_DIFF = 0.1


@pytest.mark.slow  # ~35 s on the shared CPU: a short fit, a SavedModel, two conversions
def test_tflite_matches_the_saved_model_on_held_out_images(tmp_path, cifar_small):
    (x, y), (held_x, _) = cifar_small
    set_global_seed(0)
    model = build_model("resnet-18-cifar", 10, normalizer="split_batch_norm", num_aux=1,
                        width_multiplier=0.125, image_size=32, preprocessing="advprop")
    fit_model = RecipeModel(model, make_recipe("advprop", 10))
    fit_model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    fit_model.fit(x[:256].astype("float32"), y[:256], batch_size=32, epochs=1, verbose=0)
    images = held_x[:32].astype("float32")

    fit_model.export_saved_model(str(tmp_path / "saved"), eval_crop="cifar")
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    expected = serve(images=tf.constant(images))["probabilities"].numpy()

    report = {}
    for quantize in (None, "dynamic_range"):
        path = str(tmp_path / f"model-{quantize or 'float32'}.tflite")
        size = fit_model.export_tflite(path, quantize=quantize,
                                       metadata={"model_name": "resnet-18-cifar"})
        out = tflite_predict(path, images)
        assert out["probabilities"].shape == expected.shape
        agreement = float(np.mean(np.argmax(out["probabilities"], -1)
                                  == np.argmax(expected, -1)))
        diff = float(np.max(np.abs(out["probabilities"] - expected)))
        report[quantize or "float32"] = (agreement, diff, size)
        meta = json.loads(open(path + ".json").read())
        assert meta["image_size"] == 32 and meta["model_name"] == "resnet-18-cifar"
    print("TFLite vs SavedModel (top-1 agreement, max |prob diff|, bytes):", report)
    assert report["float32"][0] == 1.0 and report["float32"][1] <= FLOAT32_MAX_PROB_DIFF
    agreement, diff, size = report["dynamic_range"]
    assert agreement >= DYNAMIC_MIN_AGREEMENT and diff <= DYNAMIC_MAX_PROB_DIFF
    assert size < report["float32"][2] / 2  # int8 weights
    # The batch dimension is dynamic.
    one = tflite_predict(str(tmp_path / "model-float32.tflite"), images[:1])
    np.testing.assert_allclose(one["probabilities"], expected[:1], atol=1e-5)


def test_export_tflite_refuses_an_existing_file_and_unknown_quantization(tmp_path):
    model = build_model("resnet-18-cifar", 10, width_multiplier=0.125, image_size=32)
    (tmp_path / "m.tflite").write_text("keep")
    with pytest.raises(FileExistsError):
        export_tflite(model, str(tmp_path / "m.tflite"))
    with pytest.raises(ValueError, match="quantize="):
        export_tflite(model, str(tmp_path / "n.tflite"), quantize="int4")
    assert (tmp_path / "m.tflite").read_text() == "keep"
