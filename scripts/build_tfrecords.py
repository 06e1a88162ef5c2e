"""Converts an image folder or a prepared TFDS split to the official TFRecord layout.

The output directory then works as ``--data_dir`` (``--dataset=imagenet``):
``train-*`` / ``validation-*`` shards of tf.train.Example protos with the JPEG
bytes, labels stored 1..num_classes (the official convention; the reader
subtracts 1), the class name, height, width and source file name, plus
``dataset_info.json`` (class names, per-file record counts).  JPEG sources are
copied byte for byte; other images (PNG, BMP, GIF, TFDS PNGs) are re-encoded
as JPEG at quality 95, which is lossy, and counted in the summary.  Image folders are
shuffled with --seed before sharding (example i goes to shard i % num_shards);
nothing is held out (read the result with holdout_shards for that).  See
efficientnet_advprop/data/convert.py.

Usage (from the repository root):

  # DIR/train/<class>/*.jpg (+ DIR/validation/<class>/*) -> train (+ validation)
  python scripts/build_tfrecords.py --input_dir=DIR --output_dir=OUT --num_shards=64
  # A flat DIR/<class>/* folder -> one split
  python scripts/build_tfrecords.py --input_dir=DIR --output_dir=OUT \\
      --split_name=validation
  # A prepared TFDS dataset (never downloaded)
  python scripts/build_tfrecords.py --tfds_name=cifar10 --tfds_split=train \\
      --tfds_eval_split=test --tfds_data_dir=~/tensorflow_datasets --output_dir=OUT

The output directory must be new or empty; files are written to a hidden
sibling directory renamed to --output_dir when complete.  Bad input prints one
line ``build_tfrecords.py: error: ...`` and exits with status 2.  A progress
bar goes to stderr; the last stdout line is the summary (images, shards, bytes).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

PROG = "build_tfrecords.py"
FLAGS = flags.FLAGS
flags.DEFINE_string("input_dir", None, "Image folder: DIR/<class>/* or DIR/train/<class>/* "
                    "(+ DIR/validation/<class>/*).")
flags.DEFINE_string("tfds_name", None, "Prepared TFDS dataset to convert instead.")
flags.DEFINE_string("tfds_split", "train", "TFDS split written as --split_name.")
flags.DEFINE_string("tfds_eval_split", None, "Optional TFDS split written as validation.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory (default "
                    "~/tensorflow_datasets).")
flags.DEFINE_string("output_dir", None, "New or empty output directory.")
flags.DEFINE_integer("num_shards", None, "Shard files of the train (or only) split; "
                     "default one per 128 MiB of images.")
flags.DEFINE_integer("num_eval_shards", None, "Shard files of the validation split next "
                     "to a train split; default one per 128 MiB.")
flags.DEFINE_enum("split_name", None, ["train", "validation"], "Split of a flat "
                  "DIR/<class>/ folder or of --tfds_split (default train).")
flags.DEFINE_bool("compress", False, "GZIP-compress the TFRecord files.")
flags.DEFINE_bool("shuffle", True, "Shuffle image-folder files (with --seed) before "
                  "sharding.")
flags.DEFINE_integer("seed", 0, "Shuffle seed.")
flags.DEFINE_bool("progress", True, "Progress bar on stderr.")


def _fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def _precheck(argv):
    """Cheap checks before TensorFlow is imported (its import logs to stderr)."""
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.input_dir) == bool(FLAGS.tfds_name):
        _fail("give exactly one of --input_dir=DIR and --tfds_name=NAME")
    for flag in ("num_shards", "num_eval_shards"):
        value = getattr(FLAGS, flag)
        if value is not None and value < 1:
            _fail(f"--{flag}={value}: must be >= 1")
    if not FLAGS.output_dir:
        _fail("--output_dir is required")
    out = FLAGS.output_dir
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        _fail(f"--output_dir={out}: exists and is not an empty directory; choose a new "
              "or empty directory")
    if FLAGS.input_dir:
        d = FLAGS.input_dir
        if not os.path.isdir(d):
            what = "is not a directory" if os.path.exists(d) else "does not exist"
            _fail(f"--input_dir={d}: directory {what}")
        if not os.listdir(d):
            _fail(f"--input_dir={d}: directory is empty")
    elif FLAGS.tfds_data_dir and not os.path.isdir(os.path.expanduser(FLAGS.tfds_data_dir)):
        _fail(f"--tfds_data_dir={FLAGS.tfds_data_dir}: directory does not exist")


def _import_convert():
    """Imports the converter with stderr silenced (TensorFlow's start-up log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        from efficientnet_advprop.data import convert  # pylint: disable=g-import-not-at-top
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return convert


def main(argv):
    _precheck(argv)
    convert = _import_convert()
    logging.set_verbosity(logging.ERROR)  # TFDS warnings would break the one-line errors.
    try:
        if FLAGS.input_dir:
            summary = convert.convert_image_folder(
                FLAGS.input_dir, FLAGS.output_dir, FLAGS.num_shards,
                num_eval_shards=FLAGS.num_eval_shards, split_name=FLAGS.split_name,
                compress=FLAGS.compress, shuffle=FLAGS.shuffle, seed=FLAGS.seed,
                progress=FLAGS.progress)
        else:
            data_dir = FLAGS.tfds_data_dir
            summary = convert.convert_tfds(
                FLAGS.tfds_name, FLAGS.output_dir, FLAGS.num_shards,
                split=FLAGS.tfds_split,
                data_dir=os.path.expanduser(data_dir) if data_dir else None,
                split_name=FLAGS.split_name or "train", eval_split=FLAGS.tfds_eval_split,
                num_eval_shards=FLAGS.num_eval_shards, compress=FLAGS.compress,
                progress=FLAGS.progress)
    except (ValueError, OSError) as e:
        text = str(e).strip()
        _fail(text.splitlines()[0] if text else type(e).__name__)
    print(summary.line())


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
