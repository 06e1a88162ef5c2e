"""Builds the embedded default dataset (efficientnet_advprop/data/embedded).

Draws a deterministic, class-balanced, disjoint subset of the CIFAR-10
training images from a tar.gz of JPEGs laid out as
``train/<classname>/<NNNN>.jpg`` and writes it in the official ImageNet
TFRecord layout (labels stored 1..10, image/class/text = class name), keeping
the original JPEG bytes.  Files are GZIP-compressed TFRecords (the reader
detects this) so the package data stays small.

Usage (from the repository root):

  PYTHONPATH=. python scripts/make_embedded_dataset.py \
      --source=../shared/data/cifar10-train-jpeg.tar.gz \
      --output_dir=efficientnet_advprop/data/embedded \
      --train_per_class=1500 --eval_per_class=200 --seed=0
"""

import argparse
import os
import random
import struct
import sys
import tarfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DEFAULT_SOURCE = os.path.join(
    os.path.dirname(REPO_ROOT), "shared", "data", "cifar10-train-jpeg.tar.gz"
)
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "efficientnet_advprop", "data", "embedded")


def read_tar(source):
    """{class_name: {file_name: jpeg bytes}} from the tar.gz."""
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
        if marker in (
            0xC0,
            0xC1,
            0xC2,
            0xC3,
            0xC5,
            0xC6,
            0xC7,
            0xC9,
            0xCA,
            0xCB,
            0xCD,
            0xCE,
            0xCF,
        ):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return h, w
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        i += 2 + length
    raise ValueError("no SOF marker in JPEG")


def select(images, train_per_class, eval_per_class, seed):
    """Deterministic disjoint per-class draw; returns (train, eval) lists."""
    class_names = sorted(images)
    rng = random.Random(seed)
    train, evals = [], []
    for label, cls in enumerate(class_names):
        names = sorted(images[cls])
        if len(names) < train_per_class + eval_per_class:
            raise ValueError(f"class {cls}: only {len(names)} images")
        rng.shuffle(names)
        for n in names[:train_per_class]:
            train.append((cls, n, label))
        for n in names[train_per_class : train_per_class + eval_per_class]:
            evals.append((cls, n, label))
    rng.shuffle(train)
    rng.shuffle(evals)
    return class_names, train, evals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT)
    parser.add_argument("--train_per_class", type=int, default=1500)
    parser.add_argument("--eval_per_class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_shards", type=int, default=2)
    parser.add_argument("--eval_shards", type=int, default=1)
    parser.add_argument(
        "--compression", default="GZIP", help='"GZIP" or "" (plain TFRecord)'
    )
    args = parser.parse_args(argv)

    # pylint: disable=g-import-not-at-top
    from efficientnet_advprop.data.tfrecord import write_tfrecords

    images = read_tar(args.source)
    class_names, train, evals = select(
        images, args.train_per_class, args.eval_per_class, args.seed
    )

    def examples(items):
        for cls, name, label in items:
            data = images[cls][name]
            h, w = jpeg_size(data)
            yield {
                "image": data,
                "label": label,
                "text": cls,
                "height": h,
                "width": w,
                "format": "JPEG",
            }

    write_tfrecords(
        examples(train),
        args.output_dir,
        "train",
        args.train_shards,
        compression=args.compression,
        class_names=class_names,
    )
    write_tfrecords(
        examples(evals),
        args.output_dir,
        "validation",
        args.eval_shards,
        compression=args.compression,
        class_names=class_names,
    )
    total = sum(
        os.path.getsize(os.path.join(args.output_dir, f))
        for f in os.listdir(args.output_dir)
    )
    print(
        f"wrote {len(train)} train + {len(evals)} validation examples "
        f"({len(class_names)} classes) to {args.output_dir}: {total} bytes"
    )


if __name__ == "__main__":
    main()
