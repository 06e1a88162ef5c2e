"""Normaliser factories injected into every model builder.

A builder never creates a normalisation layer itself: it calls ``norm(name)`` with the
Keras-applications style name of the layer (``stem_bn``, ``block1a_bn``, ...), and the
factory decides what that layer is. This is how one EfficientNet definition serves plain
training, AdvProp (auxiliary BNs), group norm and norm-free variants.
"""

import functools

import keras

from efficientnet_advprop.layers.split_batch_norm import SplitBatchNorm

NORMALIZERS = ("batch_norm", "split_batch_norm", "keras_batch_norm", "group_norm",
               "instance_norm", "none")


def make_normalizer(kind="batch_norm", num_aux=0, momentum=0.99, epsilon=1e-3,
                    synchronized=False, groups=32, sync_group_size=None):
    """Returns ``norm(name, **overrides) -> keras.layers.Layer``.

    `synchronized` and `sync_group_size` are SplitBatchNorm's (keras_batch_norm can only
    synchronise over all replicas: it takes no group size).

    kinds:
      batch_norm / split_batch_norm: `SplitBatchNorm` with `num_aux` auxiliary sets
        (0 = a plain batch norm whose moving statistics are replica-consistent).
      keras_batch_norm: stock `keras.layers.BatchNormalization` (what exported
        inference models use; no auxiliary sets).
      group_norm: `keras.layers.GroupNormalization` with `groups` (reduced to a divisor
        of the channel count), instance_norm: one group per channel.
      none: identity.
    """
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {kind!r}; choose from {', '.join(NORMALIZERS)}")
    if kind != "split_batch_norm" and kind != "batch_norm" and num_aux:
        raise ValueError(f"normalizer {kind!r} has no auxiliary sets (num_aux={num_aux})")
    if kind in ("batch_norm", "split_batch_norm"):
        return functools.partial(_split_bn, num_aux=num_aux, momentum=momentum,
                                 epsilon=epsilon, synchronized=synchronized,
                                 sync_group_size=sync_group_size)
    if sync_group_size is not None:
        raise ValueError(f"normalizer {kind!r} takes no sync_group_size (SplitBatchNorm "
                         "only)")
    if kind == "keras_batch_norm":
        return functools.partial(_keras_bn, momentum=momentum, epsilon=epsilon,
                                 synchronized=synchronized)
    if kind == "group_norm":
        return functools.partial(_group_norm, groups=groups, epsilon=epsilon)
    if kind == "instance_norm":
        return functools.partial(_group_norm, groups=-1, epsilon=epsilon)
    return _identity


def _split_bn(name, num_aux, momentum, epsilon, synchronized, sync_group_size,
              **overrides):
    return SplitBatchNorm(num_aux=num_aux, momentum=momentum, epsilon=epsilon,
                          synchronized=synchronized, sync_group_size=sync_group_size,
                          name=name, **overrides)


def _keras_bn(name, momentum, epsilon, synchronized, **overrides):
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon,
                                           synchronized=synchronized, name=name,
                                           **overrides)


def _group_norm(name, groups, epsilon, **overrides):
    return _AdaptiveGroupNorm(groups=groups, epsilon=epsilon, name=name, **overrides)


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class _AdaptiveGroupNorm(keras.layers.GroupNormalization):
    """GroupNormalization whose group count shrinks to the largest divisor of channels.

    ``groups=-1`` means one group per channel (instance norm).
    """

    def build(self, input_shape):
        channels = input_shape[-1]
        if self.groups == -1 or self.groups > channels:
            self.groups = channels
        while channels % self.groups:
            self.groups -= 1
        super().build(input_shape)


def _identity(name, **overrides):
    return keras.layers.Identity(name=name)
