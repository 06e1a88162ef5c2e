"""Every training recipe on the JAX backend with TensorFlow blocked from import (issue 22):
`recipe.gradients` of a tiny model, eagerly and under `jax.jit` through Keras' stateless
API, gives a finite loss and finite gradients, non-zero gradients for the shared
convolutions, and moves the moving statistics of every BN set the recipe trains.

All recipes of a tier run in ONE fresh process (Keras picks its backend once per
process): this file doubles as that process's script,

    KERAS_BACKEND=jax python tests/test_recipes_jax.py {micro,models} OUT.json [RUN ...]

which sets `sys.modules["tensorflow"] = None` before Keras is imported, so any
`import tensorflow` on the way fails the run (each run's error is recorded in OUT.json,
which the tests read).

Tiers: "micro" (slow tier, about 2.5 minutes on 2 loaded cores): tests/test_recipes.py's micro model
(conv-SplitBN-relu x2 -> pool -> dense at 16 pixels; without BN for NoFrost and
NoFrost*); "models" (slow, about 5 minutes on 2 CPU cores): resnet-18-cifar at width
1/8 and 32 pixels with SplitBatchNorm (`recipe.num_aux` auxiliary sets), nf-resnet-26-
cifar at width 1/8 for NoFrost and NoFrost*. Attacks run 2 iterations; Fast AdvProp
draws 30 images (24 clean, 6 adversarial in 3 shuffle-BN groups of 2) and mixes its
clean share (Mixup and CutMix), as does one of the Vanilla runs.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest

NUM_CLASSES = 10
IMAGE_SIZE = 32
MICRO_SIZE = 16
BATCH = 8
FAST_ADVPROP_BATCH = 30  # p_adv 0.2: 6 adversarial images = 3 shuffle-BN groups of 2
ATTACK_ITERATIONS = 2
# run name -> (recipe name, recipe options besides the attack)
RUNS = {
    "vanilla": ("vanilla", {}),
    "vanilla_mixed": ("vanilla", {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}),
    "advprop": ("advprop", {}),
    "fine_grained_advprop": ("fine_grained_advprop", {}),
    "madry_at": ("madry_at", {}),
    "sat": ("sat", {}),
    "bn_sat": ("bn_sat", {}),
    "trades": ("trades", {}),
    "fat": ("fat", {}),
    "trades_fat": ("trades_fat", {}),
    "fast_advprop": ("fast_advprop", {"shuffle_bn_group_size": 2, "mixup_alpha": 0.4,
                                      "cutmix_alpha": 1.0}),
    "mbn_at": ("mbn_at", {"alp_weight": 0.5}),
    # consistent BN from a later step: the step comparison is traced, BN still trains
    "mbn_at_consistent_later": ("mbn_at", {"clean_fraction": 0.5,
                                           "consistent_bn_from_step": 5}),
    "nofrost": ("nofrost", {}),
    "nofrost_star": ("nofrost_star", {}),
}


# ------------------------------------------------------------------ the JAX process
def _attack(recipe_name):
    """The recipe's default attack at ATTACK_ITERATIONS iterations (None: no attack)."""
    import dataclasses

    from efficientnet_advprop.recipes import RECIPES

    default = getattr(RECIPES[recipe_name](NUM_CLASSES), "attack", None)
    if default is None:
        return None
    return dataclasses.replace(default, num_iter=ATTACK_ITERATIONS)


def _micro_model(recipe):
    """conv-(SplitBN)-relu x2 -> pool -> dense, as tests/test_recipes.py's micro_model
    (no BN for the normalizer-free recipes)."""
    import keras

    from efficientnet_advprop.layers import InputNormalization, SplitBatchNorm

    keras.utils.set_random_seed(1)
    inputs = keras.Input((MICRO_SIZE, MICRO_SIZE, 3))
    h = InputNormalization("advprop")(inputs)
    for i, filters in enumerate((8, 8)):
        h = keras.layers.Conv2D(filters, 3, strides=2, padding="same",
                                use_bias=recipe.normalizer_free_only, name=f"conv{i}")(h)
        if not recipe.normalizer_free_only:
            h = SplitBatchNorm(num_aux=recipe.num_aux, name=f"bn{i}")(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, name="logits")(h))


