"""ResNet-18 .. ResNet-200 (torchvision v1.5) and the deep ResNets of Xie & Yuille.

The bottleneck block puts its stride on the 3x3 convolution (torchvision's "v1.5", also
the layout of the ImageNet adversarial-training code of Xie et al.); the shortcut is a
1x1 projection (convolution + norm) wherever the shape changes, identity elsewhere.
There are no convolution biases; only the classifier has one.

As in `efficientnet`, the architecture is kept as data (`RESNET_BLOCKS`), which drive
both the Keras builder `resnet` and the analytic parameter counter
`count_resnet_params`, and every normalisation layer comes from an injected factory
``norm(name, **overrides)`` (see `efficientnet_advprop.models.normalization`).

Geometry equals torchvision's: the 7x7/2 stem convolution pads 3, the 3x3/2 max-pool
pads 1, and every strided 3x3 convolution pads 1 on every side. Keras' ``"same"``
padding pads strided convolutions of even inputs asymmetrically (0 before, 1 after), so
these layers get an explicit `ZeroPadding2D` and ``"valid"`` padding. The max-pool
follows a ReLU, so zero padding is the same as torchvision's -inf padding.

Deep ResNets (Xie & Yuille, "Intriguing properties of adversarial training at scale",
ICLR 2020)
-----------------------------------------------------------------------------------
A bottleneck ResNet with stage block counts ``[n1, n2, n3, n4]`` has depth
``3 * (n1 + n2 + n3 + n4) + 2`` (three convolutions per block, plus the stem
convolution and the classifier), so ResNet-338, -518 and -638 need 112, 172 and 212
blocks. The split over stages used here (the paper's table was not available to check
against) extends the standard family by one rule: ResNet-200 ``[3, 24, 36, 3]`` is the
base, stages 1, 2 and 4 keep its block counts, and every added block goes to stage 3,
the 14x14 stage that already holds most of the depth (this is how ResNet-50 became
ResNet-101, whose 17 added blocks all went to stage 3):

* ResNet-338: ``[3, 24, 82, 3]``  (36 + 46 blocks in stage 3; sum 112),
* ResNet-518: ``[3, 24, 142, 3]`` (36 + 106; sum 172),
* ResNet-638: ``[3, 24, 182, 3]`` (36 + 146; sum 212).

ResNet-26 ``[2, 2, 2, 2]`` is the bottleneck counterpart of ResNet-18.

Nested stage groups (deep ResNets)
----------------------------------
Keras builds, clones and deserialises a functional model with a depth-first recursion
over its graph, about one Python frame per layer on the longest path (some 10 frames
per bottleneck block). ResNet-200 (66 blocks) needs about 690 frames, under Python's
default limit of 1000; ResNet-338, -518 and -638 (112, 172, 212 blocks) need 1,150 to
2,150 and raise ``RecursionError`` (they only build where something has raised the
limit: importing IPython, which Keras does when it is installed, sets it to 3000).
So networks with more than `FLAT_MAX_BLOCKS` blocks (every ResNet deeper than
ResNet-200) are built from nested functional sub-models: every stage is cut into
``ceil(blocks / MAX_BLOCKS_PER_GROUP)`` consecutive groups of near-equal size, each a
`keras.Model` named ``stage{s}_group{g}`` (s, g from 1) called as one layer of the
outer model. No graph is then deeper than 32 blocks (~330 frames), and the interpreter's
limit is left alone. The groups of ResNet-338 are stage 1: 3, stage 2: 24, stage 3:
28 + 27 + 27, stage 4: 3 blocks; ResNet-518's stage 3 is 29 + 29 + 28 + 28 + 28 and
ResNet-638's 31 + 31 + 30 + 30 + 30 + 30 (`stage_groups`). The layers inside a group
keep the flat model's names (``stage3_block40_conv2`` ...), so the leaf layers, their
variables and the per-layer checkpoint keys are those of a flat build; only the outer
model's ``layers`` / ``get_layer`` see the groups instead of the blocks (walk
``model._flatten_layers()`` to reach a block's layers; `feature_endpoints`,
`strip_auxiliary_bn` and the `bn_route` of SplitBatchNorm work through the groups).
ResNet-18 .. ResNet-200 stay flat unless ``blocks_per_group`` asks for groups.

Initialisers
------------
Convolutions: He normal with fan_out, ``normal(0, sqrt(2 / (kh * kw * out)))``
(torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``). Classifier:
torchvision's ``nn.Linear`` default, kernel and bias both ``uniform(+-1 / sqrt(fan_in))``
(its ``kaiming_uniform_(a=sqrt(5))`` bound reduces to exactly that). Norm layers: gamma 1
and beta 0, or gamma 0 for the last norm of every residual branch with
``zero_init_last_bn=True`` (Goyal et al., 2017).
"""

