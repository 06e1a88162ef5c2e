"""XLA's count of the floating-point operations of training steps, on any machine.

    python scripts/count_operations.py --what=benchmark   # the device check's steps
    python scripts/count_operations.py --what=gpu         # a claims tier's runs

The count (`cost_analysis()` of the lowered, uncompiled step on the JAX engine) does
not depend on the device, so a CPU gives it for the steps a GPU will run:

- benchmark: the device check's configurations (tools.jax_device_check.full_plan:
  EfficientNet-B0 and ResNet-50 at 224 px, bfloat16), GFLOP per drawn image and the
  ratio to vanilla's (Fast AdvProp's cost model says 1.2x);
- a claims tier: every run of the tier (seed 0), GFLOP per step, steps, and PFLOP per
  run and per epoch: what docs/reproducing.md sizes the GPU tiers from.

Writes one JSON record (command, git revision, machine, the counts) to --out.
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

flags.DEFINE_string("what", "benchmark", "benchmark (the device check's steps) or the name "
                    "of a claims tier (smoke, cpu, gpu, gpu_wide).")
flags.DEFINE_string("source", os.path.join(os.path.dirname(REPO), "shared", "data",
                                           "cifar10-train-jpeg.tar.gz"),
                    "The CIFAR-10 training JPEGs (tar.gz), for the claims tiers' split.")
flags.DEFINE_string("out", None, "Where to write the JSON record (default: print only).")
FLAGS = flags.FLAGS


def fail(message):
    sys.exit(f"count_operations.py: error: {message}")


def flops_of(trainer, batch):
    import jax
    import numpy as np

    from efficientnet_advprop.tools.jax_device_check import xla_flops

    stacked = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], batch)
    flops = xla_flops(trainer._loop_fn(1).lower(trainer.state, stacked, np.int32(0),
                                                trainer.run_seed))
    if flops is None:
        fail("XLA reports no operation count for this backend")
    return flops


def benchmark_counts():
    import jax
    import keras

    from efficientnet_advprop.tools import jax_device_check as dc
    from efficientnet_advprop.tools.step_configs import (drawn_batch_size,
                                                         make_benchmark_recipe,
                                                         parse_config)

    device = jax.devices("cpu")[0]
    plan = dc.full_plan()
    rows = []
    for model in plan.models:
        vanilla = None
        for name in model.configs:
            batch = drawn_batch_size(parse_config(name)[0], plan.batch_size)
            recipe = make_benchmark_recipe(name, dc.NUM_CLASSES, batch)
            keras.utils.set_random_seed(0)
            trainer = dc._trainer(recipe, model.model_name, model.model_kwargs,
                                  model.image_size, batch, "bfloat16", device,
                                  dc.NUM_CLASSES)
            per_image = flops_of(trainer, dc.random_batch(recipe, batch, model.image_size,
                                                          dc.NUM_CLASSES)) / batch
            vanilla = vanilla or per_image
            rows.append({"model": model.model_name, "config": name, "batch": batch,
                         "gflop_per_image": per_image / 1e9,
                         "ratio_to_vanilla": per_image / vanilla})
            print(f"{model.model_name} {name}: {per_image / 1e9:.2f} GFLOP per image, "
                  f"{per_image / vanilla:.3f}x vanilla", flush=True)
            keras.backend.clear_session()
    return rows


def tier_counts(tier_name):
    import keras

    from efficientnet_advprop import config as config_lib
    from efficientnet_advprop import jax_experiment
    from efficientnet_advprop.claims import suite
    from efficientnet_advprop.data import numpy_input

    tier = suite.TIERS[tier_name]
    data_dir = None
    if tier.data == "split":
        if not os.path.isfile(FLAGS.source):
            fail(f"--source={FLAGS.source}: no such file (the CIFAR-10 JPEG tar.gz)")
        data_dir = FLAGS.source
    rows = []
    for spec in suite.RUNS:
        if tier.runs is not None and spec.name not in tier.runs:
            continue
        overrides = suite.tier_overrides(tier, spec, 0, data_dir, os.devnull)
        info = numpy_input.resolve_dataset(overrides.get("dataset"), overrides.get("data_dir"))
        cfg = config_lib.resolve(overrides, info)
        run = jax_experiment.prepare(cfg, info=info, log=lambda *a: None, input_path="numpy")
        flops = flops_of(run.trainer, next(iter(run.train_batches(0))))
        steps = cfg.optim.train_steps
        rows.append({"run": spec.name, "model": cfg.model.model_name,
                     "width_multiplier": tier.width, "batch": cfg.data.train_batch_size,
                     "gflop_per_step": flops / 1e9, "steps": steps,
                     "pflop": flops * steps / 1e15,
                     # per epoch of the tier (Fast AdvProp trains 1/1.2 of them)
                     "pflop_per_tier_epoch": flops * steps / 1e15 / tier.epochs})
        print(f"{spec.name}: {flops / 1e9:.1f} GFLOP per step x {steps} steps = "
              f"{flops * steps / 1e15:.3f} PFLOP", flush=True)
        keras.backend.clear_session()
    total = sum(r["pflop"] for r in rows) * len(tier.seeds)
    print(f"tier {tier_name}: {total:.1f} PFLOP over {len(tier.seeds)} seeds", flush=True)
    return rows, total


def main(argv):
    del argv
    from efficientnet_advprop.claims import suite
    from efficientnet_advprop.claims.runner_common import git_revision, host

    if os.environ.get("KERAS_BACKEND") != "jax":
        fail(f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}: the counts are the JAX "
             "engine's; unset it or set it to jax")
    start = time.time()
    record = {"command": "python scripts/count_operations.py " + " ".join(sys.argv[1:]),
              "git_revision": git_revision(), "machine": host(),
              "python": platform.python_version(), "what": FLAGS.what}
    if FLAGS.what == "benchmark":
        record["rows"] = benchmark_counts()
    elif FLAGS.what in suite.TIERS:
        record["rows"], record["tier_pflop"] = tier_counts(FLAGS.what)
    else:
        fail(f"--what={FLAGS.what}: expected benchmark or a tier ({', '.join(suite.TIERS)})")
    record["wall_seconds"] = round(time.time() - start, 1)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
