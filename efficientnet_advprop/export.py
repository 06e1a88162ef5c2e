"""Export: strip the auxiliary BNs and write a SavedModel or a TFLite model with the
preprocessing inside.

`strip_auxiliary_bn(model)` (models/strip.py, used by the training loops too) clones
the functional model with every SplitBatchNorm
replaced by a stock `keras.layers.BatchNormalization` holding the *main* set's gamma,
beta and moving statistics: the auxiliary variables are not in the result at all. The
preprocessing layer (ImageNet mean/std or AdvProp [-1, 1]) is part of the model, so the
SavedModel and the TFLite model take raw RGB in [0, 255] and a user cannot pick the
wrong scaling.
"""

import json
import os

import keras
import tensorflow as tf

from efficientnet_advprop.layers.split_batch_norm import MAIN
from efficientnet_advprop.models.strip import strip_auxiliary_bn  # noqa: F401 (re-exported)


def export_saved_model(model, export_dir, *, metadata=None, eval_crop="inception",
                       overwrite=False, bn_set=MAIN):
    """Writes a SavedModel of `model` with its auxiliary BNs stripped.

    Signatures:
      serving_default(images: float32 [N, H, W, 3] RGB in [0, 255])
          -> {"logits", "probabilities"}
      serve_jpeg(jpeg: string [N] encoded images) -> same, after the eval
          preprocessing: `eval_crop` "inception" is the official center crop with
          32 pixels of padding and a bicubic resize; "cifar"/"none" resize the whole
          image (for small-image models).
    `metadata` (JSON-able dict: model name, preprocessing, classes, ...) is written
    next to it as efficientnet_advprop.json. `bn_set` chooses the BN set the exported
    model keeps (the main one by default; MBN-AT users may want the adversarial one).
    """
    if os.path.exists(export_dir) and os.listdir(export_dir) and not overwrite:
        raise FileExistsError(f"--export_dir={export_dir} exists and is not empty; "
                              "choose a new directory")
    from efficientnet_advprop.data.preprocessing import preprocess_for_eval

    clean = strip_auxiliary_bn(model, bn_set)
    height, width = clean.input_shape[1], clean.input_shape[2]

    def predict(images):
        logits = tf.cast(clean(images, training=False), tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def decode(jpeg):
        return preprocess_for_eval(jpeg, height, augmentation=eval_crop)

    serve = tf.function(predict, input_signature=[
        tf.TensorSpec([None, height, width, 3], tf.float32, name="images")])
    serve_jpeg = tf.function(
        lambda jpeg: predict(tf.map_fn(decode, jpeg, fn_output_signature=tf.float32)),
        input_signature=[tf.TensorSpec([None], tf.string, name="jpeg")])

    archive = keras.export.ExportArchive()
    archive.track(clean)
    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint("serve_jpeg", serve_jpeg)
    archive.write_out(export_dir, verbose=False)
    meta = dict(metadata or {})
    meta.setdefault("image_size", int(height))
    meta.setdefault("jpeg_eval_crop", eval_crop)
    meta.setdefault("input", "float32 RGB in [0, 255]; normalisation is inside the model")
    with open(os.path.join(export_dir, "efficientnet_advprop.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return clean


TFLITE_QUANTIZATIONS = (None, "dynamic_range")


def export_tflite(model, path, *, quantize=None, metadata=None, overwrite=False,
                  bn_set=MAIN):
    """Writes a TFLite flatbuffer of `model` with its auxiliary BNs stripped.

    One signature, "serving_default": images float32 [N, H, W, 3] RGB in [0, 255] (N
    is dynamic: resize the input tensor) -> {"logits", "probabilities"} float32. The
    preprocessing is inside, as in the SavedModel. Converted with TensorFlow's own
    `tf.lite.TFLiteConverter` (no extra package).

    Args:
      quantize: None (float32 weights and compute) or "dynamic_range" (weights stored
        as int8, activations float; about 4x smaller).
      metadata: JSON-able dict written next to it as `<path>.json` (image_size, input
        and quantization are added).
      bn_set: the BN set to keep (main by default).
    Returns:
      the size of the flatbuffer in bytes.
    """
    if quantize not in TFLITE_QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}: choose from None, 'dynamic_range'")
    if tf.io.gfile.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose a new path")
    clean = strip_auxiliary_bn(model, bn_set)
    height, width = clean.input_shape[1], clean.input_shape[2]

    # A functional wrapper with both outputs, converted as a Keras model: that path
    # freezes the weights into constants (converting a tf.function over the model,
    # directly or through a SavedModel, keeps them as resource variables the TFLite
    # runtime never initialises in TF 2.21: NaN outputs).
    images = keras.Input((height, width, 3), name="images", dtype="float32")
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(
        clean(images, training=False))
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(logits)
    serving = keras.Model(images, {"logits": logits, "probabilities": probabilities})
    converter = tf.lite.TFLiteConverter.from_keras_model(serving)
    if quantize == "dynamic_range":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data
    flatbuffer = converter.convert()
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(flatbuffer)
    meta = dict(metadata or {})
    meta.setdefault("image_size", int(height))
    meta.setdefault("input", "float32 RGB in [0, 255]; normalisation is inside the model")
    meta.setdefault("quantization", quantize or "none (float32)")
    with tf.io.gfile.GFile(path + ".json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return len(flatbuffer)


def tflite_predict(path, images):
    """Runs a model written by `export_tflite` on `images` (float32 [N, H, W, 3] in
    [0, 255]) -> {"logits", "probabilities"} numpy arrays. Uses LiteRT
    (ai_edge_litert) when it is installed, else TensorFlow's tf.lite.Interpreter."""
    import warnings

    import numpy as np

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with tf.io.gfile.GFile(path, "rb") as f:
        content = f.read()
    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_content=content)
    images = np.asarray(images, np.float32)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, images.shape)
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner("serving_default")
    out = runner(images=images)
    return {k: np.asarray(v) for k, v in out.items()}


def load_export_metadata(export_dir):
    """The efficientnet_advprop.json written next to a SavedModel by `export_saved_model`."""
    path = os.path.join(export_dir, "efficientnet_advprop.json")
    if not os.path.isdir(export_dir):
        raise FileNotFoundError(f"{export_dir} is not a directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: not a SavedModel exported by "
                                "efficientnet_advprop")
    with open(path) as f:
        return json.load(f)
