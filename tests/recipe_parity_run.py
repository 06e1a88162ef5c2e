"""One backend's side of tests/test_engine_parity.py (run in a fresh process).

    KERAS_BACKEND=tensorflow python tests/recipe_parity_run.py OUT.npz
    KERAS_BACKEND=jax python tests/recipe_parity_run.py OUT.npz --weights=TF.npz --block_tf

For a fixed batch and fixed weights (the TensorFlow run writes them, the JAX run loads
them by layer name), writes:
- "pgd": the adversarial images of a 3-step PGD from a fixed start (no random draw);
- for every recipe: the loss sum, every parameter gradient and the BN moving
  statistics after one `recipe.gradients` call, with the recipe's random draws (attack
  starts, targets, Mixup, shuffles) taken from NumPy by `seam.fixed_draws()`, i.e. the
  same on both backends, and its attack cut to one iteration (see below).
"""

import argparse
import dataclasses
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--weights", default=None)
parser.add_argument("--block_tf", action="store_true")
parser.add_argument("--recipes", default="all")
args = parser.parse_args()
if args.block_tf:
    sys.modules["tensorflow"] = None

import keras  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from efficientnet_advprop import seam  # noqa: E402
from efficientnet_advprop.attacks import linf_attack, logits_fn_for  # noqa: E402
from efficientnet_advprop.models import build_model  # noqa: E402
from efficientnet_advprop.recipes import RECIPES, StepContext, make_recipe  # noqa: E402
from efficientnet_advprop.training.loop import model_variable_map  # noqa: E402

NUM_CLASSES = 10
# Recipe options that keep the step small (same on both backends).
OPTIONS = {"fast_advprop": dict(shuffle_bn_group_size=2)}
BATCH = {"fast_advprop": 40}


def model_for(recipe):
    if recipe.normalizer_free_only:
        return build_model("nf-resnet-26-cifar", NUM_CLASSES, width_multiplier=0.125)
    return build_model("resnet-18-cifar", NUM_CLASSES, normalizer="split_batch_norm",
                       num_aux=max(recipe.num_aux, 1), width_multiplier=0.125,
                       image_size=32, dropout_rate=0.0)


def batch(size):
    rng = np.random.RandomState(0)
    images = rng.uniform(0, 255, (size, 32, 32, 3)).astype("float32")
    labels = rng.randint(0, NUM_CLASSES, size).astype("int32")
    return images, labels


def load_or_save(model, key, weights, out):
    names = model_variable_map(model)
    for name, variable in names.items():
        if weights is not None:
            variable.assign(weights[f"{key}/weights/{name}"])
        else:
            out[f"{key}/weights/{name}"] = keras.ops.convert_to_numpy(variable)


def main():
    keras.utils.set_random_seed(0)  # the same weights every run (the JAX side loads them)
    weights = dict(np.load(args.weights)) if args.weights else None
    out = {}
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    # PGD from a fixed start through the main BNs (inference mode).
    model = model_for(make_recipe("advprop", NUM_CLASSES))
    load_or_save(model, "pgd", weights, out)
    x, y = batch(16)
    start = x + np.random.RandomState(1).uniform(-4, 4, x.shape).astype("float32")
    adv = linf_attack(logits_fn_for(model), x, y, epsilon=4.0, step_size=1.0, num_iter=3,
                      random_start=False, x_init=start)
    out["pgd/adv"] = keras.ops.convert_to_numpy(adv)
    for name in names:
        recipe = make_recipe(name, NUM_CLASSES, **OPTIONS.get(name, {}))
        if recipe.attack is not None and recipe.attack.iterations > 1:
            # One attack step: a signed step turns a pixel whose input gradient is ~0
            # (float32 rounding differs between backends) into +-step either way, and
            # over many steps a few pixels of the batch end elsewhere; "pgd" above
            # checks the attack's iterations themselves.
            one_step = dataclasses.replace(recipe.attack, num_iter=1)
            recipe = make_recipe(name, NUM_CLASSES, attack=one_step, **OPTIONS.get(name, {}))
        model = model_for(recipe)
        load_or_save(model, name, weights, out)
        x, y = batch(BATCH.get(name, 32))
        extras = {}
        if recipe.needs_source_tags:  # which images AutoAugment made (fine-grained)
            extras["source_tags"] = (np.arange(len(y)) % 2).astype("int32")
        if "tda" in recipe.input_views:  # NoFrost*'s second view: any fixed images
            extras["tda_images"] = x[:, :, ::-1]
        ctx = StepContext(seed=seam.make_seed(3, 5), step=0, extras=extras)
        variables = model.trainable_variables
        with seam.fixed_draws():
            result = recipe.gradients(model, variables, x, y, ctx)
        out[f"{name}/loss"] = np.asarray(keras.ops.convert_to_numpy(result.loss_sum))
        keys = {id(v): k for k, v in model_variable_map(model).items()}
        for variable, grad in zip(variables, result.grads):
            if grad is not None:
                out[f"{name}/grad/{keys[id(variable)]}"] = keras.ops.convert_to_numpy(grad)
        for variable in model.non_trainable_variables:
            if "moving" in variable.name:
                out[f"{name}/stat/{keys[id(variable)]}"] = keras.ops.convert_to_numpy(variable)
        print(f"{name}: loss {float(out[f'{name}/loss']):.5f}", flush=True)
    np.savez(args.out, **out)
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    print(f"backend {keras.backend.backend()}; tensorflow modules loaded: "
          f"{sum(sys.modules[m] is not None for m in loaded)}")


if __name__ == "__main__":
    main()
