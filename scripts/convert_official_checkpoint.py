"""Converts an official TF1 EfficientNet checkpoint into this project's ``.keras`` model.

    python scripts/convert_official_checkpoint.py \
        --checkpoint=/ckpts/advprop/efficientnet-b0 --model_name=efficientnet-b0 \
        --output=/models/efficientnet-b0-advprop.keras

EMA shadows (``<name>/ExponentialMovingAverage``) are used where present, as the
official evaluation does. The model is built with the preprocessing the checkpoint was
trained with, recorded in its ``input_normalization`` layer: "advprop" ([-1, 1]) for
AdvProp checkpoints, "imagenet" (mean/std) for the others. The checkpoints do not
record it: pass --advprop / --noadvprop, or leave it out to use the release convention
(AdvProp checkpoints sit in directories named ``advprop`` / ``efficientnet-bN-advprop``,
so a --checkpoint path containing "advprop" means --advprop).

Errors (missing checkpoint, wrong model name, existing --output) are one line on stderr
with exit status 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("checkpoint", None, "Official checkpoint prefix or directory.")
    flags.DEFINE_string("model_name", None,
                        "efficientnet-b0 ... (default: the checkpoint's scope).")
    flags.DEFINE_bool("advprop", None,
                      "The checkpoint expects [-1, 1] inputs (default: whether the "
                      "--checkpoint path contains 'advprop').")
    flags.DEFINE_integer("num_classes", None,
                         "Classes (default: from the checkpoint's dense kernel).")
    flags.DEFINE_integer("image_size", None, "Input resolution (default: the model's).")
    flags.DEFINE_bool("prefer_ema", True, "Use the EMA shadows when present.")
    flags.DEFINE_string("output", None, "The .keras file to write (must not exist).")


def convert(checkpoint, model_name=None, output=None, advprop=None, num_classes=None,
            image_size=None, prefer_ema=True):
    """Runs the conversion; returns (model, report). Raises ValueError and friends."""
    from efficientnet_advprop.models.weights import convert_official_checkpoint

    return convert_official_checkpoint(checkpoint, model_name=model_name, output=output,
                                       advprop=advprop, num_classes=num_classes,
                                       image_size=image_size, prefer_ema=prefer_ema)


def _fail(message):
    print(f"convert_official_checkpoint: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if not FLAGS.checkpoint:
        _fail("--checkpoint is required")
    if not FLAGS.output:
        _fail("--output is required")
    if os.path.exists(FLAGS.output):
        _fail(f"--output={FLAGS.output} exists; choose a new path")
    try:
        _, report = convert(FLAGS.checkpoint, FLAGS.model_name, FLAGS.output,
                            FLAGS.advprop, FLAGS.num_classes, FLAGS.image_size,
                            FLAGS.prefer_ema)
    except (ValueError, FileExistsError) as e:
        _fail(str(e).splitlines()[0])
    print(f"wrote {report['output']}: {report['scope']}, preprocessing "
          f"{report['preprocessing']}, {len(report['loaded'])} layers, {report['ema']} "
          f"EMA shadows")


if __name__ == "__main__":
    define_flags()
    app.run(main)
