"""EfficientNet B0-B8 and L2, layer for layer the official TPU EfficientNet builder.

The architecture is kept as data (block strings and the compound-scaling table); the
same data drive the Keras builder `efficientnet` and the analytic parameter counter
`count_efficientnet_params`, so the largest models can be checked without building them.

Layers use the Keras-applications names (``stem_conv``, ``block2a_expand_conv``, ...),
and every normalisation layer comes from an injected factory ``norm(name)`` (see
`efficientnet_advprop.models.normalization.make_normalizer`), which is how one
definition serves plain batch norm, AdvProp's split batch norm, group norm, etc.
"""

import math
import re
from typing import NamedTuple, Optional, Tuple

import keras

from efficientnet_advprop.layers.depthwise import DepthwiseConv2D
from efficientnet_advprop.layers.preprocessing import InputNormalization
from efficientnet_advprop.layers.stochastic_depth import StochasticDepth
from efficientnet_advprop.models.initializers import (classifier_initializers, he_normal_fan_out,
                                                      symmetric_uniform)
from efficientnet_advprop.models.normalization import make_normalizer

DEPTH_DIVISOR = 8
STEM_FILTERS = 32
HEAD_FILTERS = 1280
DEFAULT_SURVIVAL_PROB = 0.8

BLOCK_STRINGS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


class ScalingParams(NamedTuple):
    width_coefficient: float
    depth_coefficient: float
    resolution: int
    dropout_rate: float


# Compound scaling: (width, depth, resolution, dropout rate).
EFFICIENTNET_PARAMS = {
    "efficientnet-b0": ScalingParams(1.0, 1.0, 224, 0.2),
    "efficientnet-b1": ScalingParams(1.0, 1.1, 240, 0.2),
    "efficientnet-b2": ScalingParams(1.1, 1.2, 260, 0.3),
    "efficientnet-b3": ScalingParams(1.2, 1.4, 300, 0.3),
    "efficientnet-b4": ScalingParams(1.4, 1.8, 380, 0.4),
    "efficientnet-b5": ScalingParams(1.6, 2.2, 456, 0.4),
    "efficientnet-b6": ScalingParams(1.8, 2.6, 528, 0.5),
    "efficientnet-b7": ScalingParams(2.0, 3.1, 600, 0.5),
    "efficientnet-b8": ScalingParams(2.2, 3.6, 672, 0.5),
    "efficientnet-l2": ScalingParams(4.3, 5.3, 800, 0.5),
}


class BlockArgs(NamedTuple):
    """One stage of MBConv blocks (or, after `block_specs`, one block)."""
    kernel_size: int
    num_repeat: int
    input_filters: int
    output_filters: int
    expand_ratio: int
    se_ratio: Optional[float]
    strides: Tuple[int, int]
    id_skip: bool = True


class BlockSpec(NamedTuple):
    """One MBConv block after width/depth scaling.

    name: layer-name prefix without the trailing underscore (``block2b``).
    args: the block's arguments (rounded filters, num_repeat 1, its own strides).
    survival_prob: drop-connect keep probability, None when drop-connect is off.
    """
    name: str
    index: int
    args: BlockArgs
    survival_prob: Optional[float]

    @property
    def has_skip(self):
        a = self.args
        return (a.id_skip and all(s == 1 for s in a.strides)
                and a.input_filters == a.output_filters)


def decode_block_string(block_string):
    """Parses ``r2_k3_s22_e6_i16_o24_se0.25`` (optionally ``_noskip``) to `BlockArgs`."""
    options = {}
    for op in block_string.split("_"):
        match = re.fullmatch(r"([a-z]+)(\d.*)?", op)
        if match is None:
            raise ValueError(f"bad block string {block_string!r}: cannot parse {op!r}")
        key, value = match.groups()
        if value is not None:
            options[key] = value
    missing = [k for k in ("r", "k", "s", "e", "i", "o") if k not in options]
    if missing:
        raise ValueError(f"bad block string {block_string!r}: missing {missing}")
    if len(options["s"]) != 2:
        raise ValueError(f"bad block string {block_string!r}: strides must be two digits")
    return BlockArgs(
        kernel_size=int(options["k"]),
        num_repeat=int(options["r"]),
        input_filters=int(options["i"]),
        output_filters=int(options["o"]),
        expand_ratio=int(options["e"]),
        se_ratio=float(options["se"]) if "se" in options else None,
        strides=(int(options["s"][0]), int(options["s"][1])),
        id_skip="noskip" not in block_string.split("_"),
    )


def decode_blocks(block_strings=BLOCK_STRINGS):
    return [decode_block_string(s) for s in block_strings]


