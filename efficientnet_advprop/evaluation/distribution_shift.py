"""Distribution-shift evaluation: ImageNet-C mCE, ImageNet-A/R class subsets, readers.

Public API::

  mean_corruption_error(errors, baseline=None)   # -> {"mce", "mce_unnormalized", ...}
  alexnet_errors()                                # ImageNet-C AlexNet errors (15)
  imagenet_wnids()                                # the 1000 ImageNet-1k WordNet IDs, sorted
  imagenet_a_wnids(), imagenet_a_indices()        # ImageNet-A's 200 classes
  imagenet_r_wnids(), imagenet_r_indices()        # ImageNet-R's 200 classes
  class_subset_logits(logits, indices)            # keep the 200 logits
  label_map_for_subset(indices), subset_labels(labels, indices)
  folder_examples(data_dir, labels="auto")        # (paths, labels, class_names)
  shift_dataset(name, data_dir, batch_size=..., image_size=..., ...)

Class indices. ImageNet-1k class i is the i-th WordNet ID in sorted order; that is
TFDS' imagenet2012 label order (``tensorflow_datasets/datasets/imagenet2012/
labels.txt``, read from the installed package, which is where ``imagenet_wnids``
comes from) and the order of the Keras/official ImageNet checkpoints. TFDS'
imagenet_a, imagenet_r and imagenet_sketch use the same 1000-class label ids.
ImageNet-A and ImageNet-R contain only 200 classes; their evaluation (Hendrycks et
al.) keeps those 200 logits and takes the arg-max among them, so a model is never
wrong by predicting one of the 800 absent classes. ``class_subset_logits`` does that,
and ``subset_labels`` turns 1000-class labels into positions 0..199 of the subset.

Third-party data (``third_party/`` at the repository root, with sources and
licences): ``imagenet_c/alexnet_errors.json`` and ``imagenet_a_r/imagenet_{a,r}.json``.
They are found next to the package in a source checkout or editable install, or
under ``<prefix>/share/efficientnet_advprop/third_party`` when installed as data
files.
"""

import functools
import importlib.util
import json
import math
import os
import pathlib
import site
import sys

import numpy as np
import tensorflow as tf

from efficientnet_advprop.data import corruptions
from efficientnet_advprop.data import image_folder
from efficientnet_advprop.data import preprocessing
from efficientnet_advprop.data import tfds_reader

NUM_IMAGENET_CLASSES = 1000
SHIFT_DATASETS = ("imagenet_a", "imagenet_r", "imagenet_sketch", "stylized_imagenet", "folder")
# TFDS builders of the evaluation sets (Stylized-ImageNet has none); all are "test".
TFDS_NAMES = {"imagenet_a": "imagenet_a", "imagenet_r": "imagenet_r",
              "imagenet_sketch": "imagenet_sketch"}
SOURCES = ("auto", "folder", "tfds")
LABEL_MODES = ("auto", "imagenet", "folder")
_DATA_SUBDIR = os.path.join("share", "efficientnet_advprop", "third_party")
_ALEXNET_FILE = ("imagenet_c", "alexnet_errors.json")


# ---------------------------------------------------------------------------
# Third-party tables
# ---------------------------------------------------------------------------
def third_party_dir():
    """The folder holding the third-party tables (see the module docstring)."""
    candidates = [pathlib.Path(__file__).resolve().parents[2] / "third_party"]
    for prefix in (sys.prefix, site.getuserbase()):
        candidates.append(pathlib.Path(prefix) / _DATA_SUBDIR)
    for path in candidates:
        if path.joinpath(*_ALEXNET_FILE).is_file():
            return path
    raise FileNotFoundError("third_party tables not found; looked in "
                            + ", ".join(str(p) for p in candidates))


@functools.lru_cache(maxsize=None)
def _table(*parts):
    with open(third_party_dir().joinpath(*parts), encoding="utf-8") as f:
        return json.load(f)


