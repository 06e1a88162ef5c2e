"""Running the training attacks through a model: BN routing, BN mode, float32 forward."""

import contextlib

import keras

from efficientnet_advprop.attacks.pgd import attack
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route


@contextlib.contextmanager
def float32_compute(model):
    """Traces `model` calls inside the block with every layer computing in float32.

    Under a mixed-precision policy the variables are float32 already; this swaps the
    layers' compute policy while the attack graph is traced so gradients with respect
    to the input are not rounded to 8-10 bits of mantissa (attacks in bf16/fp16 measure
    about 3 points too much robustness). Outside the block nothing changes.
    """
    layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
              if layer.dtype_policy.compute_dtype != "float32"]
    saved = [layer.dtype_policy for layer in layers]
    try:
        for layer in layers:
            layer.dtype_policy = "float32"
        yield model
    finally:
        for layer, policy in zip(layers, saved):
            layer.dtype_policy = policy


def logits_fn_for(model, bn_set=MAIN, bn_mode="inference"):
    """x -> logits through `bn_set`, never updating moving statistics.

    bn_mode "inference" uses the moving statistics (training=False); "batch" uses batch
    statistics (training=True, so dropout and drop-connect are active too) with the
    moving statistics frozen, which only SplitBatchNorm supports.
    """
    training = bn_mode == "batch"
    if training:
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                raise ValueError(
                    f"attack bn_mode='batch' needs SplitBatchNorm layers; {layer.name} is "
                    "a keras BatchNormalization whose moving statistics would change")

    def logits_fn(x):
        with bn_route(bn_set, update_stats=False):
            return model(x, training=training)

    return logits_fn


def attack_model(model, images, labels, config, *, bn_set=MAIN, num_classes=None,
                 seed=None, loss_fn=None):
    """Adversarial images for `model` under `config` (an AttackConfig), in float32.

    `loss_fn` (logits, labels) -> per-sample objective replaces the cross-entropy.
    """
    num_classes = num_classes or model.output_shape[-1]
    with float32_compute(model):
        return attack(logits_fn_for(model, bn_set, config.bn_mode), images, labels,
                      config, num_classes=num_classes, seed=seed, loss_fn=loss_fn)
