"""Images/s of training steps: vanilla vs AdvProp PGD-K vs keras.applications.

    python scripts/benchmark.py                          # b0 at 224 and 32 pixels
    python scripts/benchmark.py --image_sizes=32 --steps=20 --batch_size=64

Every configuration runs in the same Trainer loop (same optimizer, EMA, weight decay,
tf.distribute default strategy) on in-memory random images, so the figures measure the
train step, not the input pipeline. The first `--warmup` steps (tracing) are not timed.
The configurations of one resolution are built first and then timed in turn, `--repeats`
rounds of `--steps` steps each; the median round is reported, so drift of a shared
machine falls on all of them alike (single runs on a 2-core CPU vary by about 10%).
Targets (issue 2): our vanilla step at least as fast as keras.applications
EfficientNetB0 in the same loop; an AdvProp PGD-K step no slower than (K + 2) x vanilla.
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
                              "advprop_pgd5"], "What to time.")
flags.DEFINE_integer("batch_size", 32, "Global batch size (clean images per step).")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, allocation).")
flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds; the median is reported.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step.")
flags.DEFINE_string("output", None, "Also write the results as JSON here.")


def make_config(name):
    """-> (recipe name, attack epsilon or None, uses keras.applications)."""
    if name == "keras_applications":
        return "vanilla", None, True
    if name == "vanilla":
        return "vanilla", None, False
    if name.startswith("advprop_pgd"):
        k = int(name[len("advprop_pgd"):])
        return "advprop", max(1, k - 1), False  # AdvProp: eps 1 -> PGD1, eps k-1 -> PGD-k
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
    else:
        recipe = make_recipe("vanilla", num_classes)

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
                         checkpoint_every_steps=10 ** 9, summary_every_steps=10 ** 9)
    trainer = Trainer(tf.distribute.get_strategy(), model_fn, recipe, config)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, image_size, image_size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, num_classes, batch), tf.int32)
    for _ in range(FLAGS.warmup):
        float(trainer._train_step(images, labels)[0])
    iterations = recipe.attack.iterations if recipe.attack else 0
    return trainer, images, labels, iterations


def time_steps(trainer, images, labels):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        float(trainer._train_step(images, labels)[0])
    return (time.perf_counter() - start) / FLAGS.steps


def time_resolution(image_size):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {name: build_config(name, image_size, os.path.join(tmp, name))
                 for name in FLAGS.configs}
        rounds = {name: [] for name in FLAGS.configs}
        for _ in range(FLAGS.repeats):
            for name, (trainer, images, labels, _) in built.items():
                rounds[name].append(time_steps(trainer, images, labels))
        for name, (_, _, _, iterations) in built.items():
            seconds = statistics.median(rounds[name])
            rows.append({"config": name, "image_size": image_size,
                         "batch_size": FLAGS.batch_size, "attack_iterations": iterations,
                         "seconds_per_step": seconds,
                         "images_per_second": FLAGS.batch_size / seconds,
                         "rounds": rounds[name]})
            print(f"{name:>20s} {image_size:4d}px  {FLAGS.batch_size / seconds:8.1f} img/s  "
                  f"{seconds:.3f} s/step", file=sys.stderr)
    return rows


def main(argv):
    del argv
    import tensorflow as tf

    results = []
    for size in (int(s) for s in FLAGS.image_sizes):
        results += time_resolution(size)
    device = tf.config.list_logical_devices()[0].device_type
    print(f"\n{FLAGS.model_name}, batch {FLAGS.batch_size}, {device}, "
          f"{os.cpu_count()} CPU cores, jit_compile={FLAGS.jit_compile}, median of "
          f"{FLAGS.repeats} rounds of {FLAGS.steps} steps\n")
    print("| config | pixels | img/s | s/step | step / vanilla | target |")
    print("|---|---:|---:|---:|---:|---|")
    for row in results:
        vanilla = next((r for r in results if r["config"] == "vanilla"
                        and r["image_size"] == row["image_size"]), None)
        ratio = row["seconds_per_step"] / vanilla["seconds_per_step"] if vanilla else float("nan")
        k = row["attack_iterations"]
        if row["config"].startswith("advprop"):
            target = f"<= {k + 2}x: {'met' if ratio <= k + 2 else 'MISSED'}"
        elif row["config"] == "keras_applications":
            target = f"vanilla >= this: {'met' if ratio >= 1 else 'MISSED'}"
        else:
            target = ""
        print(f"| {row['config']} | {row['image_size']} | {row['images_per_second']:.1f} | "
              f"{row['seconds_per_step']:.3f} | {ratio:.2f} | {target} |")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
