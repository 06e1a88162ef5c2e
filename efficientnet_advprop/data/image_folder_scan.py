"""Image-folder layouts: class listing and the train/eval split, without TensorFlow.

The directory scanning of :mod:`efficientnet_advprop.data.image_folder` (which
re-exports everything here and adds the tf.data reader), kept free of TensorFlow so
that :mod:`efficientnet_advprop.data.numpy_input` can read the same folders with the
same class ids and the same per-class holdout.

Layouts (class ids = sorted class folder names of the training folder):

* ``data_dir/train/<class>/*.jpg`` plus ``data_dir/validation/<class>/*``
  (``val/`` or ``test/`` are accepted too);
* ``data_dir/train/<class>/*`` alone, or ``data_dir/<class>/*`` directly:
  a deterministic per-class holdout of :data:`HOLDOUT_FRACTION` of the
  images (at least one per class with >= 2 images) becomes the eval split.

Files are listed in sorted (class, file name) order.
"""

import functools
import os
import random

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
EVAL_DIRS = ("validation", "val", "test")
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0


def _images_in(path):
    return sorted(
        f
        for f in os.listdir(path)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
    )


def _class_dirs(path):
    if not os.path.isdir(path):
        return []
    return sorted(
        d
        for d in os.listdir(path)
        if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
    )


def has_layout(data_dir):
    """True when data_dir/train/ has class subfolders."""
    return bool(_class_dirs(os.path.join(data_dir, "train")))


@functools.lru_cache(maxsize=8)
def scan(data_dir):
    """Returns (class_names, train list, eval list); lists of (path, label)."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir}: directory does not exist")
    train_dir = os.path.join(data_dir, "train")
    if not _class_dirs(train_dir):
        train_dir = data_dir
    class_names = tuple(
        c for c in _class_dirs(train_dir) if c not in EVAL_DIRS or train_dir != data_dir
    )
    if not class_names:
        raise ValueError(f"--data_dir={data_dir}: no train/<class>/ image folders " "found")
    index = {c: i for i, c in enumerate(class_names)}

    def listing(root):
        out = []
        for c in class_names:
            d = os.path.join(root, c)
            if os.path.isdir(d):
                out.extend((os.path.join(d, f), index[c]) for f in _images_in(d))
        return out

    train = listing(train_dir)
    eval_dir = None
    if train_dir != data_dir:
        for name in EVAL_DIRS:
            if _class_dirs(os.path.join(data_dir, name)):
                eval_dir = os.path.join(data_dir, name)
                break
    if eval_dir is not None:
        extra = set(_class_dirs(eval_dir)) - set(class_names)
        if extra:
            raise ValueError(
                f"--data_dir={data_dir}: {eval_dir} has classes not in "
                f"the training folder: {sorted(extra)}"
            )
        evals = listing(eval_dir)
    else:
        train, evals = _holdout(train, len(class_names))
    if not train:
        raise ValueError(f"--data_dir={data_dir}: no images found in {train_dir}")
    return class_names, train, evals


def _holdout(items, num_classes):
    per_class = [[] for _ in range(num_classes)]
    for item in items:
        per_class[item[1]].append(item)
    rng = random.Random(HOLDOUT_SEED)
    held = set()
    for group in per_class:
        paths = [p for p, _ in group]
        rng.shuffle(paths)
        k = int(round(HOLDOUT_FRACTION * len(paths)))
        if len(paths) >= 2:
            k = max(k, 1)
        held.update(paths[:k])
    train = [it for it in items if it[0] not in held]
    evals = [it for it in items if it[0] in held]
    return train, evals
