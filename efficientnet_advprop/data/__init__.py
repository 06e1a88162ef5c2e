"""Input pipelines (see data/pipeline.py for the pipeline itself): dataset resolution,
deterministic and resumable tf.data streams, augmentation and conversion tools. This
file only re-exports."""

from efficientnet_advprop.data import autoaugment, preprocessing
from efficientnet_advprop.data.pipeline import (
    DatasetInfo,
    resolve_dataset,
    make_dataset,
    make_skip_counter,
    EMBEDDED_DIR,
    AUGMENTATIONS,
    AUTO_AUGMENTS,
    EXTRA_VIEWS,
    EXTRA_VIEW_KEYS,
)
from efficientnet_advprop.data.autoaugment import (autoaugment_constants,
                                                    distort_image_with_autoaugment,
                                                    distort_image_with_randaugment)
from efficientnet_advprop.data.tfrecord import write_tfrecords

__all__ = [
    "DatasetInfo",
    "resolve_dataset",
    "make_dataset",
    "make_skip_counter",
    "write_tfrecords",
    "EMBEDDED_DIR",
    "AUGMENTATIONS",
    "AUTO_AUGMENTS",
    "EXTRA_VIEWS",
    "EXTRA_VIEW_KEYS",
    "autoaugment_constants",
    "distort_image_with_autoaugment",
    "distort_image_with_randaugment",
    "autoaugment",
    "preprocessing",
]
