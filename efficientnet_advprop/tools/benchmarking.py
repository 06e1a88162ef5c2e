"""Timing the training step and the input pipeline: the logic behind
scripts/benchmark.py, scripts/benchmark_input.py and scripts/device_check.py.

Training steps: every configuration runs in the same `Trainer` (same optimizer, EMA,
weight decay, default tf.distribute strategy) on in-memory random images, so the figures
measure the train step, not the input pipeline. `build_config` builds one configuration
and runs its untimed warm-up steps (tracing, XLA compilation); `time_interleaved` times
built configurations in alternating rounds so that drift of a shared machine falls on
all of them alike, and the caller reports the median round.

Configurations by name (`parse_config`, ...): see `step_configs`, re-exported here.

Input pipeline: `measure_input` times `data.make_dataset(..., is_training=True)` alone,
optionally on a private tf.data thread pool of `threads` threads (1 thread: the
images/s of one CPU core).
"""

import dataclasses
import gc
import os
import statistics
import time

import numpy as np
import tensorflow as tf

from efficientnet_advprop.tools.step_configs import (  # noqa: F401 -- re-exported
    BASE_CONFIGS, REFERENCE, all_configs, drawn_batch_size, fast_advprop_group_size,
    make_benchmark_recipe, parse_config)


@dataclasses.dataclass
class StepBench:
    """One built configuration, warmed up and ready to time."""

    name: str
    trainer: object
    inputs: tuple
    model_name: str
    image_size: int
    batch_size: int
    passes: float  # the recipe's cost model: forward+backward passes per drawn image
    description: str
    build_seconds: float  # building + the warm-up steps (tracing, XLA compilation)
    warm_step_seconds: float = None  # the last warm-up step (already compiled)


def random_batch(batch_size, image_size, num_classes, source_tags=False, seed=0,
                 extra_views=()):
    """(images float32 in [0, 255], labels int32[, extras]) on the device; extras holds
    the source tags and the extra views (here: the images themselves) a recipe needs."""
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.uniform(0, 255, (batch_size, image_size, image_size, 3)),
                         tf.float32)
    labels = tf.constant(rng.integers(0, num_classes, batch_size), tf.int32)
    extras = {}
    if source_tags:  # half the images tagged as AutoAugment ones
        extras["source_tags"] = tf.constant(np.arange(batch_size) % 2, tf.int32)
    if "tda" in extra_views:
        extras["tda_images"] = images
    return (images, labels, extras) if extras else (images, labels)


def build_config(name, *, model_name, image_size, batch_size, model_dir,
                 jit_compile=False, precision="float32", warmup=2, num_classes=10,
                 model_kwargs=None, seed=0):
    """Builds configuration `name` on `model_name` and runs `warmup` untimed steps.

    model_kwargs: extra build_model keywords (width_coefficient, width_multiplier...);
    they do not apply to the keras.applications reference. `seed` seeds the step's
    attack randomness and the random batch; the initial weights follow the global seed,
    which the caller sets once (`set_global_seed`) before building every configuration:
    tf.random.set_seed makes the next call of every tf.function built before it several
    seconds slower (measured on a CPU: 0.1 s -> 5.5 s for a ResNet-18 step). -> StepBench.
    """
    import keras

    from efficientnet_advprop import build_model
    from efficientnet_advprop.training import TrainConfig, Trainer

    start = time.perf_counter()
    recipe_name, _, use_keras_app = parse_config(name)
    batch_size = drawn_batch_size(recipe_name, batch_size)
    recipe = make_benchmark_recipe(name, num_classes, batch_size)
    extra = dict(model_kwargs or {})

    def model_fn():
        if use_keras_app:
            return keras.applications.EfficientNetB0(
                weights=None, classes=num_classes, input_shape=(image_size, image_size, 3),
                classifier_activation=None)
        return build_model(model_name, num_classes, image_size=image_size,
                           normalizer="split_batch_norm", num_aux=recipe.num_aux, **extra)

    config = TrainConfig(model_dir=model_dir, train_steps=10 ** 9,
                         global_batch_size=batch_size, steps_per_epoch=100,
                         jit_compile=jit_compile, precision=precision, seed=seed,
                         checkpoint_every_steps=10 ** 9, summary_every_steps=10 ** 9)
    trainer = Trainer(tf.distribute.get_strategy(), model_fn, recipe, config)
    inputs = random_batch(batch_size, image_size, num_classes, recipe.needs_source_tags,
                          seed=seed, extra_views=recipe.input_views)
    warm = None
    for _ in range(warmup):
        step_start = time.perf_counter()
        float(trainer._train_step(*inputs)[0])
        warm = time.perf_counter() - step_start
    return StepBench(name=name, trainer=trainer, inputs=inputs,
                     model_name="keras.applications.EfficientNetB0" if use_keras_app
                     else model_name, image_size=image_size, batch_size=batch_size,
                     passes=recipe.passes_per_image(), description=recipe.describe(),
                     build_seconds=time.perf_counter() - start, warm_step_seconds=warm)