import re
from typing import NamedTuple, Tuple

import keras

from efficientnet_advprop.layers.preprocessing import InputNormalization
from efficientnet_advprop.models.initializers import (classifier_initializers, he_normal_fan_out,
                                                      symmetric_uniform)
from efficientnet_advprop.models.normalization import make_normalizer

STEM_FILTERS = 64
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
DEFAULT_IMAGE_SIZE = 224
SMALL_IMAGE_SIZE = 32
CIFAR_SUFFIX = "-cifar"
# Xie & Yuille / torchvision batch-norm settings (Keras momentum 0.9 == torch 0.1).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
# Deeper networks are built from nested stage groups (module docstring).
FLAT_MAX_BLOCKS = 66  # ResNet-200
MAX_BLOCKS_PER_GROUP = 32


class ResNetParams(NamedTuple):
    """block: ``"basic"`` (two 3x3 convolutions) or ``"bottleneck"`` (1x1, 3x3, 1x1)."""
    block: str
    blocks: Tuple[int, int, int, int]

    @property
    def expansion(self):
        return BOTTLENECK_EXPANSION if self.block == "bottleneck" else 1

    @property
    def depth(self):
        """Weighted layers: convolutions of the residual branches + stem + classifier."""
        per_block = 3 if self.block == "bottleneck" else 2
        return per_block * sum(self.blocks) + 2


RESNET_BLOCKS = {
    "resnet-18": ResNetParams("basic", (2, 2, 2, 2)),
    "resnet-34": ResNetParams("basic", (3, 4, 6, 3)),
    "resnet-26": ResNetParams("bottleneck", (2, 2, 2, 2)),
    "resnet-50": ResNetParams("bottleneck", (3, 4, 6, 3)),
    "resnet-101": ResNetParams("bottleneck", (3, 4, 23, 3)),
    "resnet-152": ResNetParams("bottleneck", (3, 8, 36, 3)),
    "resnet-200": ResNetParams("bottleneck", (3, 24, 36, 3)),
    # Deep ResNets of Xie & Yuille (ICLR 2020); see the module docstring.
    "resnet-338": ResNetParams("bottleneck", (3, 24, 82, 3)),
    "resnet-518": ResNetParams("bottleneck", (3, 24, 142, 3)),
    "resnet-638": ResNetParams("bottleneck", (3, 24, 182, 3)),
}

# Every registered name: the ImageNet stem and the small-image ("-cifar") stem.
RESNET_NAMES = tuple(list(RESNET_BLOCKS) + [n + CIFAR_SUFFIX for n in RESNET_BLOCKS])


class BlockSpec(NamedTuple):
    """One residual block.

    name: layer-name prefix without the trailing underscore (``stage2_block1``).
    in_filters, width, out_filters: input channels, inner width, output channels.
    stride: of the block's strided convolution (3x3 conv2 in a bottleneck, conv1 in a
      basic block).
    """
    name: str
    stage: int
    block: str
    in_filters: int
    width: int
    out_filters: int
    stride: int

    @property
    def has_projection(self):
        return self.stride != 1 or self.in_filters != self.out_filters


def canonical_name(model_name):
    """``resnet50`` / ``ResNet-50`` / ``resnet_50_cifar`` -> ``resnet-50(-cifar)``."""
    name = str(model_name).lower().replace("_", "-")
    match = re.fullmatch(r"resnet-?(\d+)(-cifar)?", name)
    base = f"resnet-{match.group(1)}" if match else None
    if base not in RESNET_BLOCKS:
        raise ValueError(f"unknown ResNet {model_name!r}; choose from "
                         f"{', '.join(RESNET_NAMES)}")
    return base + (match.group(2) or "")


def resnet_params(model_name):
    """The `ResNetParams` of a model name (the ``-cifar`` suffix is ignored)."""
    return RESNET_BLOCKS[_base_name(canonical_name(model_name))]


def _base_name(name):
    return name[:-len(CIFAR_SUFFIX)] if name.endswith(CIFAR_SUFFIX) else name


def scaled_widths(width_multiplier=1.0):
    """(stem filters, stage widths) scaled by `width_multiplier` (at least 8 each)."""
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")

    def scale(c):
        return max(8, int(round(c * width_multiplier)))

    return scale(STEM_FILTERS), tuple(scale(w) for w in STAGE_WIDTHS)


def block_specs(model_name, width_multiplier=1.0):
    """Every residual block of the network, in order (pure, no TensorFlow)."""
    params = resnet_params(model_name)
    specs = []
    in_filters, widths = scaled_widths(width_multiplier)
    for stage, (width, repeats) in enumerate(zip(widths, params.blocks)):
        out_filters = width * params.expansion
        for repeat in range(repeats):
            stride = 2 if stage > 0 and repeat == 0 else 1
            specs.append(BlockSpec(f"stage{stage + 1}_block{repeat + 1}", stage + 1,
                                   params.block, in_filters, width, out_filters, stride))
            in_filters = out_filters
    return specs


