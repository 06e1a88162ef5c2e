"""The TensorFlow-free input path (efficientnet_advprop.data.numpy_input, tfrecord_lite).

* On JAX with TensorFlow blocked from import (a subprocess): the embedded set is read,
  batched and augmented under jax.jit, deterministically per seed.
* Parity with the TensorFlow pipeline on the embedded validation split: the same
  labels, and pixels identical to TF's JPEG decoder in its accurate-DCT mode. The TF
  pipeline itself decodes with ``dct_method=""`` = INTEGER_FAST (libjpeg's fast,
  less accurate integer IDCT; Pillow has no such switch and uses the accurate one):
  measured on the 2,000 validation images, max |diff| 5 levels, mean 0.99 level, 65%
  of the values differ. The bounds below (max <= 8, mean < 1.5) are that IDCT's
  error with some margin; any other decoding difference (colour conversion, chroma
  upsampling, channel order) would exceed them.
* Resumption, damaged files, the CIFAR tarball split, image folders, and the crop of
  pad_crop_flip checked exactly against a numpy reference on the TensorFlow backend.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.data import image_folder
from efficientnet_advprop.data import image_folder_scan
from efficientnet_advprop.data import numpy_input as ni
from efficientnet_advprop.data import tfrecord
from efficientnet_advprop.data import tfrecord_lite

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TAR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data",
                         "cifar10-train-jpeg.tar.gz")
EMBEDDED = ni.EMBEDDED_DIR
VALIDATION_SHARD = os.path.join(EMBEDDED, "validation-00000-of-00001")

_JAX_SCRIPT = r"""
import json, sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
import numpy as np
import jax
from efficientnet_advprop import seam
from efficientnet_advprop.data import numpy_input as ni

data = ni.make_numpy_input(None, None, "train", 64, 32, seed=7, is_training=True)
stream = data.stream
first, second = next(stream), next(stream)
again = ni.make_numpy_input("embedded", None, "train", 64, 32, seed=7, is_training=True)
other = ni.make_numpy_input("embedded", None, "train", 64, 32, seed=8, is_training=True)
aug = jax.jit(ni.pad_crop_flip)  # the seed is traced: one compilation for all steps
a = np.asarray(aug(first[0], seam.make_seed(7, 0)))
b = np.asarray(aug(first[0], seam.make_seed(7, 0)))
c = np.asarray(aug(first[0], seam.make_seed(7, 1)))
int_seed = bool(np.array_equal(np.asarray(aug(first[0], 7)),
                               np.asarray(ni.pad_crop_flip(first[0], 7))))
try:
    import efficientnet_advprop.data as data_package
    data_package.make_dataset
    tf_blocked = False
except ImportError:
    tf_blocked = True