def _model(recipe, kind):
    import keras

    from efficientnet_advprop.models import build_model

    if kind == "micro":
        return _micro_model(recipe)
    keras.utils.set_random_seed(1)
    if recipe.normalizer_free_only:
        return build_model("nf-resnet-26-cifar", NUM_CLASSES, width_multiplier=0.125,
                           image_size=IMAGE_SIZE)
    return build_model("resnet-18-cifar", NUM_CLASSES, normalizer="split_batch_norm",
                       num_aux=recipe.num_aux, width_multiplier=0.125,
                       image_size=IMAGE_SIZE)


def _summary(model, grads, loss, before, after):
    """What the tests check, as plain JSON."""
    import numpy as np

    from efficientnet_advprop.layers import SplitBatchNorm

    grads = [np.asarray(g) for g in grads]
    paths = [v.path for v in model.trainable_variables]
    bn_set = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNorm):
            for k, (mean, var) in enumerate(zip(layer.moving_means, layer.moving_variances)):
                bn_set[mean.path] = bn_set[var.path] = k
    non_trainable = [v.path for v in model.non_trainable_variables]
    moved = sorted({bn_set[p] for p, b, a in zip(non_trainable, before, after)
                    if p in bn_set and not np.array_equal(np.asarray(b), np.asarray(a))})
    conv = [i for i, (p, v) in enumerate(zip(paths, model.trainable_variables))
            if "conv" in p and p.endswith("kernel") and len(v.shape) == 4]
    return {
        "loss": float(np.asarray(loss)),
        "finite": bool(all(np.isfinite(g).all() for g in grads)),
        "num_grads": len(grads),
        "num_variables": len(paths),
        "nonzero_conv": [paths[i] for i in conv if np.abs(grads[i]).max() > 0],
        "zero_conv": [paths[i] for i in conv if not np.abs(grads[i]).max() > 0],
        "bn_sets_moved": moved,
        "bn_sets": sorted(set(bn_set.values())),
    }


def _inputs(recipe_name, kind):
    import numpy as np

    batch = FAST_ADVPROP_BATCH if recipe_name == "fast_advprop" else BATCH
    size = MICRO_SIZE if kind == "micro" else IMAGE_SIZE
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, batch).astype("int32")
    tags = np.arange(batch, dtype="int32") % 2  # fine-grained: both clean BN sets
    tda = rng.uniform(0, 255, images.shape).astype("float32")
    return images, labels, tags, tda


def run_one(run, kind):
    import jax
    import keras
    import numpy as np

    from efficientnet_advprop import seam
    from efficientnet_advprop.recipes import StepContext, make_recipe

    recipe_name, options = RUNS[run]
    attack = _attack(recipe_name)
    if attack is not None:
        options = dict(options, attack=attack)
    recipe = make_recipe(recipe_name, NUM_CLASSES, **options)
    model = _model(recipe, kind)
    images, labels, tags, tda = _inputs(recipe_name, kind)
    extras = {"tda_images": tda} if recipe.input_views else None

    def context(seed, step):
        return StepContext(seed=seed, step=step, num_replicas=1, source_tags=tags,
                           extras=extras)

    result = {}
    start = time.time()
    before = [np.asarray(v.value) for v in model.non_trainable_variables]
    out = recipe.gradients(model, model.trainable_variables, images, labels,
                           context(seam.make_seed(0, 1), 0))
    after = [np.asarray(v.value) for v in model.non_trainable_variables]
    result["eager"] = _summary(model, out.grads, out.loss_sum, before, after)
    result["eager"]["metrics"] = sorted(out.metrics)
    result["eager"]["seconds"] = time.time() - start

    variables = list(model.variables)
    non_trainable = list(model.non_trainable_variables)

    @jax.jit
    def step(values, images, labels, seed, step_number):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            out = recipe.gradients(model, model.trainable_variables, images, labels,
                                   context(seed, step_number))
        updated = [scope.get_current_value(v) for v in non_trainable]
        return out.grads, out.loss_sum, updated

    start = time.time()
    values = [v.value for v in variables]
    before = [np.asarray(v.value) for v in non_trainable]
    grads, loss, updated = step(values, images, labels, seam.make_seed(0, 2), np.int32(1))
    result["jit"] = _summary(model, grads, loss, before, updated)
    # the jitted step must not have touched the variables themselves
    result["jit"]["variables_untouched"] = all(
        np.array_equal(np.asarray(v.value), b) for v, b in zip(non_trainable, before))
    result["jit"]["seconds"] = time.time() - start
    return result


