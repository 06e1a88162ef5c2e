"""Input pipelines (see data/pipeline.py for the pipeline itself): dataset resolution,
deterministic and resumable tf.data streams, augmentation and conversion tools. This
file only re-exports.

The re-exports are resolved on first use (PEP 562 module ``__getattr__``): the
tf.data pipeline imports TensorFlow, and the TensorFlow-free modules of this package
(``numpy_input``, ``tfrecord_lite``, ``image_folder_scan``, ``cifar_tar``) must import
where TensorFlow is absent. ``from efficientnet_advprop.data import make_dataset`` and
``efficientnet_advprop.data.make_dataset`` work exactly as before.
"""

import importlib

__all__ = [
    "DatasetInfo",
    "resolve_dataset",
    "make_dataset",
    "InputOptions",
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

# name -> (module holding it, attribute name in that module or None for the module).
_LAZY = {
    "DatasetInfo": ("pipeline", "DatasetInfo"),
    "resolve_dataset": ("pipeline", "resolve_dataset"),
    "make_dataset": ("pipeline", "make_dataset"),
    "InputOptions": ("pipeline", "InputOptions"),
    "make_skip_counter": ("pipeline", "make_skip_counter"),
    "EMBEDDED_DIR": ("pipeline", "EMBEDDED_DIR"),
    "AUGMENTATIONS": ("pipeline", "AUGMENTATIONS"),
    "AUTO_AUGMENTS": ("pipeline", "AUTO_AUGMENTS"),
    "EXTRA_VIEWS": ("pipeline", "EXTRA_VIEWS"),
    "EXTRA_VIEW_KEYS": ("pipeline", "EXTRA_VIEW_KEYS"),
    "autoaugment_constants": ("autoaugment", "autoaugment_constants"),
    "distort_image_with_autoaugment": ("autoaugment", "distort_image_with_autoaugment"),
    "distort_image_with_randaugment": ("autoaugment", "distort_image_with_randaugment"),
    "write_tfrecords": ("tfrecord", "write_tfrecords"),
    "autoaugment": ("autoaugment", None),
    "preprocessing": ("preprocessing", None),
}


def __getattr__(name):
    if name not in _LAZY:
        # AttributeError also lets `from efficientnet_advprop.data import <submodule>`
        # fall back to importing the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