def alexnet_errors():
    """{corruption: AlexNet's ImageNet-C top-1 error averaged over the 5 severities}.

    The fifteen values (fractions) that normalise the mean Corruption Error of
    Hendrycks & Dietterich (2019), in CORRUPTIONS order; provenance in
    third_party/imagenet_c/alexnet_errors.json.
    """
    errors = _table(*_ALEXNET_FILE)["errors"]
    return {name: float(errors[name]) for name in corruptions.CORRUPTIONS}


@functools.lru_cache(maxsize=None)
def imagenet_wnids():
    """The 1000 ImageNet-1k WordNet IDs in class-index order (sorted), from TFDS."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tensorflow_datasets is not installed; it ships the "
                                "ImageNet-1k WordNet ID list")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "imagenet2012",
                        "labels.txt")
    with open(path, encoding="utf-8") as f:
        wnids = tuple(line.strip() for line in f if line.strip())
    if len(wnids) != NUM_IMAGENET_CLASSES or list(wnids) != sorted(wnids):
        raise ValueError(f"{path}: expected 1000 sorted WordNet IDs")
    return wnids


def _subset(name, key):
    return tuple(_table("imagenet_a_r", f"{name}.json")[key])


def imagenet_a_wnids():
    """ImageNet-A's 200 WordNet IDs, in ascending class-index order."""
    return _subset("imagenet_a", "wnids")


def imagenet_a_indices():
    """ImageNet-A's 200 classes as ImageNet-1k indices, ascending."""
    return _subset("imagenet_a", "indices")


def imagenet_r_wnids():
    """ImageNet-R's 200 WordNet IDs, in ascending class-index order."""
    return _subset("imagenet_r", "wnids")


def imagenet_r_indices():
    """ImageNet-R's 200 classes as ImageNet-1k indices, ascending."""
    return _subset("imagenet_r", "indices")


_SUBSET_INDICES = {"imagenet_a": imagenet_a_indices, "imagenet_r": imagenet_r_indices}


# ---------------------------------------------------------------------------
# Class subsets
# ---------------------------------------------------------------------------
def _check_indices(indices, num_classes):
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError("indices: expected a non-empty 1-D list of class indices")
    if indices.min() < 0 or indices.max() >= num_classes:
        raise ValueError(f"indices: expected values in [0, {num_classes})")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("indices: contains duplicates")
    return indices.astype(np.int32)


def class_subset_logits(logits, indices):
    """logits[..., indices]: keeps the subset's logits, in the order of `indices`.

    With ImageNet-A/R indices (ascending) column k of the result is subset class k,
    the label that ``subset_labels`` gives.
    """
    logits = tf.convert_to_tensor(logits)
    indices = _check_indices(indices, logits.shape[-1] or NUM_IMAGENET_CLASSES)
    return tf.gather(logits, indices, axis=-1)


def label_map_for_subset(indices, num_classes=NUM_IMAGENET_CLASSES):
    """int32 [num_classes]: position of each class in `indices`, -1 if absent."""
    indices = _check_indices(indices, num_classes)
    label_map = np.full([num_classes], -1, np.int32)
    label_map[indices] = np.arange(len(indices), dtype=np.int32)
    return label_map


def subset_labels(labels, indices, num_classes=NUM_IMAGENET_CLASSES):
    """Maps num_classes-way labels to positions in `indices` (-1: not in the subset)."""
    label_map = tf.constant(label_map_for_subset(indices, num_classes))
    return tf.gather(label_map, tf.cast(labels, tf.int32))


# ---------------------------------------------------------------------------
# Mean Corruption Error
# ---------------------------------------------------------------------------
def _error_list(errors, name, where):
    values = errors[name]
    if isinstance(values, (int, float)):
        values = [values]
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{where}[{name!r}]: expected errors as fractions in [0, 1], "
                         f"got {errors[name]!r}")
    return values


