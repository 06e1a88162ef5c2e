"""Normaliser-free bottleneck ResNets (NF-ResNet-26/50/101), as used by NoFrost.

Brock, De & Smith 2021 (NF-ResNets); Wang et al. 2022 (NoFrost: adversarial training
without batch norm). No normalisation layer anywhere; instead:

* every convolution is a `WeightStandardizedConv2D` (scaled WS with a learnable gain,
  with a bias);
* every activation is a `ScaledActivation` (``gamma * act``, unit variance out for
  unit-variance Gaussian in);
* residual blocks are pre-activation ``out = shortcut + alpha * f(beta * x)``: the
  block first computes ``h = gamma * act(beta * x)``, the branch is ``1x1 -> act ->
  3x3 (stride) -> act -> 1x1 (expansion 4)`` on ``h``; with ``beta = 1 / sqrt(expected
  variance of x)``. The expected variance starts at 1, grows by ``alpha ** 2`` per
  block and is reset to ``1 + alpha ** 2`` after each stage's first (transition)
  block, whose shortcut is ``avg-pool 2x2/2 (when strided) -> 1x1 WS conv`` applied
  to ``h`` (the scaled pre-activation), as timm's ``DownsampleAvg`` and the NoFrost code
  (amazon-research/normalizer-free-robust-training). Other blocks' shortcut is the
  identity on ``x``. (For ReLU, ``act(beta * x) == beta * act(x)``, i.e. the NFNet
  code's ``act(x) * beta``.) ``compensate_avgpool_var=True`` (off by default; no paper
  or reference code has it) multiplies the pooled shortcut by 2, which keeps the
  variance of *spatially uncorrelated* activations (a 2x2 mean of them has 1/4 of it).
  On real images neighbouring activations are correlated: at initialisation on 256
  CIFAR-10 images (nf-resnet-26/50-cifar, results/signal_propagation/) the reference
  variance goes 0.26 -> 0.17 -> 0.09-0.10 -> 0.05-0.06 over the four stages (x 0.56 to
  x 0.68 per transition), and the x 2 multiplies stage s by exactly 4 ** (s - 1), i.e.
  0.26 -> 0.67-0.72 -> 1.5-1.6 -> 3.2-3.9 (x 2.2 to x 2.7 per transition).
* the last conv of every branch has its gain initialised to 0, so at initialisation
  every block is the identity on its shortcut.

Stem: with pre-activation blocks the stem ends without an activation (the first block
applies it), as in the NF-ResNet reference: ``WS conv 7x7/2 (64) -> x gamma ->
max-pool 3x3/2`` for 224-pixel images; the ``-cifar`` variants use ``WS conv 3x3/1
(64) -> x gamma`` and no pooling. The ``x gamma`` (``stem_gain``, the activation's gain,
1.714 for ReLU) is timm's: NoFrost builds timm's ``nf_resnet26/50``, which folds the
activation gain into the weights of *every* scaled-WS convolution, the stem's included
(``ScaledStdConv2d(..., gamma=...)``); everywhere else the gain sits in the
`ScaledActivation` in front of the convolution, which is the same product.
``stem_gain=False`` leaves it out (this project's models before the second fidelity
pass). After the last stage: scaled activation, global average pooling, dropout and
the float32 ``predictions`` Dense (logits).

Layer names: ``stem_conv``, ``stem_gain``, ``stem_pool``, ``stem_data_gain`` (only
with ``stage_gains``), ``stage{s}_block{b}_{preact, conv1, act1,
conv2, act2, conv3, drop, alpha, shortcut_pool, shortcut_pool_gain (only with
``compensate_avgpool_var``), shortcut_conv, out}`` with s, b from 1,
``stage{s}_block1_data_gain`` (only with ``stage_gains``), ``final_activation``, ``avg_pool``, ``top_dropout``, ``predictions``.
"""

import math

import keras

from efficientnet_advprop.layers.nf_layers import Scale, ScaledActivation
from efficientnet_advprop.layers.preprocessing import InputNormalization
from efficientnet_advprop.layers.stochastic_depth import StochasticDepth
from efficientnet_advprop.layers.weight_standardization import (
    WeightStandardizedConv2D, activation_gamma)
from efficientnet_advprop.models.initializers import classifier_initializers
from efficientnet_advprop.models.resnet import scaled_widths

