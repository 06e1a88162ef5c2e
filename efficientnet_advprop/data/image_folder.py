"""Image-folder datasets.

Layouts (class ids = sorted class folder names of the training folder):

* ``data_dir/train/<class>/*.jpg`` plus ``data_dir/validation/<class>/*``
  (``val/`` or ``test/`` are accepted too);
* ``data_dir/train/<class>/*`` alone, or ``data_dir/<class>/*`` directly:
  a deterministic per-class holdout of :data:`HOLDOUT_FRACTION` of the
  images (at least one per class with >= 2 images) becomes the eval split.

Images may be JPEG, PNG, BMP or GIF (first frame).  Files are listed in
sorted (class, file name) order.  The directory scanning (:func:`scan`,
:func:`has_layout`) is in the TensorFlow-free
:mod:`efficientnet_advprop.data.image_folder_scan`.
"""

import tensorflow as tf

from efficientnet_advprop.data import tfrecord
# The directory scanning lives in a TensorFlow-free module (numpy_input uses it too);
# its names are re-exported here unchanged.
from efficientnet_advprop.data.image_folder_scan import (  # noqa: F401
    EVAL_DIRS,
    HOLDOUT_FRACTION,
    HOLDOUT_SEED,
    IMAGE_EXTENSIONS,
    _class_dirs,
    _holdout,
    _images_in,
    has_layout,
    scan,
)


def native_image_size(path, default=224):
    try:
        data = tf.io.read_file(path)
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
        return int(min(shape[0], shape[1]))
    except Exception:  # pylint: disable=broad-except
        return default


def _read(path, label):
    return tf.io.read_file(path), label


def make_source(data_dir, split, *, input_context=None, is_training=False, cache=False):
    del cache  # Paths are always held in memory.
    _, train, evals = scan(data_dir)
    items = train if split == "train" else evals
    num_pipelines, pipeline_id = tfrecord.pipeline_ids(input_context)
    items = items[pipeline_id::num_pipelines]
    if not items:
        raise ValueError(
            f"--data_dir={data_dir}: no {split} images for input "
            f"pipeline {pipeline_id} of {num_pipelines}"
        )
    paths = tf.constant([p for p, _ in items])
    labels = tf.constant([l for _, l in items], tf.int32)
    del is_training
    return tfrecord.Source(len(items), _read, memory=(paths, labels))