def mean_corruption_error(errors, baseline=None):
    """ImageNet-C's mean Corruption Error (Hendrycks & Dietterich, ICLR 2019).

    For corruption c with top-1 errors E_{s,c} over severities s = 1..5, the
    Corruption Error is CE_c = 100 * sum_s E_{s,c} / sum_s B_{s,c}, the model's
    summed errors normalised by a baseline's (AlexNet in the paper) summed errors;
    mCE is the mean of CE_c over the corruptions. Normalising per corruption weighs
    hard and easy corruptions alike. The unnormalised mCE is the plain mean over
    corruptions of the mean error over severities.

    Args:
      errors: {corruption: [error at severity 1, ..., severity n]}, fractions in
        [0, 1] (a single number counts as one severity). Any corruption names; the
        standard mCE has the 15 of CORRUPTIONS with 5 severities each.
      baseline: None (only the unnormalised mCE), "alexnet" (the published AlexNet
        errors, one severity-averaged value per corruption), or a dict with the
        same keys holding either per-severity lists of the same lengths or one
        severity-averaged number per corruption (then CE_c = 100 * mean_s E / B_c,
        the same ratio).

    Returns:
      {"mce": mean CE in percent (None without baseline),
       "mce_unnormalized": mean over corruptions of the mean error (a fraction),
       "per_corruption": {c: {"mean_error": ..., "ce": percent or None}}}.
    """
    if not isinstance(errors, dict) or not errors:
        raise ValueError("errors: expected a non-empty dict {corruption: [errors]}")
    if isinstance(baseline, str):
        if baseline != "alexnet":
            raise ValueError(f"baseline={baseline!r}: expected None, 'alexnet' or a dict")
        baseline = alexnet_errors()
    elif baseline is not None and not isinstance(baseline, dict):
        raise ValueError(f"baseline: expected None, 'alexnet' or a dict, got "
                         f"{type(baseline).__name__}")
    per_corruption = {}
    for name in errors:
        values = _error_list(errors, name, "errors")
        ce = None
        if baseline is not None:
            if name not in baseline:
                raise ValueError(f"baseline: no entry for corruption {name!r}")
            base = _error_list(baseline, name, "baseline")
            if len(base) == 1:
                base = base * len(values)
            if len(base) != len(values):
                raise ValueError(f"baseline[{name!r}]: {len(base)} severities, errors "
                                 f"have {len(values)}")
            if sum(base) <= 0:
                raise ValueError(f"baseline[{name!r}]: summed errors must be > 0")
            ce = 100.0 * sum(values) / sum(base)
        per_corruption[name] = {"mean_error": sum(values) / len(values), "ce": ce}
    count = len(per_corruption)
    mce = None
    if baseline is not None:
        mce = sum(v["ce"] for v in per_corruption.values()) / count
    return {
        "mce": mce,
        "mce_unnormalized": sum(v["mean_error"] for v in per_corruption.values()) / count,
        "per_corruption": per_corruption,
    }


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------
def folder_examples(data_dir, labels="auto"):
    """Every image of data_dir/<class>/* as (paths, labels, class_names).

    Listed by the project's image-folder reader (sorted class folders, sorted files,
    JPEG/PNG/BMP/GIF). `labels`: "imagenet" -- class folders are WordNet IDs and a
    label is the ImageNet-1k index; "folder" -- the index in the sorted folder names;
    "auto" -- "imagenet" when every folder is one of the 1000 WordNet IDs. The
    folder must hold the class folders itself (e.g. imagenet-a/, sketch/, or
    Stylized-ImageNet's val/), not train/ and val/ splits.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels={labels!r}: expected one of {', '.join(LABEL_MODES)}")
    data_dir = os.fspath(data_dir)
    if image_folder.has_layout(data_dir):
        raise ValueError(f"data_dir={data_dir}: has train/ class folders; pass the "
                         "folder whose subfolders are the classes (e.g. its val/)")
    class_names, train, evals = image_folder.scan(data_dir)
    items = sorted(train + evals)
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    if labels == "auto":
        labels = "imagenet" if all(c in wnid_index for c in class_names) else "folder"
    if labels == "imagenet":
        unknown = [c for c in class_names if c not in wnid_index]
        if unknown:
            raise ValueError(f"data_dir={data_dir}: class folders that are not ImageNet "
                             f"WordNet IDs: {unknown[:5]}")
        to_label = [wnid_index[c] for c in class_names]
    else:
        to_label = list(range(len(class_names)))
    return [p for p, _ in items], [to_label[l] for _, l in items], tuple(class_names)


def _check_source(name, data_dir, source):
    if name not in SHIFT_DATASETS:
        raise ValueError(f"name={name!r}: expected one of {', '.join(SHIFT_DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {', '.join(SOURCES)}")
    if source == "auto":
        has_folders = bool(data_dir) and os.path.isdir(data_dir) and any(
            entry.is_dir() for entry in os.scandir(data_dir))
        source = "folder" if has_folders or name not in TFDS_NAMES else "tfds"
    if source == "tfds" and name not in TFDS_NAMES:
        raise ValueError(f"name={name!r}: no TFDS dataset; use source='folder'")
    if source == "folder" and not data_dir:
        raise ValueError(f"name={name!r}: source='folder' needs data_dir")
    return source


def shift_dataset(name, data_dir=None, *, batch_size, image_size,
                  augmentation="inception", subset=False, source="auto"):
    """Batched (images float32 [B, S, S, 3] in [0, 255], labels int32 [B]) of an
    out-of-distribution evaluation set, one pass in file order.

    Args:
      name: "imagenet_a", "imagenet_r", "imagenet_sketch", "stylized_imagenet"
        (Geirhos et al.; a folder of <wnid>/ images, no TFDS) or "folder" (any
        image folder).
      data_dir: for source "folder", the folder of class subfolders (see
        ``folder_examples``); for "tfds", the TFDS data directory (None: TFDS'
        default). Nothing is downloaded: a missing TFDS dataset is a one-line
        ValueError naming it.
      batch_size, image_size: batch size and output side S.
      augmentation: eval preprocessing of the project ("inception": centre crop
        with 32 pixels of padding, i.e. crop S / (S + 32) of the shorter side --
        the 224/256 crop of the ImageNet-A/R reference code at S = 224 -- then
        bicubic resize; "none"/"cifar": resize the whole image).
      subset: imagenet_a / imagenet_r only: labels become positions 0..199 in the
        dataset's class subset (pair with ``class_subset_logits``); otherwise
        labels are ImageNet-1k indices (sorted WordNet IDs), or folder indices for
        a "folder" dataset whose folders are not WordNet IDs.
      source: "auto" (a folder when data_dir has subfolders or the dataset has no
        TFDS builder, else TFDS), "folder" or "tfds".
    """
    source = _check_source(name, data_dir, source)
    preprocessing.check_augmentation(augmentation)
    if int(batch_size) < 1 or int(image_size) < 1:
        raise ValueError(f"batch_size={batch_size}, image_size={image_size}: must be "
                         "positive")
    if subset and name not in _SUBSET_INDICES:
        raise ValueError(f"subset=True: only for imagenet_a and imagenet_r, not {name}")
    label_map = None
    if subset:
        label_map = label_map_for_subset(_SUBSET_INDICES[name]())
    if source == "folder":
        mode = "auto" if name == "folder" else "imagenet"
        paths, labels, _ = folder_examples(data_dir, labels=mode)
        if label_map is not None:
            labels = [int(label_map[l]) for l in labels]
            if min(labels) < 0:
                raise ValueError(f"data_dir={data_dir}: has classes outside {name}'s "
                                 "200-class subset")
        ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
        ds = ds.map(lambda path, label: (tf.io.read_file(path), label))
    else:
        spec = f"tfds:{TFDS_NAMES[name]}:test:test"
        reader = tfds_reader.make_source(spec, data_dir, "eval")
        ds = reader.stream_fn(None).map(reader.element_fn)
        if label_map is not None:
            label_map = tf.constant(label_map)
            ds = ds.map(lambda image, label: (image, tf.gather(label_map, label)))

    def process(image_bytes, label):
        image = preprocessing.preprocess_for_eval(image_bytes, int(image_size), augmentation)
        return image, tf.cast(label, tf.int32)

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)