NF_RESNET_SPECS = {
    "nf-resnet-26": (2, 2, 2, 2),
    "nf-resnet-50": (3, 4, 6, 3),
    "nf-resnet-101": (3, 4, 23, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)  # the same as ResNet's (scaled_widths)
STEM_FILTERS = 64
EXPANSION = 4
CIFAR_SUFFIX = "-cifar"
IMAGE_SIZE = 224
CIFAR_IMAGE_SIZE = 32
NUM_STAGE_GAINS = 5  # stem, then each of the 4 stages' first block
NOFROST_PRESET = {"dropout_rate": 0.25, "drop_path_rate": 0.1}


def _parse_name(model_name):
    """``nf-resnet-50-cifar`` -> (``nf-resnet-50``, True); ValueError when unknown."""
    name = str(model_name).lower().replace("_", "-")
    cifar = name.endswith(CIFAR_SUFFIX)
    base = name[:-len(CIFAR_SUFFIX)] if cifar else name
    if base not in NF_RESNET_SPECS:
        choices = [n + s for n in NF_RESNET_SPECS for s in ("", CIFAR_SUFFIX)]
        raise ValueError(f"unknown NF-ResNet {model_name!r}; choose from "
                         f"{', '.join(choices)}")
    return base, cifar


def model_names():
    """Every name `nf_resnet` accepts (each depth, with and without ``-cifar``)."""
    return [n + s for n in NF_RESNET_SPECS for s in ("", CIFAR_SUFFIX)]


def default_image_size(model_name):
    """224 for the ImageNet variants, 32 for the ``-cifar`` ones."""
    return CIFAR_IMAGE_SIZE if _parse_name(model_name)[1] else IMAGE_SIZE


def block_betas(model_name, alpha=0.2):
    """``[(stage, block, beta)]`` of every residual block, stage and block from 1."""
    base, _ = _parse_name(model_name)
    out = []
    expected_var = 1.0
    for stage, depth in enumerate(NF_RESNET_SPECS[base], start=1):
        for block in range(1, depth + 1):
            out.append((stage, block, 1.0 / math.sqrt(expected_var)))
            if block == 1:  # the transition block's shortcut has unit variance
                expected_var = 1.0
            expected_var += alpha ** 2
    return out


def count_nf_resnet_params(model_name, num_classes=1000, include_top=True):
    """Trainable parameter count, from the block counts alone (no variables).

    Every WS conv has ``kh * kw * in * out`` kernel weights, ``out`` biases and
    ``out`` gains.
    """
    base, cifar = _parse_name(model_name)

    def conv(k, cin, cout):
        return k * k * cin * cout + 2 * cout

    total = conv(3 if cifar else 7, 3, STEM_FILTERS)
    channels = STEM_FILTERS
    for width, depth in zip(STAGE_WIDTHS, NF_RESNET_SPECS[base]):
        out = width * EXPANSION
        for block in range(depth):
            if block == 0:
                total += conv(1, channels, out)
            total += conv(1, channels, width) + conv(3, width, width) + conv(1, width, out)
            channels = out
    if include_top:
        total += channels * num_classes + num_classes
    return total


def _conv(filters, kernel_size, name, strides=1, zero_gain=False):
    return WeightStandardizedConv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=True,
        gain_initializer="zeros" if zero_gain else "ones", name=name)


def _block(x, prefix, width, strides, beta, alpha, activation, drop_rate, transition,
           compensate_avgpool_var=False):
    h = ScaledActivation(activation, input_scale=beta, name=prefix + "preact")(x)
    shortcut = x
    if transition:
        s = h
        if strides > 1:
            s = keras.layers.AveragePooling2D(strides, strides=strides, padding="same",
                                              name=prefix + "shortcut_pool")(s)
            if compensate_avgpool_var:
                # Optional (not in the references): a k x k mean of uncorrelated
                # unit-variance values has variance 1/k^2, and x k restores it.
                s = Scale(float(strides), name=prefix + "shortcut_pool_gain")(s)
        shortcut = _conv(width * EXPANSION, 1, prefix + "shortcut_conv")(s)
    y = _conv(width, 1, prefix + "conv1")(h)
    y = ScaledActivation(activation, name=prefix + "act1")(y)
    y = _conv(width, 3, prefix + "conv2", strides=strides)(y)
    y = ScaledActivation(activation, name=prefix + "act2")(y)
    y = _conv(width * EXPANSION, 1, prefix + "conv3", zero_gain=True)(y)
    if drop_rate > 0:
        y = StochasticDepth(1.0 - drop_rate, name=prefix + "drop")(y)
    y = Scale(alpha, name=prefix + "alpha")(y)
    return keras.layers.Add(name=prefix + "out")([y, shortcut])


