"""Export: auxiliary BNs stripped, preprocessing inside, loads without the package."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import build_model
from efficientnet_advprop.export import export_saved_model, strip_auxiliary_bn
from efficientnet_advprop.layers import AUX, MAIN, SplitBatchNorm, bn_route

TINY = dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25)

# Runs in a fresh interpreter that never imports efficientnet_advprop.
LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf
export_dir, images_path, jpeg_path = sys.argv[1:4]
loaded = tf.saved_model.load(export_dir)
serve = loaded.signatures["serving_default"]
out = serve(images=tf.constant(np.load(images_path)))
jpegs = [open(p, "rb").read() for p in json.load(open(jpeg_path))]
jpeg_out = loaded.signatures["serve_jpeg"](jpeg=tf.constant(jpegs))
names = sorted(v.name for v in loaded.variables)
print(json.dumps({
    "logits": out["logits"].numpy().tolist(),
    "probabilities": out["probabilities"].numpy().tolist(),
    "jpeg_logits": jpeg_out["logits"].numpy().tolist(),
    "variables": names,
    "package_imported": any(m.startswith("efficientnet_advprop") for m in sys.modules),
}))
"""


def _trained_advprop_model():
    keras.utils.set_random_seed(1)
    model = build_model("efficientnet-b0", 10, normalizer="split_batch_norm", num_aux=1,
                        preprocessing="advprop", **TINY)
    rng = np.random.default_rng(0)
    # Move both BN sets' statistics away from their initial values, differently.
    for route, shift in ((MAIN, 20.0), (AUX, 120.0)):
        with bn_route(route):
            for _ in range(3):
                model(rng.uniform(0, 255 - shift, (16, 32, 32, 3)).astype("float32") + shift,
                      training=True)
    return model


def test_strip_auxiliary_bn_keeps_main_outputs_and_drops_aux_variables():
    model = _trained_advprop_model()
    clean = strip_auxiliary_bn(model)
    assert not any(isinstance(l, SplitBatchNorm) for l in clean.layers)
    assert not any("aux" in v.path for v in clean.variables)
    n_bn = sum(isinstance(l, SplitBatchNorm) for l in model.layers)
    assert len(model.variables) - len(clean.variables) == 4 * n_bn  # aux gamma/beta/mean/var
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(clean(x, training=False).numpy(),
                               model(x, training=False).numpy(), atol=1e-5)
    with bn_route(AUX):
        aux_logits = model(x, training=False).numpy()
    assert not np.allclose(aux_logits, clean(x, training=False).numpy(), atol=1e-3)
    assert clean.get_layer("input_normalization").get_config()["mode"] == "advprop"


def test_saved_model_loads_in_a_fresh_process_without_the_package(tmp_path, cifar_small):
    model = _trained_advprop_model()
    export_dir = str(tmp_path / "export")
    export_saved_model(model, export_dir, metadata={"preprocessing": "advprop"},
                       eval_crop="cifar")
    _, (held_x, _) = cifar_small
    images = held_x[:6].astype("float32")
    np.save(tmp_path / "images.npy", images)
    jpeg_paths = []
    for i, image in enumerate(held_x[:3]):
        path = str(tmp_path / f"{i}.jpg")
        tf.io.write_file(path, tf.io.encode_jpeg(image, quality=95))
        jpeg_paths.append(path)
    (tmp_path / "jpegs.json").write_text(json.dumps(jpeg_paths))
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), export_dir, str(tmp_path / "images.npy"),
         str(tmp_path / "jpegs.json")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["package_imported"] is False
    assert out["variables"] and not any("aux" in name for name in out["variables"])
    expected = model(images, training=False).numpy()  # main BNs, inference mode
    np.testing.assert_allclose(np.array(out["logits"]), expected, atol=1e-4)
    np.testing.assert_allclose(np.array(out["probabilities"]).sum(-1), 1.0, atol=1e-5)
    decoded = np.stack([tf.io.decode_jpeg(tf.io.read_file(p)).numpy() for p in jpeg_paths])
    np.testing.assert_allclose(np.array(out["jpeg_logits"]),
                               model(decoded.astype("float32"), training=False).numpy(),
                               atol=1e-4)
    meta = json.loads((tmp_path / "export" / "efficientnet_advprop.json").read_text())
    assert meta["preprocessing"] == "advprop" and meta["image_size"] == 32


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    model = build_model("efficientnet-b0", 10, **TINY)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_saved_model(model, str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "precious"
