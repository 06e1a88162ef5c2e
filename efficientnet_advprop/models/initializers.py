"""Initialisers shared by the model builders."""

import math

import keras


def he_normal_fan_out():
    """normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out_channels (untruncated).

    The official EfficientNet conv initialiser (for depthwise kernels fan_out = kh * kw
    * depth_multiplier) and torchvision's kaiming_normal_(mode="fan_out") for ResNets.
    """
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out",
                                              distribution="untruncated_normal")


def symmetric_uniform(n):
    """uniform(-1/sqrt(n), 1/sqrt(n)).

    EfficientNet's dense kernel uses n = num_classes; torchvision's nn.Linear default
    uses n = fan_in (for kernel and bias).
    """
    limit = 1.0 / math.sqrt(n)
    return keras.initializers.RandomUniform(-limit, limit)