def count_resnet_params(model_name, num_classes=1000, num_aux=0, small_stem=None,
                        width_multiplier=1.0):
    """Trainable parameter count with batch norm (+ `num_aux` auxiliary BN sets).

    Computed from the block counts alone, without creating any variable. `small_stem`
    None follows the name (``-cifar``: 3x3 stem); `width_multiplier` as `resnet`'s.
    """
    name = canonical_name(model_name)
    if small_stem is None:
        small_stem = name.endswith(CIFAR_SUFFIX)

    def bn(channels):
        return 2 * channels * (1 + num_aux)

    stem_filters = scaled_widths(width_multiplier)[0]
    stem_kernel = 3 if small_stem else 7
    total = stem_kernel * stem_kernel * 3 * stem_filters + bn(stem_filters)
    specs = block_specs(name, width_multiplier)
    for spec in specs:
        cin, w, cout = spec.in_filters, spec.width, spec.out_filters
        if spec.block == "bottleneck":
            total += cin * w + bn(w) + 9 * w * w + bn(w) + w * cout + bn(cout)
        else:
            total += 9 * cin * w + bn(w) + 9 * w * cout + bn(cout)
        if spec.has_projection:
            total += cin * cout + bn(cout)
    total += specs[-1].out_filters * num_classes + num_classes
    return total


def stage_groups(model_name, blocks_per_group=None):
    """``[(group name, [BlockSpec, ...]), ...]``: how `resnet` nests the blocks.

    `blocks_per_group` None: no groups (``[]``, a flat model) up to `FLAT_MAX_BLOCKS`
    blocks, else at most `MAX_BLOCKS_PER_GROUP`; 0: no groups; n > 0: every stage in
    ``ceil(stage blocks / n)`` consecutive groups of near-equal size (the first ones
    one block larger where it does not divide).
    """
    specs = block_specs(model_name)
    if blocks_per_group is None:
        blocks_per_group = 0 if len(specs) <= FLAT_MAX_BLOCKS else MAX_BLOCKS_PER_GROUP
    blocks_per_group = int(blocks_per_group)
    if blocks_per_group < 0:
        raise ValueError(f"blocks_per_group must be >= 0, got {blocks_per_group}")
    if blocks_per_group == 0:
        return []
    groups = []
    for stage in sorted({spec.stage for spec in specs}):
        stage_specs = [spec for spec in specs if spec.stage == stage]
        count = -(-len(stage_specs) // blocks_per_group)
        size, extra = divmod(len(stage_specs), count)
        start = 0
        for group in range(count):
            end = start + size + (1 if group < extra else 0)
            groups.append((f"stage{stage}_group{group + 1}", stage_specs[start:end]))
            start = end
    return groups


def _conv(x, filters, kernel_size, name, stride=1):
    """Convolution without bias; strided 3x3 / 7x7 ones pad like torchvision."""
    if kernel_size > 1 and stride > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=name + "_pad")(x)
        padding = "valid"
    else:
        padding = "same" if kernel_size > 1 else "valid"
    return keras.layers.Conv2D(filters, kernel_size, strides=stride, padding=padding,
                               use_bias=False, kernel_initializer=he_normal_fan_out(),
                               name=name)(x)


def _residual_block(x, spec, norm, zero_init_last_bn):
    p = spec.name + "_"
    last_norm = {"gamma_initializer": "zeros"} if zero_init_last_bn else {}
    shortcut = x
    if spec.block == "bottleneck":
        x = _conv(x, spec.width, 1, p + "conv1")
        x = norm(p + "bn1")(x)
        x = keras.layers.Activation("relu", name=p + "relu1")(x)
        x = _conv(x, spec.width, 3, p + "conv2", stride=spec.stride)
        x = norm(p + "bn2")(x)
        x = keras.layers.Activation("relu", name=p + "relu2")(x)
        x = _conv(x, spec.out_filters, 1, p + "conv3")
        x = norm(p + "bn3", **last_norm)(x)
    else:
        x = _conv(x, spec.width, 3, p + "conv1", stride=spec.stride)
        x = norm(p + "bn1")(x)
        x = keras.layers.Activation("relu", name=p + "relu1")(x)
        x = _conv(x, spec.out_filters, 3, p + "conv2")
        x = norm(p + "bn2", **last_norm)(x)
    if spec.has_projection:
        shortcut = _conv(shortcut, spec.out_filters, 1, p + "shortcut_conv",
                         stride=spec.stride)
        shortcut = norm(p + "shortcut_bn")(shortcut)
    x = keras.layers.Add(name=p + "add")([x, shortcut])
    return keras.layers.Activation("relu", name=p + "out")(x)