def time_steps(bench, steps):
    """Seconds per step of `steps` steps (each waits for its loss, as training does)."""
    start = time.perf_counter()
    for _ in range(steps):
        float(bench.trainer._train_step(*bench.inputs)[0])
    return (time.perf_counter() - start) / steps


class DeviceMemory:
    """Peak allocator memory of one device (tf.config.experimental.get_memory_info);
    `supported` is False where TensorFlow does not track it (CPUs report zeros)."""

    def __init__(self, device):
        self.device = device
        try:
            tf.config.experimental.get_memory_info(device)
            self.supported = device.upper().startswith(("GPU", "TPU"))
        except (ValueError, tf.errors.OpError):
            self.supported = False

    def reset(self):
        if self.supported:
            tf.config.experimental.reset_memory_stats(self.device)

    def info(self):
        """{'current': bytes, 'peak': bytes} or None when not supported."""
        if not self.supported:
            return None
        return dict(tf.config.experimental.get_memory_info(self.device))


def time_interleaved(benches, repeats, steps, memory=None, deadline=None):
    """Times each StepBench for `steps` steps per round, the benches in turn, `repeats`
    rounds (fewer when `deadline`, a time.perf_counter() value, would pass during the
    next round; at least one).

    Returns {name: {"rounds": [s/step], "seconds_per_step": median,
    "memory_resident_bytes", "memory_peak_bytes"}}: the memory figures (None without
    `memory`) are the allocator's bytes in use before the config's steps (every built
    configuration's variables) and its peak during them (reset before each round).
    """
    out = {b.name: {"rounds": [], "memory_resident_bytes": None, "memory_peak_bytes": None}
           for b in benches}
    for bench in benches:  # untimed: building the later ones may have slowed the next call
        float(bench.trainer._train_step(*bench.inputs)[0])
    for round_index in range(repeats):
        round_start = time.perf_counter()
        for bench in benches:
            if memory is not None:
                memory.reset()
                before = memory.info()
            out[bench.name]["rounds"].append(time_steps(bench, steps))
            if memory is not None and before is not None:
                after = memory.info()
                row = out[bench.name]
                row["memory_resident_bytes"] = int(before["current"])
                row["memory_peak_bytes"] = max(int(after["peak"]),
                                               row["memory_peak_bytes"] or 0)
        took = time.perf_counter() - round_start
        if deadline is not None and time.perf_counter() + took > deadline:
            break
    for row in out.values():
        row["seconds_per_step"] = statistics.median(row["rounds"])
    return out


def is_out_of_memory(error):
    """True for an accelerator out-of-memory error (including XLA's)."""
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    message = str(error)
    return isinstance(error, (tf.errors.InternalError, tf.errors.UnknownError)) and (
        "RESOURCE_EXHAUSTED" in message or "Out of memory" in message
        or "OOM" in message)


def release(benches):
    """Drops built configurations and frees their device memory."""
    import keras

    benches.clear()
    keras.backend.clear_session()
    gc.collect()


def step_rows(benches, timings):
    """Result rows of `time_interleaved`'s timings, with the ratios to vanilla and to
    the keras.applications reference of the same resolution where both were timed."""
    rows = []
    for bench in benches:
        t = timings[bench.name]
        seconds = t["seconds_per_step"]
        rows.append({"config": bench.name, "model": bench.model_name,
                     "description": bench.description, "image_size": bench.image_size,
                     "batch_size": bench.batch_size, "cost_model_passes": bench.passes,
                     "seconds_per_step": seconds,
                     "images_per_second": bench.batch_size / seconds,
                     "rounds": t["rounds"], "build_seconds": bench.build_seconds,
                     "memory_resident_bytes": t["memory_resident_bytes"],
                     "memory_peak_bytes": t["memory_peak_bytes"]})
    for row in rows:
        for key, ref in (("ratio_to_vanilla", "vanilla"), ("ratio_to_reference", REFERENCE)):
            base = next((r["seconds_per_step"] for r in rows if r["config"] == ref
                         and r["image_size"] == row["image_size"]), None)
            row[key] = row["seconds_per_step"] / base if base else None
    return rows


def target_verdict(row):
    """The benchmark target of a row, as text ('' where there is none)."""
    ratio, passes = row.get("ratio_to_vanilla"), row["cost_model_passes"]
    if ratio is None:
        return ""
    if row["config"].startswith("advprop"):
        return f"<= {passes - 2:g} + 2 = {passes:g}x: {'met' if ratio <= passes else 'MISSED'}"
    if row["config"] == "fast_advprop":
        return f"<= 1.3x: {'met' if ratio <= 1.3 else 'MISSED'}"
    if row["config"] == REFERENCE:
        return f"vanilla >= this: {'met' if ratio >= 1 else 'MISSED'}"
    return ""


