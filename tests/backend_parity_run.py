"""One backend's side of tests/test_backend_neutral.py (run in a fresh process).

    KERAS_BACKEND=tensorflow python tests/backend_parity_run.py OUT.npz
    KERAS_BACKEND=jax python tests/backend_parity_run.py OUT.npz --weights=TF.npz --block_tf

Builds the same small models on the backend Keras runs, loads the weights written by
the TensorFlow run (so both compute with identical numbers), and writes to OUT.npz the
logits through the main and the auxiliary BNs (inference and training mode, ghost BN
groups) and the moving statistics a training forward leaves. With --block_tf,
TensorFlow cannot be imported at all (sys.modules["tensorflow"] = None), and the run
fails if anything tries.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--weights", default=None)
parser.add_argument("--block_tf", action="store_true")
args = parser.parse_args()
if args.block_tf:
    sys.modules["tensorflow"] = None

import keras  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from efficientnet_advprop.layers import AUX, MAIN, bn_route  # noqa: E402
from efficientnet_advprop.models import build_model  # noqa: E402

MODELS = {  # name: (build_model arguments, training-mode routes)
    "resnet": (dict(model_name="resnet-18-cifar", num_classes=10,
                    normalizer="split_batch_norm", num_aux=1, width_multiplier=0.125,
                    image_size=32), True),
    "efficientnet": (dict(model_name="efficientnet-b0", num_classes=10,
                          normalizer="split_batch_norm", num_aux=1, image_size=32,
                          width_coefficient=0.25, depth_coefficient=0.25,
                          survival_prob=1.0, dropout_rate=0.0), True),
    "nf_resnet": (dict(model_name="nf-resnet-26-cifar", num_classes=10,
                       width_multiplier=0.125), False),
}


def forward(model, x, training, **route):
    with bn_route(**route):
        return keras.ops.convert_to_numpy(model(x, training=training))


def jitted_split_forward(model, x):
    """The [MAIN, AUX] training forward under jax.jit through Keras' stateless API."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    other = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def step(trainable, other, x):
        with bn_route(sets=[MAIN, AUX]):
            logits, _ = model.stateless_call(trainable, other, x, training=True)
        return logits

    return np.asarray(step(trainable, other, x))


def main():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    weights = dict(np.load(args.weights)) if args.weights else None
    out = {}
    for name, (kwargs, has_bn) in MODELS.items():
        keras.utils.set_random_seed(1)
        kwargs = dict(kwargs)
        model = build_model(kwargs.pop("model_name"), **kwargs)
        names = [f"{name}/{i}" for i in range(len(model.weights))]
        if weights is None:  # the reference run: make every BN set differ
            values = [v.numpy() if hasattr(v, "numpy") else keras.ops.convert_to_numpy(v)
                      for v in model.weights]
            values = [v + rng.normal(0, 0.1, v.shape).astype(v.dtype)
                      if v.ndim == 1 else v for v in values]
            values = [np.abs(v) + 0.5 if "variance" in w.path else v
                      for v, w in zip(values, model.weights)]
            model.set_weights(values)
        else:
            model.set_weights([weights[n] for n in names])
        out.update({n: keras.ops.convert_to_numpy(v) for n, v in zip(names, model.weights)})
        for i, v in enumerate(v for v in model.weights if "moving" in v.path):
            out[f"{name}:moving_loaded/{i}"] = keras.ops.convert_to_numpy(v)
        out[f"{name}:inference"] = forward(model, x, False)
        if not has_bn:
            continue
        out[f"{name}:inference_aux"] = forward(model, x, False, sets=AUX)
        out[f"{name}:train_split"] = forward(model, np.concatenate([x, x[::-1]]), True,
                                             sets=[MAIN, AUX])
        out[f"{name}:train_ghost"] = forward(model, x, True, sets=AUX, groups=2,
                                             update_stats=False)
        if keras.backend.backend() == "jax" and name == "resnet":
            out[f"{name}:train_split_jit"] = jitted_split_forward(
                model, np.concatenate([x, x[::-1]]))
        moved = [v for v in model.weights if "moving" in v.path]
        for i, v in enumerate(moved):
            out[f"{name}:moving/{i}"] = keras.ops.convert_to_numpy(v)
    np.savez(args.out, **out)
    loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
    print(f"backend {keras.backend.backend()}; tensorflow modules loaded: "
          f"{len([m for m in loaded if sys.modules[m] is not None])}")


main()
