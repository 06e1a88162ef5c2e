"""Inference with a model's two BN sets: main, auxiliary, and their interpolations.

A model trained with mixture BN (AdvProp, MBN-AT, Fast AdvProp) holds a main (clean)
and an auxiliary (adversarial) BN set. NoFrost's MBNAT baseline trades clean accuracy
for robustness at inference by mixing them with a weight gamma:

  main            the main set alone (the deployed network; gamma irrelevant)
  aux             the auxiliary set alone
  logits          z = (1 - gamma) z_main + gamma z_aux: two forward passes (default)
  layers          every BN layer outputs (1 - gamma) BN_main(x) + gamma BN_aux(x)
  random_layers   a random `layer_fraction` of the BN layers mix as in "layers"; the
                  rest use the main set. The layers are drawn once from `seed` (the
                  same seed gives the same layers), a choice the paper leaves open.

Every mode runs the BN layers with moving statistics (training=False). Sweeping gamma
over [0, 1] and measuring clean and adversarial accuracy (the attack runs against the
mixed model itself, white box) draws the accuracy-robustness frontier.
"""

import numpy as np
import tensorflow as tf

from efficientnet_advprop.layers.bn_statistics import split_bn_layers  # noqa: F401
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route

MBN_MODES = ("main", "aux", "logits", "layers", "random_layers")


def has_auxiliary_bn(model):
    return bool(split_bn_layers(model))


def random_layer_subset(model, fraction, seed=0):
    """Names of round(fraction * L) of the model's L mixing BN layers, drawn from `seed`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"MBN layer_fraction must be in [0, 1], got {fraction}")
    names = [layer.name for layer in split_bn_layers(model)]
    count = int(round(fraction * len(names)))
    order = np.random.default_rng(seed).permutation(len(names))
    return frozenset(names[i] for i in sorted(order[:count]))


def mbn_logits_fn(model, mode="logits", gamma=0.5, *, layer_fraction=0.5, seed=0,
                  main_set=MAIN, aux_set=AUX):
    """x -> logits of `model` under MBN inference `mode` (see the module docstring).

    `gamma` may be a float or a scalar tensor/variable (a sweep then needs no retrace).
    """
    if mode not in MBN_MODES:
        raise ValueError(f"unknown MBN mode {mode!r}; choose from {', '.join(MBN_MODES)}")
    if mode != "main" and not has_auxiliary_bn(model):
        raise ValueError(f"MBN mode {mode!r} needs a model with auxiliary BN sets")

    def run(x, route):
        with route:
            return tf.cast(model(x, training=False), tf.float32)

    if mode in ("main", "aux"):
        bn_set = main_set if mode == "main" else aux_set
        return lambda x: run(x, bn_route(bn_set))
    if mode == "logits":
        def logits_fn(x):
            z_main = run(x, bn_route(main_set))
            z_aux = run(x, bn_route(aux_set))
            g = tf.cast(gamma, tf.float32)
            return (1.0 - g) * z_main + g * z_aux
        return logits_fn
    layers = (random_layer_subset(model, layer_fraction, seed)
              if mode == "random_layers" else None)
    return lambda x: run(x, bn_route(mix=(main_set, aux_set), mix_weight=gamma,
                                     mix_layers=layers))