# ------------------------------------------------------------ Fast AdvProp's pieces
def _checksum_fn(jit_compile):
    """A function of every output tensor whose value needs all of them: fetching it
    waits for every piece of work that produced them (one small fused kernel)."""
    @tf.function(jit_compile=jit_compile)
    def checksum(tensors):
        return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32)) for t in tensors])

    return checksum


def _time_call(fn, args, steps, checksum):
    def once():
        out = [t for t in tf.nest.flatten(fn(*args)) if t is not None]
        float(checksum(out))

    once()  # tracing / compilation
    start = time.perf_counter()
    for _ in range(steps):
        once()
    return (time.perf_counter() - start) / steps


def fast_advprop_breakdown(bench, steps, jit_compile):
    """Seconds of each piece of a built fast_advprop StepBench's replica step, each
    compiled on its own (as the loop does when it cannot compile the whole step):
    the noisy pass (clean + noisy forward, one backward, the attack step and any further
    PGD steps), the shuffle (shuffle BN's permutation) and the adversarial pass.

    The pieces are the recipe's own functions, caught through StepContext.compile while
    `recipe.gradients` runs once eagerly on the bench's batch; nothing the recipe
    computes changes. -> {"noisy_pass_s", "shuffle_s", "adversarial_pass_s",
    "pieces_s", "step_s", "other_s"} where other_s = step_s - pieces_s is the rest of
    the train step (optimizer update, weight decay, EMA, the loop).
    """
    from efficientnet_advprop.recipes.base import StepContext

    trainer, recipe = bench.trainer, bench.trainer.recipe
    if recipe.name != "fast_advprop":
        raise ValueError(f"{bench.name}: not a fast_advprop configuration")
    images, labels = bench.inputs[:2]
    caught = {}

    def catch(fn):
        compiled = tf.function(fn, jit_compile=jit_compile)

        def record(*args):
            caught[fn.__name__] = (compiled, args)
            return compiled(*args)
        return record

    seed = tf.constant([trainer.config.seed, 0], tf.int64)
    ctx = StepContext(seed=seed, step=tf.constant(0, tf.int64), num_replicas=1,
                      compile=catch)
    recipe.gradients(trainer.train_model, trainer.model.trainable_variables, images,
                     labels, ctx)
    if set(caught) != {"noisy_pass", "adversarial_pass"}:
        raise RuntimeError(f"fast_advprop's pieces changed: caught {sorted(caught)}")
    checksum = _checksum_fn(jit_compile)
    noisy, noisy_args = caught["noisy_pass"]
    adversarial, adversarial_args = caught["adversarial_pass"]
    x_adv, adv_labels = noisy(*noisy_args)[2], noisy_args[3]
    groups = recipe.groups(int(images.shape[0]))
    shuffle = tf.function(lambda x, y: recipe.shuffle(x, y, groups, ctx),
                          jit_compile=jit_compile)
    out = {"noisy_pass_s": _time_call(noisy, noisy_args, steps, checksum),
           "shuffle_s": _time_call(shuffle, (x_adv, adv_labels), steps, checksum),
           "adversarial_pass_s": _time_call(adversarial, adversarial_args, steps,
                                            checksum),
           "step_s": time_steps(bench, steps)}
    out["pieces_s"] = out["noisy_pass_s"] + out["shuffle_s"] + out["adversarial_pass_s"]
    out["other_s"] = out["step_s"] - out["pieces_s"]
    return out


# ------------------------------------------------------------------ input pipeline
def measure_input(info, data_dir, *, image_size, batch_size, steps, warmup, augmentation,
                  auto_augment, seed=0, threads=None):
    """(images/s, seconds per batch, setup seconds) of the training stream alone.

    threads: None for tf.data's shared pool (every core), or N for a private pool of N
    threads (1: what one CPU core delivers). Only the iteration is timed; building the
    dataset and `warmup` batches are the setup."""
    from efficientnet_advprop import data

    start = time.perf_counter()
    ds = data.make_dataset(
        info, data_dir, "train", batch_size=batch_size, image_size=image_size,
        is_training=True, seed=seed,
        options=data.InputOptions(
            augmentation=augmentation,
            auto_augment=None if auto_augment == "none" else auto_augment))
    if threads is not None:
        options = tf.data.Options()
        options.threading.private_threadpool_size = int(threads)
        ds = ds.with_options(options)
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - start
    return steps * batch_size / elapsed, elapsed / steps, setup


def write_jpeg_folder(root, num_images, height, width, num_classes=4, seed=0, quality=90):
    """A data_dir/train/<class>/*.jpg image folder of `num_images` photo-like JPEGs of
    height x width (smooth random fields plus grain, so they compress like photos,
    not like noise). Returns root."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = os.path.join(root, "train", f"class{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.uniform(0, 255, (1, max(2, height // 32), max(2, width // 32), 3))
        image = tf.image.resize(coarse, (height, width), method="bicubic")[0]
        image += rng.normal(0, 8, (height, width, 3))
        image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        tf.io.write_file(os.path.join(folder, f"{i:05d}.jpg"),
                         tf.io.encode_jpeg(image, quality=quality))
    return root