def nf_resnet(model_name, num_classes=1000, image_size=None, preprocessing="imagenet",
              activation="relu", alpha=0.2, drop_path_rate=0.0, dropout_rate=0.0,
              small_stem=None, include_top=True, name=None, norm=None,
              compensate_avgpool_var=False, width_multiplier=1.0, stem_gain=True,
              stage_gains=None, classifier_init=None):
    """Builds a functional NF-ResNet taking float RGB in [0, 255].

    Args:
      model_name: ``nf-resnet-26``, ``nf-resnet-50``, ``nf-resnet-101``, optionally
        with ``-cifar`` (small stem, 32-pixel default).
      num_classes: size of the logits layer.
      image_size: input height and width (None: `default_image_size`).
      preprocessing: `InputNormalization` mode (imagenet, advprop or none).
      activation: a `GAMMA_TABLE` name.
      alpha: residual branch scale.
      drop_path_rate: stochastic-depth drop rate of the last block; block i of n
        (from 0) drops with ``drop_path_rate * i / (n - 1)`` (0 disables it).
      dropout_rate: dropout before the classifier.
      small_stem: None: from the name; True/False forces the CIFAR / ImageNet stem.
      include_top: with False the model ends at ``final_activation`` (a feature map).
      name: Keras model name (None: the model name).
      norm: must be None (accepted for the registry's builder signature; NF-ResNets
        have no normalisation layers).
      compensate_avgpool_var: multiply the 2x2 average-pooled transition shortcut by 2
        (layer ``stage{s}_block1_shortcut_pool_gain``). False (the default) is the
        reference shortcut (timm ``DownsampleAvg``, the NoFrost code). The x 2 keeps
        white-noise activations at unit variance through the pool, but on real images
        it inflates the variance at each stage change (see the module docstring).
      width_multiplier: scales every width (as ResNet's `scaled_widths`).
      stem_gain: multiply the stem convolution's output by the activation gain
        (layer ``stem_gain``), as timm's NF-ResNets that NoFrost trains.
      stage_gains: None (the published model), or 5 positive constants that multiply
        the stem's output (layer ``stem_data_gain``) and the output of each stage's
        first block (``stage{s}_block1_data_gain``); not in any paper: a diagnostic
        for the variance the stem and the pooled transitions lose on real images
        (`efficientnet_advprop.models.signal.fit_stage_gains` sets them from a batch).
      classifier_init: None or "official" (normal(0, 0.01), timm's) or "zeros"
        (`initializers.classifier_initializers`).

    Returns:
      A `keras.Model` whose output is the LOGITS (no softmax).
    """
    if norm is not None:
        raise ValueError("NF-ResNets have no normalisation layers; norm must be None")
    stem_filters, stage_widths = scaled_widths(width_multiplier)  # as ResNet's
    base, cifar = _parse_name(model_name)
    activation_gamma(activation)  # ValueError on unknown names
    small = cifar if small_stem is None else bool(small_stem)
    image_size = default_image_size(model_name) if image_size is None else int(image_size)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if stage_gains is not None:
        stage_gains = tuple(float(g) for g in stage_gains)
        if len(stage_gains) != NUM_STAGE_GAINS or min(stage_gains) <= 0:
            raise ValueError(f"stage_gains must be {NUM_STAGE_GAINS} positive numbers (stem, "
                             f"stages 1-4), got {stage_gains}")

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32",
                         name="images")
    x = InputNormalization(preprocessing, name="input_normalization")(inputs)
    if small:
        x = _conv(stem_filters, 3, "stem_conv")(x)
    else:
        x = _conv(stem_filters, 7, "stem_conv", strides=2)(x)
    if stem_gain:
        x = Scale(activation_gamma(activation), name="stem_gain")(x)
    if not small:
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    if stage_gains:
        x = Scale(stage_gains[0], name="stem_data_gain")(x)

    betas = block_betas(base, alpha)
    total = len(betas)
    for index, (stage, block, beta) in enumerate(betas):
        drop_rate = drop_path_rate * index / max(total - 1, 1)
        strides = 2 if (block == 1 and stage > 1) else 1
        x = _block(x, f"stage{stage}_block{block}_", stage_widths[stage - 1], strides,
                   beta, alpha, activation, drop_rate, transition=block == 1,
                   compensate_avgpool_var=compensate_avgpool_var)
        if stage_gains and block == 1:
            x = Scale(stage_gains[stage], name=f"stage{stage}_block1_data_gain")(x)

    x = ScaledActivation(activation, name="final_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate and dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
        # Logits in float32 even under a mixed-precision policy.
        kernel, bias = classifier_initializers(
            classifier_init, keras.initializers.RandomNormal(stddev=0.01))
        x = keras.layers.Dense(num_classes, kernel_initializer=kernel,
                               bias_initializer=bias, dtype="float32",
                               name="predictions")(x)
    return keras.Model(inputs, x, name=name or base + (CIFAR_SUFFIX if cifar else ""))