print(json.dumps({
    "backend": __import__("keras").backend.backend(),
    "tf_modules": sorted(m for m, v in sys.modules.items()
                         if m.startswith("tensorflow") and v is not None),
    "tf_blocked": tf_blocked,
    "num_examples": data.num_examples, "num_classes": data.num_classes,
    "shapes": [list(first[0].shape), list(first[1].shape), list(second[0].shape)],
    "dtypes": [str(first[0].dtype), str(first[1].dtype), str(a.dtype)],
    "label_range": [int(first[1].min()), int(first[1].max())],
    "batches_differ": bool(not np.array_equal(first[1], second[1])),
    "same_seed_same_batch": bool(np.array_equal(next(again.stream)[0], first[0])),
    "other_seed_other_batch": bool(not np.array_equal(next(other.stream)[1], first[1])),
    "aug_shape": list(a.shape), "aug_range": [float(a.min()), float(a.max())],
    "aug_same_seed": bool(np.array_equal(a, b)),
    "aug_other_seed": bool(not np.array_equal(a, c)),
    "aug_changed": bool(not np.array_equal(a, first[0].astype(np.float32))),
    "int_seed_traced_and_eager_agree": int_seed,
    "position": stream.state()["step"],
}))
"""


def test_embedded_set_streams_and_augments_on_jax_without_tensorflow():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["backend"] == "jax"
    assert out["tf_modules"] == [] and out["tf_blocked"]
    assert (out["num_examples"], out["num_classes"]) == (15000, 10)
    assert out["shapes"] == [[64, 32, 32, 3], [64], [64, 32, 32, 3]]
    assert out["dtypes"] == ["uint8", "int32", "float32"]
    assert 0 <= out["label_range"][0] <= out["label_range"][1] <= 9
    assert out["batches_differ"]
    assert out["same_seed_same_batch"] and out["other_seed_other_batch"]
    assert out["aug_shape"] == [64, 32, 32, 3]
    assert 0.0 <= out["aug_range"][0] and out["aug_range"][1] <= 255.0
    assert out["aug_same_seed"] and out["aug_other_seed"] and out["aug_changed"]
    assert out["int_seed_traced_and_eager_agree"]
    assert out["position"] == 2


# --------------------------------------------------------------------------- parity
def test_embedded_validation_matches_the_tensorflow_pipeline():
    from efficientnet_advprop.data import InputOptions, make_dataset, resolve_dataset

    info = resolve_dataset("embedded")
    ds = make_dataset(info, None, "eval", batch_size=500, image_size=32,
                      is_training=False, options=InputOptions(augmentation="none"))
    tf_images, tf_labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    tf_images, tf_labels = np.concatenate(tf_images), np.concatenate(tf_labels)

    data = ni.load_split("embedded", None, "eval", 32)
    assert data.images.shape == (2000, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32 and (data.num_classes, len(data.class_names)) == (10, 10)
    np.testing.assert_array_equal(data.labels, tf_labels)
    diff = np.abs(data.images.astype(np.float32) - tf_images)
    assert diff.max() <= 8 and diff.mean() < 1.5, (diff.max(), diff.mean())

    # The same libjpeg-turbo decoder: bit-identical with the accurate IDCT.
    encoded, _ = tfrecord_lite.read_split(EMBEDDED, "eval")
    accurate = np.stack([tf.io.decode_jpeg(e, channels=3, dct_method="INTEGER_ACCURATE")
                         .numpy() for e in encoded])
    np.testing.assert_array_equal(data.images, accurate)


@pytest.mark.parametrize("split,holdout", [("train", 0), ("eval", 0), ("train", 1),
                                           ("eval", 1)])
def test_split_files_and_labels_match_the_tensorflow_reader(split, holdout):
    lite = tfrecord_lite.split_file_infos(EMBEDDED, split, holdout)
    assert lite == tfrecord.split_file_infos(EMBEDDED, split, holdout)
    if split == "eval":  # labels of every record, through the project's parse function
        paths = [p for p, _, _ in lite]
        ds = tf.data.TFRecordDataset(paths, compression_type="GZIP").map(
            tfrecord.parse_example)
        tf_labels = np.array([int(label) for _, label in ds])
        _, labels = tfrecord_lite.read_split(EMBEDDED, split, holdout)
        np.testing.assert_array_equal(labels, tf_labels)


def test_crc32c_and_example_parsing():
    assert tfrecord_lite.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tfrecord_lite.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    buffer = rng.integers(0, 256, 20000, dtype=np.uint8)
    starts = rng.integers(0, 10000, 40)
    lengths = np.concatenate([[0, 1, 3, 4, 5, 9999], rng.integers(0, 3000, 34)])
    got = tfrecord_lite.crc32c_many(buffer, starts, lengths)
    want = [tfrecord_lite._crc32c_py(buffer[s:s + n].tolist())
            for s, n in zip(starts, lengths)]
    np.testing.assert_array_equal(got, np.array(want, np.uint32))

    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\xff\xd8"])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
        "ints": tf.train.Feature(int64_list=tf.train.Int64List(value=[-3, 0, 2**40])),
        "floats": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -2.25])),
        "empty": tf.train.Feature(),
    }))
    parsed = tfrecord_lite.parse_example(example.SerializeToString())
    assert parsed["ints"] == ("int64", [-3, 0, 2**40])  # packed
    assert parsed["floats"] == ("float", [0.5, -2.25])
    assert parsed["empty"] == (None, [])
    assert tfrecord_lite.image_and_label(example.SerializeToString()) == (b"\xff\xd8", 6)

    # Unpacked repeated int64 (wire type 0 per value), written by hand.
    def field(number, payload):
        return bytes([number << 3 | 2, len(payload)]) + payload

    int64_list = bytes([1 << 3 | 0, 5, 1 << 3 | 0, 9])
    entry = field(1, b"k") + field(2, field(3, int64_list))
    assert tfrecord_lite.parse_example(field(1, field(1, entry))) == {"k": ("int64", [5, 9])}
    with pytest.raises(ValueError):
        tfrecord_lite.parse_example(b"\x0a\x05\x0a")  # a field past the end


# ------------------------------------------------------------------------- streams
def test_stream_resumes_exactly_at_any_step():
    images = np.arange(50, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3),
                                                                          np.uint8)
    labels = np.arange(50, dtype=np.int32)
    stream = ni.NumpyStream(images, labels, batch_size=8, seed=3, is_training=True)
    assert stream.steps_per_epoch == 6
    batches = [next(stream) for _ in range(20)]
    for k in (0, 1, 5, 6, 7, 13, 19):
        resumed = ni.NumpyStream(images, labels, 8, seed=3, is_training=True, start_step=k)
        x, y = next(resumed)
        np.testing.assert_array_equal(y, batches[k][1])
        np.testing.assert_array_equal(x, batches[k][0])
        assert resumed.position == k + 1
    # Each epoch: 48 distinct examples in the order of default_rng([seed, epoch]).
    for epoch in range(3):
        seen = np.concatenate([y for _, y in batches[6 * epoch:6 * epoch + 6]])
        np.testing.assert_array_equal(
            seen, np.random.default_rng([3, epoch]).permutation(50)[:48])
    state = stream.state()
    assert state["step"] == 20
    resumed = ni.NumpyStream.resume(images, labels, json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(resumed)[1], stream.batch(20)[1])
    with pytest.raises(ValueError):
        ni.NumpyStream.resume(images[:40], labels[:40], state)

    # Eval: one ordered pass, the last batch partial; pad_batch restores the shape.
    evals = ni.NumpyStream(images, labels, batch_size=8, is_training=False)
    sizes = [len(y) for _, y in evals]
    assert sizes == [8] * 6 + [2] and len(evals) == 7
    x, y, mask = ni.pad_batch(*evals.batch(6), 8)
    assert x.shape == (8, 2, 2, 3) and mask.tolist() == [1, 1] + [0] * 6
    np.testing.assert_array_equal(y[:2], [48, 49])


def test_make_numpy_input_resume_and_errors(tmp_path):
    data = ni.make_numpy_input("embedded", None, "eval", 64, 32, seed=1, is_training=True)
    assert (data.num_examples, data.num_classes) == (2000, 10)
    reference = [next(data.stream) for _ in range(35)]  # crosses the epoch of 31 steps
    later = ni.make_numpy_input("embedded", None, "eval", 64, 32, seed=1,
                                is_training=True, start_step=33)
    np.testing.assert_array_equal(next(later.stream)[0], reference[33][0])

    from efficientnet_advprop.data import resolve_dataset

    held = ni.make_numpy_input("embedded", None, "eval", 500, 32, seed=0,
                               is_training=False, holdout_shards=1)
    assert held.num_examples == resolve_dataset("embedded", holdout_shards=1).num_eval
    with pytest.raises(ValueError, match="holdout_shards=2"):
        ni.make_numpy_input("embedded", None, "eval", 500, 32, seed=0,
                            is_training=False, holdout_shards=2)

    missing = str(tmp_path / "nowhere")
    for kwargs, needle in [
        (dict(dataset="imagenet", data_dir=missing), missing),
        (dict(dataset="folder", data_dir=missing), missing),
        (dict(dataset="cifar_tar", data_dir=missing), missing),
        (dict(dataset="imagenet", data_dir=str(tmp_path)), str(tmp_path)),
        (dict(dataset="mnist", data_dir=None), "mnist"),
        (dict(dataset="tfds:cifar10", data_dir=None), "tfds:cifar10"),
    ]:
        with pytest.raises(ValueError) as err:
            ni.make_numpy_input(split="train", batch_size=8, image_size=32, seed=0,
                                is_training=True, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------- bad records
def _one_line_error(fn, *args, **kwargs):
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_damaged_tfrecord_files_raise_one_line_errors_naming_the_file(tmp_path):
    with open(VALIDATION_SHARD, "rb") as f:
        compressed = f.read()
    raw = gzip.decompress(compressed)

    truncated_gzip = tmp_path / "gz" / "validation-00000-of-00001"
    truncated_gzip.parent.mkdir()
    truncated_gzip.write_bytes(compressed[:len(compressed) // 2])
    message = _one_line_error(tfrecord_lite.read_records, str(truncated_gzip))
    assert str(truncated_gzip) in message
    # Through the whole source too (no dataset_info.json: compression detected).
    message = _one_line_error(ni.load_split, "imagenet", str(truncated_gzip.parent), "eval",
                              32)
    assert str(truncated_gzip) in message

    truncated = tmp_path / "raw-truncated"
    truncated.write_bytes(raw[:len(raw) - 100])
    message = _one_line_error(tfrecord_lite.read_records, str(truncated))
    assert str(truncated) in message and "runs past the end" in message

    flipped = bytearray(raw)
    flipped[12 + 50] ^= 0x01  # inside record 0's data (records are about 1 kB)
    corrupt = tmp_path / "raw-corrupt"
    corrupt.write_bytes(bytes(flipped))
    message = _one_line_error(tfrecord_lite.read_records, str(corrupt))
    assert str(corrupt) in message and "record 0: data checksum" in message
    assert len(tfrecord_lite.read_records(str(corrupt), verify_crc=False)) == 2000


def test_a_record_that_is_not_an_example_is_named(tmp_path):
    path = str(tmp_path / "train-00000-of-00001")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(b"\x0a\x05\x0a")
    message = _one_line_error(tfrecord_lite.read_split, str(tmp_path), "train")
    assert path in message and "record 0" in message


# ---------------------------------------------------------------------- other sources
@pytest.mark.skipif(not os.path.exists(CIFAR_TAR), reason="no CIFAR-10 JPEG tarball")
def test_cifar_tarball_split_is_disjoint_and_seeded():
    def names(items):
        return [(cls, name) for cls, name, _ in items]

    classes, train, evals = ni.cifar_split(CIFAR_TAR, 20, 20, split_seed=0)
    assert len(classes) == 10 and len(train) == len(evals) == 200
    assert not set(names(train)) & set(names(evals))
    assert np.bincount([label for _, _, label in train]).tolist() == [20] * 10
    _, train_again, evals_again = ni.cifar_split(CIFAR_TAR, 20, 20, split_seed=0)
    assert names(train_again) == names(train) and names(evals_again) == names(evals)
    _, train_other, evals_other = ni.cifar_split(CIFAR_TAR, 20, 20, split_seed=1)
    assert set(names(train_other)) != set(names(train))
    assert set(names(evals_other)) != set(names(evals))
    # The held-out images come first per class: which they are does not depend on
    # train_per_class (their shuffled order does).
    _, _, evals_more = ni.cifar_split(CIFAR_TAR, 40, 20, split_seed=0)
    assert sorted(names(evals_more)) == sorted(names(evals))

    data = ni.make_numpy_input("cifar_tar", CIFAR_TAR, "eval", 16, 32, seed=0,
                               is_training=False, train_per_class=20, eval_per_class=20)
    assert (data.num_examples, data.num_classes) == (200, 10)
    x, y = next(data.stream)
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, [label for _, _, label in evals[:16]])


def test_image_folder_source_uses_the_shared_scan(tmp_path):
    from PIL import Image

    assert image_folder.scan is image_folder_scan.scan
    assert image_folder.has_layout is image_folder_scan.has_layout
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("validation", 1)):
        for cls in ("b_cls", "a_cls"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    native = tmp_path / "train" / "a_cls" / "0.png"
    data = ni.load_split(None, str(tmp_path), "train", 16)
    assert data.class_names == ("a_cls", "b_cls") and data.num_classes == 2
    _, train, _ = image_folder_scan.scan(str(tmp_path))
    np.testing.assert_array_equal(data.labels, [label for _, label in train])
    assert data.images.shape == (6, 16, 16, 3)
    assert ni.load_split("folder", str(tmp_path), "eval", 16).images.shape == (2, 16, 16, 3)
    # Not resized at its own size: exact pixels (lossless PNG).
    np.testing.assert_array_equal(ni.decode_image(native.read_bytes(), None),
                                  np.asarray(Image.open(native)))
    with pytest.raises(ValueError, match="pass image_size"):
        ni.load_split("folder", str(tmp_path), "train", None)


# ---------------------------------------------------------------------- augmentation
def _reference_crop(image, offset_y, offset_x, flip, pad, mode):
    padded = np.pad(image.astype(np.float32), [(pad, pad), (pad, pad), (0, 0)], mode=mode)
    h, w = image.shape[:2]
    crop = padded[offset_y:offset_y + h, offset_x:offset_x + w]
    return crop[:, ::-1] if flip else crop


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_pad_crop_flip_on_tensorflow_is_a_translation_of_the_padded_image(mode):
    import keras

    assert keras.backend.backend() == "tensorflow"
    images = ni.load_split("embedded", None, "eval", 32).images[:16]
    out = np.asarray(ni.pad_crop_flip(images, 11, mode=mode))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.asarray(ni.pad_crop_flip(images, 11, mode=mode)))
    assert not np.array_equal(out, np.asarray(ni.pad_crop_flip(images, 12, mode=mode)))

    offset_y, offset_x, flip = map(np.asarray, ni.crop_flip_params(16, 11))
    assert offset_y.min() >= 0 and max(offset_y.max(), offset_x.max()) <= 8
    assert set(flip.tolist()) <= {0, 1}
    for i in range(16):
        want = _reference_crop(images[i], offset_y[i], offset_x[i], flip[i], 4, mode)
        np.testing.assert_array_equal(out[i], want)
    # The TF pipeline pads "cifar" with tf.pad REFLECT and "cifar_zeros" with zeros.
    tf_mode = {"reflect": "REFLECT", "constant": "CONSTANT"}[mode]
    np.testing.assert_array_equal(
        tf.pad(images[0], [[4, 4], [4, 4], [0, 0]], mode=tf_mode).numpy(),
        np.pad(images[0], [(4, 4), (4, 4), (0, 0)], mode=mode))

    # A [2] seed tensor and an unknown batch size (tf.function) work as well.
    from efficientnet_advprop import seam

    fn = tf.function(lambda x, s: ni.pad_crop_flip(x, s, mode=mode),
                     input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8),
                                      tf.TensorSpec([2], tf.int64)])
    seed = seam.make_seed(5, 9)
    np.testing.assert_array_equal(fn(images, seed).numpy(),
                                  np.asarray(ni.pad_crop_flip(images, seed, mode=mode)))
