"""Initialisers shared by the model builders."""

import math

import keras


CLASSIFIER_INITS = ("official", "zeros")


def classifier_initializers(kind, kernel, bias="zeros"):
    """(kernel, bias) initialisers of a model's classifier: the family's published
    ones (`kernel`, `bias`) for kind "official" or None, zeros for "zeros".

    Zeros start every logit at 0 (the loss at log(classes)). EfficientNet's official
    kernel, uniform +-1/sqrt(classes), is scaled for 1,000 classes: with 10 its logits
    start with a standard deviation near 4, and a short run spends its first epochs
    shrinking them (docs/embedded_default.md measures it).
    """
    if kind in (None, "official"):
        return kernel, bias
    if kind == "zeros":
        return "zeros", "zeros"
    raise ValueError(f"classifier_init={kind!r}: choose from {', '.join(CLASSIFIER_INITS)}")


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
