"""Images/s of training steps: every recipe vs vanilla vs keras.applications.

    python scripts/benchmark.py                          # b0 at 224 and 32 pixels
    python scripts/benchmark.py --image_sizes=32 --steps=20 --batch_size=64
    python scripts/benchmark.py --image_sizes=32 --configs=all   # every recipe
    python scripts/benchmark.py --image_sizes=32 --configs=vanilla,advprop_pgd1 \
        --jit_compile                       # XLA (main.py's default off on CPUs)
    python scripts/benchmark.py --precision=bfloat16   # mixed precision

Every configuration runs in the same Trainer loop (same optimizer, EMA, weight decay,
tf.distribute default strategy) on in-memory random images, so the figures measure the
train step, not the input pipeline. The first `--warmup` steps (tracing) are not timed.
The configurations of one resolution are built first and then timed in turn, `--repeats`
rounds of `--steps` steps each; the median round is reported, so drift of a shared
machine falls on all of them alike (single runs on a 2-core CPU vary by about 10%).
Configurations: keras_applications (keras.applications.EfficientNetB0, vanilla recipe),
vanilla, advprop_pgdK (AdvProp with PGD-K), and every other --recipe name with the
paper's own attack (nofrost: PGD-10, mbn_at: PGD-30, trades/fat: PGD-10, fast_advprop:
p_adv 0.2, K = 1, shuffle-BN groups of 16 where the batch gives two, else the largest
size below that does), all on the same model. "all" selects all of them. The batch is the
number of images drawn per step for every configuration, so the step-time ratio to
vanilla is the cost per epoch at the same number of images.
Targets: our vanilla step at least as fast as keras.applications EfficientNetB0 in the
same loop; AdvProp PGD-K no slower than (K + 2) x vanilla; Fast AdvProp at most 1.3x
(its cost model says 1 + p_adv * K = 1.2x, before the budget calibration that makes its
run cost what vanilla's does).
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("model_name", "efficientnet-b0", "Model to benchmark.")
flags.DEFINE_list("image_sizes", ["224", "32"], "Resolutions.")
flags.DEFINE_list("configs", ["keras_applications", "vanilla", "advprop_pgd1",
                              "advprop_pgd5"], "What to time (see the module docstring; "
                  "'all' = every recipe).")
flags.DEFINE_integer("batch_size", 32, "Global batch size (clean images per step).")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, allocation).")
flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds; the median is reported.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"],
                  "Compute precision of the models (as main.py --precision).")
flags.DEFINE_string("output", None, "Also write the results as JSON here.")


def make_config(name):
    """-> (recipe name, attack epsilon or None, uses keras.applications)."""
    from efficientnet_advprop.tools.benchmarking import parse_config

    try:
        return parse_config(name)
    except ValueError as e:
        raise app.UsageError(f"--configs: {e}") from None


def time_resolution(image_size, configs):
    from efficientnet_advprop.tools import benchmarking
    from efficientnet_advprop.training import set_global_seed

    set_global_seed(0)  # once: see benchmarking.build_config
    with tempfile.TemporaryDirectory() as tmp:
        built = [benchmarking.build_config(
            name, model_name=FLAGS.model_name, image_size=image_size,
            batch_size=FLAGS.batch_size, model_dir=os.path.join(tmp, name),
            jit_compile=FLAGS.jit_compile, precision=FLAGS.precision,
            warmup=FLAGS.warmup) for name in configs]
        timings = benchmarking.time_interleaved(built, FLAGS.repeats, FLAGS.steps)
        rows = benchmarking.step_rows(built, timings)
    for row in rows:
        print(f"{row['config']:>20s} {image_size:4d}px  {row['images_per_second']:8.1f} "
              f"img/s  {row['seconds_per_step']:.3f} s/step", file=sys.stderr)
    return rows


def _ratio(value):
    return "n/a" if value is None else f"{value:.2f}"


def main(argv):
    del argv
    import tensorflow as tf

    from efficientnet_advprop.tools.benchmarking import all_configs, target_verdict

    configs = all_configs() if FLAGS.configs == ["all"] else FLAGS.configs
    for name in configs:
        make_config(name)  # a bad name fails before anything is built
    results = []
    for size in (int(s) for s in FLAGS.image_sizes):
        results += time_resolution(size, configs)
    device = tf.config.list_logical_devices()[0].device_type
    print(f"\n{FLAGS.model_name}, batch {FLAGS.batch_size}, {device}, "
          f"{os.cpu_count()} CPU cores, jit_compile={FLAGS.jit_compile}, "
          f"precision={FLAGS.precision}, median of "
          f"{FLAGS.repeats} rounds of {FLAGS.steps} steps\n")
    print("| config | pixels | img/s | s/step | / vanilla | / keras.apps | cost model | "
          "target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")

    for row in results:
        ratio, ratio_keras = row["ratio_to_vanilla"], row["ratio_to_reference"]
        print(f"| {row['config']} | {row['image_size']} | {row['images_per_second']:.1f} | "
              f"{row['seconds_per_step']:.3f} | {_ratio(ratio)} | {_ratio(ratio_keras)} | "
              f"{row['cost_model_passes']:g} | {target_verdict(row)} |")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
