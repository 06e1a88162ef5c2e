"""Images/s of the training input pipeline alone (make_dataset, is_training=True).

    python scripts/benchmark_input.py                         # embedded set, 32 px
    python scripts/benchmark_input.py --auto_augment=none,v0,randaugment
    python scripts/benchmark_input.py --data_dir=/data/imagenet-tfrecords  # 224 px
    python scripts/benchmark_input.py --data_dir=/data/pets --image_size=260 --steps=100

Without --data_dir the embedded CIFAR-10 subset is read at 32 px with the "cifar"
augmentation; with --data_dir (a TFRecord dir in the official layout, an image
folder, or --dataset=tfds:NAME) at 224 px with the "inception" crop.  Each
--auto_augment value is one configuration: the dataset is built and its iterator
created, --warmup batches are drawn (tf.data autotuning, thread start-up), then
--steps batches are timed and nothing else is done with them, so the figure is the
pipeline's throughput with no model attached.  Only the iteration is timed;
construction + warm-up is reported separately as setup_s.  One Markdown table row per
configuration goes to stdout (header first).  On a shared machine the figures move
with its load: compare rows of one run.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Data directory; default: the embedded set.")
flags.DEFINE_string("dataset", None, "As main.py's --dataset (e.g. tfds:NAME); default: "
                    "detected from --data_dir.")
flags.DEFINE_integer("image_size", None, "Output size; default 32 (embedded) or 224.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("steps", 50, "Timed batches per configuration.")
flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
flags.DEFINE_list("auto_augment", ["none"], "Configurations: none, v0, randaugment.")
flags.DEFINE_string("augmentation", None, "Crop/flip augmentation; default cifar "
                    "(embedded) or inception.")
flags.DEFINE_integer("holdout_shards", None, "Read the train split of a TFRecord dir "
                     "without its last N train-* files.")
flags.DEFINE_integer("seed", 0, "Run seed.")
flags.DEFINE_integer("threads", None, "tf.data threads (a private pool); default: the "
                     "shared pool over every core. 1 gives the images/s of one core.")


def _fail(message):
    print(f"benchmark_input.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    for flag in ("batch_size", "steps"):
        if getattr(FLAGS, flag) < 1:
            _fail(f"--{flag}={getattr(FLAGS, flag)}: must be >= 1")
    if FLAGS.threads is not None and FLAGS.threads < 1:
        _fail(f"--threads={FLAGS.threads}: must be >= 1")
    if FLAGS.warmup < 0:
        _fail(f"--warmup={FLAGS.warmup}: must be >= 0")
    for value in FLAGS.auto_augment:
        if value not in ("none", "v0", "randaugment"):
            _fail(f"--auto_augment={value}: expected none, v0 or randaugment")

    from efficientnet_advprop import data  # pylint: disable=g-import-not-at-top
    from efficientnet_advprop.tools.benchmarking import measure_input

    try:
        info = data.resolve_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.holdout_shards)
    except ValueError as e:
        _fail(str(e))
    embedded = info.name == "embedded"
    image_size = FLAGS.image_size or (32 if embedded else 224)
    augmentation = FLAGS.augmentation or ("cifar" if embedded else "inception")
    print("| dataset | px | batch | augmentation | auto_augment | steps | images/s | "
          "ms/batch | setup_s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for auto_augment in FLAGS.auto_augment:
        try:
            rate, per_batch, setup = measure_input(
                info, FLAGS.data_dir, image_size=image_size, batch_size=FLAGS.batch_size,
                steps=FLAGS.steps, warmup=FLAGS.warmup, augmentation=augmentation,
                auto_augment=auto_augment, seed=FLAGS.seed, threads=FLAGS.threads)
        except ValueError as e:
            _fail(str(e))
        print(f"| {info.name} | {image_size} | {FLAGS.batch_size} | {augmentation} | "
              f"{auto_augment} | {FLAGS.steps} | {rate:,.0f} | {per_batch * 1e3:.1f} | "
              f"{setup:.1f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