def _block_group(x, name, specs, norm, zero_init_last_bn):
    """`specs`' blocks as one nested functional model ``name`` applied to `x`.

    Its input is float32 whatever the policy: a functional model casts what it is
    given to its inputs' dtype, so a bfloat16 input would round float32 activations
    where `float32_compute` (attacks) asks for them; bfloat16 -> float32 is exact and
    the first layers cast back, so under a mixed policy it computes as a flat build."""
    inputs = keras.Input(shape=tuple(x.shape[1:]), dtype="float32", name=name + "_input")
    y = inputs
    for spec in specs:
        y = _residual_block(y, spec, norm, zero_init_last_bn)
    return keras.Model(inputs, y, name=name)(x)


def resnet(model_name, num_classes=1000, image_size=None, norm=None,
           preprocessing="imagenet", small_stem=None, zero_init_last_bn=False,
           dropout_rate=0.0, include_top=True, name=None, width_multiplier=1.0,
           blocks_per_group=None, classifier_init=None):
    """Builds a functional ResNet taking float RGB in [0, 255].

    Args:
      model_name: ``resnet-18`` .. ``resnet-638``, optionally with ``-cifar`` (small
        stem, 32 pixels); see `RESNET_NAMES`.
      num_classes: size of the logits layer.
      image_size: input height and width (None: 224, or 32 for ``-cifar`` names).
      norm: normaliser factory ``norm(name, **overrides) -> layer`` (None: plain
        batch norm with momentum 0.9, epsilon 1e-5).
      preprocessing: `InputNormalization` mode (imagenet, advprop or none).
      small_stem: True for a 3x3 stride-1 stem convolution without max-pool (32-pixel
        images), False for the 7x7/2 convolution + 3x3/2 max-pool; None follows the
        name (``-cifar``).
      zero_init_last_bn: initialise gamma of the last norm of every residual branch to
        zero, so every block starts as ``relu(shortcut)``.
      dropout_rate: dropout before the classifier (0 adds no layer).
      include_top: with False the model ends at the last stage's feature map.
      name: Keras model name (None: the canonical model name).
      width_multiplier: scales the stem and every stage width (rounded, at least 8
        channels), for small experiments; 1 is the published network.
      blocks_per_group: None: flat up to ResNet-200, nested stage groups of at most
        32 blocks for the deeper ResNets (which a flat graph cannot build under
        Python's default recursion limit); 0: flat; n > 0: groups of at most n blocks
        (`stage_groups`, module docstring).
      classifier_init: None or "official" (uniform +-1/sqrt(fan_in), torchvision's
        nn.Linear) or "zeros" (`initializers.classifier_initializers`).

    Returns:
      A `keras.Model` whose output is the LOGITS (no softmax).
    """
    model_name = canonical_name(model_name)
    stem_filters = scaled_widths(width_multiplier)[0]
    if small_stem is None:
        small_stem = model_name.endswith(CIFAR_SUFFIX)
    if image_size is None:
        image_size = SMALL_IMAGE_SIZE if small_stem else DEFAULT_IMAGE_SIZE
    image_size = int(image_size)
    if norm is None:
        norm = make_normalizer("batch_norm", num_aux=0, momentum=BATCH_NORM_MOMENTUM,
                               epsilon=BATCH_NORM_EPSILON)

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32",
                         name="images")
    x = InputNormalization(preprocessing, name="input_normalization")(inputs)
    if small_stem:
        x = _conv(x, stem_filters, 3, "stem_conv")
    else:
        x = _conv(x, stem_filters, 7, "stem_conv", stride=2)
    x = norm("stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    if not small_stem:
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="stem_pool")(x)

    specs = block_specs(model_name, width_multiplier)
    groups = stage_groups(model_name, blocks_per_group)
    if groups:
        by_name = {spec.name: spec for spec in specs}  # the widths scaled
        for group_name, group_specs in groups:
            x = _block_group(x, group_name, [by_name[s.name] for s in group_specs],
                             norm, zero_init_last_bn)
    else:
        for spec in specs:
            x = _residual_block(x, spec, norm, zero_init_last_bn)

    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate and dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
        fan_in = specs[-1].out_filters
        # Logits in float32 even under a mixed-precision policy.
        kernel, bias = classifier_initializers(classifier_init, symmetric_uniform(fan_in),
                                               symmetric_uniform(fan_in))
        x = keras.layers.Dense(num_classes, kernel_initializer=kernel,
                               bias_initializer=bias, dtype="float32",
                               name="predictions")(x)
    return keras.Model(inputs, x, name=name or model_name)
