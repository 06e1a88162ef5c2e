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
p_adv 0.2, K = 1), all on the same model. "all" selects all of them. The batch is the
number of images drawn per step for every configuration, so the step-time ratio to
vanilla is the cost per epoch at the same number of images.
Targets: our vanilla step at least as fast as keras.applications EfficientNetB0 in the
same loop; AdvProp PGD-K no slower than (K + 2) x vanilla; Fast AdvProp at most 1.3x
(its cost model says 1 + p_adv * K = 1.2x, before the budget calibration that makes its
run cost what vanilla's does).
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

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


PAPER_ATTACKS = {  # (epsilon, iterations, step, targeted) of each paper's training attack
    "madry_at": (8.0, 10, 2.0, False), "sat": (8.0, 10, 2.0, False),
    "fine_grained_advprop": (1.0, 1, 1.0, False),
}


def all_configs():
    from efficientnet_advprop.recipes import RECIPES

    return (["keras_applications", "vanilla", "advprop_pgd1", "advprop_pgd5"]
            + [name for name in RECIPES if name not in ("vanilla", "advprop")])


def make_config(name):
    """-> (recipe name, attack epsilon or None, uses keras.applications)."""
    from efficientnet_advprop.recipes import RECIPES

    if name == "keras_applications":
        return "vanilla", None, True
    if name == "vanilla":
        return "vanilla", None, False
    if name.startswith("advprop_pgd"):
        k = int(name[len("advprop_pgd"):])
        return "advprop", max(1, k - 1), False  # AdvProp: eps 1 -> PGD1, eps k-1 -> PGD-k
    if name in RECIPES:
        return name, None, False
    raise app.UsageError(f"--configs: unknown configuration {name!r}")


def build_config(name, image_size, model_dir):
    """-> (trainer, images, labels, attack iterations) ready to time."""
    import keras
    import numpy as np
    import tensorflow as tf

    from efficientnet_advprop import build_model
    from efficientnet_advprop.attacks import AttackConfig
    from efficientnet_advprop.recipes import make_recipe
    from efficientnet_advprop.training import TrainConfig, Trainer, set_global_seed

    recipe_name, eps, use_keras_app = make_config(name)
    set_global_seed(0)
    num_classes = 10
    if recipe_name == "advprop":
        recipe = make_recipe("advprop", num_classes, attack=AttackConfig(epsilon=eps))
    elif recipe_name in PAPER_ATTACKS:
        eps, iters, step, targeted = PAPER_ATTACKS[recipe_name]
        recipe = make_recipe(recipe_name, num_classes, attack=AttackConfig(
            epsilon=eps, num_iter=iters, step_size=step, targeted=targeted))
    else:  # the recipe's own default attack is the paper's
        recipe = make_recipe(recipe_name, num_classes)

    def model_fn():
        if use_keras_app:
            return keras.applications.EfficientNetB0(
                weights=None, classes=num_classes, input_shape=(image_size, image_size, 3),
                classifier_activation=None)
        return build_model(FLAGS.model_name, num_classes, image_size=image_size,
                           normalizer="split_batch_norm", num_aux=recipe.num_aux)

    batch = FLAGS.batch_size
    config = TrainConfig(model_dir=model_dir, train_steps=10 ** 9, global_batch_size=batch,
                         steps_per_epoch=100, jit_compile=FLAGS.jit_compile,
                         precision=FLAGS.precision,
                         checkpoint_every_steps=10 ** 9, summary_every_steps=10 ** 9)
    trainer = Trainer(tf.distribute.get_strategy(), model_fn, recipe, config)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, image_size, image_size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, num_classes, batch), tf.int32)
    inputs = (images, labels)
    if recipe.needs_source_tags:  # half the images tagged as AutoAugment ones
        inputs += (tf.constant(np.arange(batch) % 2, tf.int32),)
    for _ in range(FLAGS.warmup):
        float(trainer._train_step(*inputs)[0])
    return trainer, inputs, recipe.passes_per_image(), recipe.describe()


def time_steps(trainer, inputs):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        float(trainer._train_step(*inputs)[0])
    return (time.perf_counter() - start) / FLAGS.steps


def time_resolution(image_size, configs):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {name: build_config(name, image_size, os.path.join(tmp, name))
                 for name in configs}
        rounds = {name: [] for name in configs}
        for _ in range(FLAGS.repeats):
            for name, (trainer, inputs, _, _) in built.items():
                rounds[name].append(time_steps(trainer, inputs))
        for name, (_, _, passes, description) in built.items():
            seconds = statistics.median(rounds[name])
            rows.append({"config": name, "description": description,
                         "image_size": image_size, "batch_size": FLAGS.batch_size,
                         "cost_model_passes": passes, "seconds_per_step": seconds,
                         "images_per_second": FLAGS.batch_size / seconds,
                         "rounds": rounds[name]})
            print(f"{name:>20s} {image_size:4d}px  {FLAGS.batch_size / seconds:8.1f} img/s  "
                  f"{seconds:.3f} s/step", file=sys.stderr)
    return rows


def main(argv):
    del argv
    import tensorflow as tf

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

    def reference(name, size):
        ref = next((r for r in results if r["config"] == name and r["image_size"] == size),
                   None)
        return ref["seconds_per_step"] if ref else float("nan")

    for row in results:
        ratio = row["seconds_per_step"] / reference("vanilla", row["image_size"])
        ratio_keras = row["seconds_per_step"] / reference("keras_applications",
                                                          row["image_size"])
        passes = row["cost_model_passes"]
        if row["config"].startswith("advprop"):
            k = passes - 2
            target = f"<= {k:g} + 2 = {passes:g}x: {'met' if ratio <= passes else 'MISSED'}"
        elif row["config"] == "fast_advprop":
            target = f"<= 1.3x: {'met' if ratio <= 1.3 else 'MISSED'}"
        elif row["config"] == "keras_applications":
            target = f"vanilla >= this: {'met' if ratio >= 1 else 'MISSED'}"
        else:
            target = ""
        print(f"| {row['config']} | {row['image_size']} | {row['images_per_second']:.1f} | "
              f"{row['seconds_per_step']:.3f} | {ratio:.2f} | {ratio_keras:.2f} | "
              f"{passes:g} | {target} |")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