def round_filters(filters, width_coefficient, depth_divisor=DEPTH_DIVISOR, min_depth=None):
    """Scales a channel count by the width coefficient, rounded to the divisor."""
    if not width_coefficient:
        return filters
    scaled = filters * width_coefficient
    min_depth = min_depth or depth_divisor
    new_filters = max(min_depth, int(scaled + depth_divisor / 2) // depth_divisor
                      * depth_divisor)
    if new_filters < 0.9 * scaled:  # never round down by more than 10%
        new_filters += depth_divisor
    return int(new_filters)


def round_repeats(repeats, depth_coefficient):
    """Scales a stage's number of blocks by the depth coefficient (ceiling)."""
    if not depth_coefficient:
        return repeats
    return int(math.ceil(depth_coefficient * repeats))


def canonical_name(model_name):
    """``b0`` / ``efficientnet-b0`` / ``EfficientNet-B0`` -> ``efficientnet-b0``."""
    name = model_name.lower().replace("_", "-")
    if not name.startswith("efficientnet-"):
        name = "efficientnet-" + name
    if name not in EFFICIENTNET_PARAMS:
        raise ValueError(f"unknown EfficientNet {model_name!r}; choose from "
                         f"{', '.join(EFFICIENTNET_PARAMS)}")
    return name


def efficientnet_params(model_name):
    """The `ScalingParams` of a model name."""
    return EFFICIENTNET_PARAMS[canonical_name(model_name)]


def _resolve_coefficients(model_name, width_coefficient, depth_coefficient):
    params = efficientnet_params(model_name)
    width = params.width_coefficient if width_coefficient is None else width_coefficient
    depth = params.depth_coefficient if depth_coefficient is None else depth_coefficient
    return width, depth


def block_specs(model_name, width_coefficient=None, depth_coefficient=None,
                survival_prob=DEFAULT_SURVIVAL_PROB):
    """Every MBConv block of the scaled network, in order (pure, no TensorFlow)."""
    width, depth = _resolve_coefficients(model_name, width_coefficient, depth_coefficient)
    stages = []
    for args in decode_blocks():
        stages.append(args._replace(
            input_filters=round_filters(args.input_filters, width),
            output_filters=round_filters(args.output_filters, width),
            num_repeat=round_repeats(args.num_repeat, depth)))
    total = sum(a.num_repeat for a in stages)
    specs = []
    for stage, args in enumerate(stages):
        for repeat in range(args.num_repeat):
            block_args = args._replace(num_repeat=1)
            if repeat > 0:
                block_args = block_args._replace(input_filters=args.output_filters,
                                                 strides=(1, 1))
            index = len(specs)
            if survival_prob:
                drop_rate = 1.0 - survival_prob
                prob = 1.0 - drop_rate * float(index) / total
            else:
                prob = None
            specs.append(BlockSpec(f"block{stage + 1}{_letters(repeat)}", index,
                                   block_args, prob))
    return specs


def _letters(index):
    """0 -> a, 25 -> z, 26 -> aa (Keras applications stop at z; no model gets there)."""
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(97 + rem) + out
    return out


def count_efficientnet_params(model_name, num_classes=1000, width_coefficient=None,
                              depth_coefficient=None, num_aux=0):
    """Trainable parameter count with batch norm (+ `num_aux` auxiliary BN sets).

    Computed from the block arguments alone, without creating any variable.
    """
    width, depth = _resolve_coefficients(model_name, width_coefficient, depth_coefficient)

    def bn(channels):
        return 2 * channels * (1 + num_aux)

    stem = round_filters(STEM_FILTERS, width)
    total = 3 * 3 * 3 * stem + bn(stem)
    specs = block_specs(model_name, width, depth)
    for spec in specs:
        a = spec.args
        filters = a.input_filters * a.expand_ratio
        if a.expand_ratio != 1:
            total += a.input_filters * filters + bn(filters)
        total += a.kernel_size * a.kernel_size * filters + bn(filters)
        if a.se_ratio is not None and 0 < a.se_ratio <= 1:
            reduced = max(1, int(a.input_filters * a.se_ratio))
            total += filters * reduced + reduced + reduced * filters + filters
        total += filters * a.output_filters + bn(a.output_filters)
    head = round_filters(HEAD_FILTERS, width)
    total += specs[-1].args.output_filters * head + bn(head)
    total += head * num_classes + num_classes
    return total


