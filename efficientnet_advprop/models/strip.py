"""The deployed network: a model's SplitBatchNorm layers replaced by stock Keras
BatchNormalization layers holding one BN set (export and the fit() wrapper use it)."""

import keras

from efficientnet_advprop.layers.split_batch_norm import MAIN, SplitBatchNorm


def _clone_layer(layer):
    if isinstance(layer, SplitBatchNorm):
        return keras.layers.BatchNormalization(
            momentum=layer.momentum, epsilon=layer.epsilon, center=layer.center,
            scale=layer.scale, name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def strip_auxiliary_bn(model, bn_set=MAIN):
    """A copy of `model` that normalises with BN set `bn_set` only, as stock layers.

    The weights are read in cross-replica context, so moving statistics are the mean
    over replicas. Pass bn_set > 0 to export an auxiliary set instead (for analysis).
    Nested functional sub-models (the stage groups of the deep ResNets) are cloned
    layer by layer too.
    """
    clean = keras.models.clone_model(model, clone_function=_clone_layer, recursive=True)
    targets = {layer.name: layer
               for layer in clean._flatten_layers(include_self=False, recursive=True)}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not layer.weights or isinstance(layer, keras.Model):
            continue  # a nested model's variables are set through its own layers
        target = targets[layer.name]
        if isinstance(layer, SplitBatchNorm):
            values = []
            if layer.scale:
                values.append(layer.gammas[bn_set])
            if layer.center:
                values.append(layer.betas[bn_set])
            values += [layer.moving_means[bn_set], layer.moving_variances[bn_set]]
            target.set_weights([keras.ops.convert_to_numpy(v) for v in values])
        else:
            target.set_weights(layer.get_weights())
    return clean
