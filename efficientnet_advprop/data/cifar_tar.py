"""The shared CIFAR-10 training images (a tar.gz of ``train/<class>/<name>.jpg``) and
the fixed splits this project draws from them.

`read_tar` loads the JPEG bytes; `select` draws a deterministic, class-balanced pair
of disjoint lists; `write_split` writes one such pair in the official TFRecord layout
(labels stored 1..10, the JPEG bytes unchanged), so the result works as a --data_dir.
The embedded default dataset (scripts/make_embedded_dataset.py) and the claims suite's
45,000 / 5,000 split (efficientnet_advprop.claims) are both made this way.
"""

import hashlib
import json
import os
import random
import struct
import tarfile

SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB,
                         0xCD, 0xCE, 0xCF))
SPLIT_FILE = "split.json"


def read_tar(source):
    """{class_name: {file_name: jpeg bytes}} from the tar.gz (``*/train/<class>/*.jpg``)."""
    images = {}
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg")):
                continue
            parts = member.name.strip("./").split("/")
            if len(parts) < 3 or parts[-3] != "train":
                continue
            cls, fname = parts[-2], parts[-1]
            images.setdefault(cls, {})[fname] = tar.extractfile(member).read()
    return images


def jpeg_size(data):
    """(height, width) from the JPEG SOF marker."""
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in SOF_MARKERS:
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return h, w
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        i += 2 + length
    raise ValueError("no SOF marker in JPEG")


def select(images, train_per_class, eval_per_class, seed, eval_first=False):
    """Deterministic disjoint per-class draw -> (class_names, train, evals), each list
    of (class, file name, label), both shuffled with `seed`.

    Per class the sorted file names are shuffled with one `random.Random(seed)`; the
    train images are the first `train_per_class` and the held-out ones the next
    `eval_per_class` (with `eval_first`, the held-out ones come first: the claims
    split, whose held-out part then does not depend on how many images are trained on).
    A train_per_class of None takes every image left.
    """
    class_names = sorted(images)
    rng = random.Random(seed)
    train, evals = [], []
    for label, cls in enumerate(class_names):
        names = sorted(images[cls])
        wanted = (train_per_class or 0) + eval_per_class
        if len(names) < wanted:
            raise ValueError(f"class {cls}: only {len(names)} images, {wanted} wanted")
        rng.shuffle(names)
        if eval_first:
            held, rest = names[:eval_per_class], names[eval_per_class:]
        else:
            rest, held = names, names[train_per_class:train_per_class + eval_per_class]
        for n in rest[:train_per_class]:
            train.append((cls, n, label))
        for n in held:
            evals.append((cls, n, label))
    rng.shuffle(train)
    rng.shuffle(evals)
    return class_names, train, evals


def names_digest(items):
    """sha256 of the sorted "class/name" lines of a split: its identity."""
    lines = sorted(f"{cls}/{name}" for cls, name, _ in items)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write_split(images, class_names, train, evals, output_dir, *, train_shards,
                eval_shards, compression="", description=None):
    """Writes the two lists to `output_dir` (train-*, validation-*, dataset_info.json)
    and `split.json` (the rule, the counts and each list's digest). Returns that dict."""
    from efficientnet_advprop.data.tfrecord import write_tfrecords

    def examples(items):
        for cls, name, label in items:
            data = images[cls][name]
            h, w = jpeg_size(data)
            yield {"image": data, "label": label, "text": cls, "height": h, "width": w,
                   "format": "JPEG", "filename": f"train/{cls}/{name}"}

    write_tfrecords(examples(train), output_dir, "train", train_shards,
                    compression=compression, class_names=class_names)
    write_tfrecords(examples(evals), output_dir, "validation", eval_shards,
                    compression=compression, class_names=class_names)
    split = {"description": description, "num_train": len(train),
             "num_held_out": len(evals), "train_sha256": names_digest(train),
             "held_out_sha256": names_digest(evals)}
    with open(os.path.join(output_dir, SPLIT_FILE), "w") as f:
        json.dump(split, f, indent=1)
        f.write("\n")
    return split