def _mbconv_block(x, spec, norm):
    a = spec.args
    p = spec.name + "_"
    inputs = x
    filters = a.input_filters * a.expand_ratio
    if a.expand_ratio != 1:
        x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False,
                                kernel_initializer=he_normal_fan_out(),
                                name=p + "expand_conv")(x)
        x = norm(p + "expand_bn")(x)
        x = keras.layers.Activation("swish", name=p + "expand_activation")(x)
    x = DepthwiseConv2D(a.kernel_size, strides=a.strides, padding="same", use_bias=False,
                        depthwise_initializer=he_normal_fan_out(), name=p + "dwconv")(x)
    x = norm(p + "bn")(x)
    x = keras.layers.Activation("swish", name=p + "activation")(x)
    if a.se_ratio is not None and 0 < a.se_ratio <= 1:
        reduced = max(1, int(a.input_filters * a.se_ratio))
        se = keras.layers.GlobalAveragePooling2D(name=p + "se_squeeze")(x)
        se = keras.layers.Reshape((1, 1, filters), name=p + "se_reshape")(se)
        se = keras.layers.Conv2D(reduced, 1, padding="same", activation="swish",
                                 use_bias=True, kernel_initializer=he_normal_fan_out(),
                                 name=p + "se_reduce")(se)
        se = keras.layers.Conv2D(filters, 1, padding="same", activation="sigmoid",
                                 use_bias=True, kernel_initializer=he_normal_fan_out(),
                                 name=p + "se_expand")(se)
        x = keras.layers.Multiply(name=p + "se_excite")([x, se])
    x = keras.layers.Conv2D(a.output_filters, 1, padding="same", use_bias=False,
                            kernel_initializer=he_normal_fan_out(),
                            name=p + "project_conv")(x)
    x = norm(p + "project_bn")(x)
    if spec.has_skip:
        if spec.survival_prob:
            x = StochasticDepth(spec.survival_prob, name=p + "drop")(x)
        x = keras.layers.Add(name=p + "add")([x, inputs])
    return x


def efficientnet(model_name, num_classes=1000, image_size=None, norm=None,
                 preprocessing="imagenet", dropout_rate=None,
                 survival_prob=DEFAULT_SURVIVAL_PROB, width_coefficient=None,
                 depth_coefficient=None, include_top=True, name=None,
                 classifier_init=None):
    """Builds a functional EfficientNet taking float RGB in [0, 255].

    Args:
      model_name: ``efficientnet-b0`` .. ``efficientnet-b8``, ``efficientnet-l2`` (or
        the short ``b0`` ... ``l2``).
      num_classes: size of the logits layer.
      image_size: input height and width (None: the table's resolution).
      norm: normaliser factory ``norm(name) -> layer`` (None: plain batch norm with
        momentum 0.99, epsilon 1e-3).
      preprocessing: `InputNormalization` mode (imagenet, advprop or none).
      dropout_rate: dropout before the classifier (None: the table's value).
      survival_prob: official drop-connect parameter: block i of n (counted after
        repeats, from 0) keeps its residual branch with probability
        ``1 - (1 - survival_prob) * i / n``; None or 0 disables drop-connect.
      width_coefficient, depth_coefficient: override the table (tiny test models).
      include_top: with False the model ends at ``top_activation`` (a feature map).
      name: Keras model name (None: the model name).
      classifier_init: None or "official" (uniform +-1/sqrt(num_classes), the
        official builder's) or "zeros" (`classifier_initializers`).

    Returns:
      A `keras.Model` whose output is the LOGITS (no softmax).
    """
    model_name = canonical_name(model_name)
    params = EFFICIENTNET_PARAMS[model_name]
    width, depth = _resolve_coefficients(model_name, width_coefficient, depth_coefficient)
    image_size = params.resolution if image_size is None else int(image_size)
    dropout_rate = params.dropout_rate if dropout_rate is None else dropout_rate
    if norm is None:
        norm = make_normalizer("batch_norm", num_aux=0, momentum=0.99, epsilon=1e-3)

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32",
                         name="images")
    x = InputNormalization(preprocessing, name="input_normalization")(inputs)
    x = keras.layers.Conv2D(round_filters(STEM_FILTERS, width), 3, strides=2,
                            padding="same", use_bias=False,
                            kernel_initializer=he_normal_fan_out(), name="stem_conv")(x)
    x = norm("stem_bn")(x)
    x = keras.layers.Activation("swish", name="stem_activation")(x)

    for spec in block_specs(model_name, width, depth, survival_prob):
        x = _mbconv_block(x, spec, norm)

    x = keras.layers.Conv2D(round_filters(HEAD_FILTERS, width), 1, padding="same",
                            use_bias=False, kernel_initializer=he_normal_fan_out(),
                            name="top_conv")(x)
    x = norm("top_bn")(x)
    x = keras.layers.Activation("swish", name="top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate and dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
        # Logits in float32 even under a mixed-precision policy.
        kernel, bias = classifier_initializers(classifier_init,
                                               symmetric_uniform(num_classes))
        x = keras.layers.Dense(num_classes, kernel_initializer=kernel,
                               bias_initializer=bias, dtype="float32",
                               name="predictions")(x)
    return keras.Model(inputs, x, name=name or model_name)