def main(kind, out_path, runs):
    sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import traceback

    import keras

    results = {"backend": keras.backend.backend()}
    for run in runs:
        try:
            results[run] = run_one(run, kind)
        except Exception as error:  # recorded per run; the tests report it
            results[run] = {"error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-4000:]}
    loaded = [m for m, module in sys.modules.items()
              if (m == "tensorflow" or m.startswith("tensorflow.")) and module is not None]
    results["tensorflow_modules_loaded"] = len(loaded)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


# ------------------------------------------------------------------------ the tests
def _run_process(tmp_path_factory, kind):
    pytest.importorskip("jax")  # the test extra installs it
    out = tmp_path_factory.mktemp(f"recipes_jax_{kind}") / "results.json"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    start = time.time()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), kind, str(out), *RUNS],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        results = json.load(f)
    results["wall_seconds"] = time.time() - start
    return results


@pytest.fixture(scope="module")
def micro_results(tmp_path_factory):
    return _run_process(tmp_path_factory, "micro")


@pytest.fixture(scope="module")
def model_results(tmp_path_factory):
    return _run_process(tmp_path_factory, "models")


def test_every_recipe_is_covered():
    from efficientnet_advprop.recipes import RECIPES

    assert {recipe for recipe, _ in RUNS.values()} == set(RECIPES)


def _check(summary, run, kind):
    assert summary["finite"], "non-finite gradient"
    assert summary["num_grads"] == summary["num_variables"]
    assert math.isfinite(summary["loss"]) and summary["loss"] > 0
    assert summary["nonzero_conv"], "no convolution got a gradient"
    if kind == "models" and RUNS[run][0] in ("nofrost", "nofrost_star"):
        # Every NF-ResNet branch ends in a zero-initialised gain: at initialisation only
        # the stem and the shortcut convolutions see a gradient.
        assert any("stem_conv" in p for p in summary["nonzero_conv"])
        assert any("shortcut_conv" in p for p in summary["nonzero_conv"])
        assert all(p.split("/")[-2].rsplit("_", 1)[-1] in ("conv1", "conv2", "conv3")
                   for p in summary["zero_conv"]), summary["zero_conv"]
    else:
        assert summary["zero_conv"] == [], summary["zero_conv"]
    # Every BN set the recipe trains moved its statistics (advprop, mbn_at, fast_advprop:
    # main and auxiliary; fine-grained: main, AutoAugment and adversarial; the others
    # main; the normalizer-free models have none).
    assert summary["bn_sets_moved"] == summary["bn_sets"]
    assert bool(summary["bn_sets"]) != (RUNS[run][0] in ("nofrost", "nofrost_star"))


def _check_run(results, run, kind):
    assert results["backend"] == "jax"
    assert results["tensorflow_modules_loaded"] == 0
    got = results[run]
    assert "error" not in got, got.get("traceback")
    for mode in ("eager", "jit"):
        _check(got[mode], run, kind)
    assert got["jit"]["variables_untouched"]  # the jitted step only returns new values
    if RUNS[run][0] != "vanilla":
        assert "loss/adversarial" in got["eager"]["metrics"]


# slow since the default suite outgrew 15 minutes: tests/test_engine_parity.py runs every
# recipe's step on JAX with TensorFlow blocked there, against TensorFlow's gradients and
# BN statistics; this adds eager-vs-jit and the Mixup/CutMix variants (~2.5 minutes).
@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_recipe_gradients_on_jax_micro_model(micro_results, run):
    _check_run(micro_results, run, "micro")


@pytest.mark.slow  # about 5 minutes on 2 CPU cores (eager JAX through ResNet-18/NF-ResNet-26)
@pytest.mark.parametrize("run", list(RUNS))
def test_recipe_gradients_on_jax_resnets(model_results, run):
    _check_run(model_results, run, "models")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or list(RUNS))
