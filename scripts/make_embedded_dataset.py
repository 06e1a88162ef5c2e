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
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DEFAULT_SOURCE = os.path.join(
    os.path.dirname(REPO_ROOT), "shared", "data", "cifar10-train-jpeg.tar.gz"
)
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "efficientnet_advprop", "data", "embedded")

from efficientnet_advprop.data.cifar_tar import read_tar, select, write_split  # noqa: E402


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

    images = read_tar(args.source)
    class_names, train, evals = select(
        images, args.train_per_class, args.eval_per_class, args.seed
    )
    write_split(images, class_names, train, evals, args.output_dir,
                train_shards=args.train_shards, eval_shards=args.eval_shards,
                compression=args.compression,
                description=f"embedded default: {args.train_per_class} train + "
                            f"{args.eval_per_class} held-out per class, seed {args.seed}")

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
