"""Named intermediate feature maps ("endpoints") of the functional models.

`feature_endpoints(model)` returns ``{name: symbolic tensor}`` and `feature_model(model)`
a `keras.Model` sharing the weights and returning that dict. The family is recognised
from the layer names, so any model built by `efficientnet` or `resnet` works, with or
without its top and whatever its normaliser.

EfficientNet, as the official TPU builder (``efficientnet_model.py``): a block is a
*reduction* block when it is the last block or the next block has stride 2, and
``reduction_i`` is the output of the i-th reduction block. For B0 at 224 pixels these
are the outputs of blocks 1a, 2b, 3b, 5c and 7a, at 112, 56, 28, 14 and 7 pixels.
Like the official builder, ``reduction_5`` is the last MBConv block's output (320
channels for B0), *before* the 1x1 head convolution; the head's output is ``top``.
Also ``stem`` (the stem activation).

ResNet: ``stem`` (after the max-pool; after the stem ReLU with the small stem) and
``stage1`` .. ``stage4``, the output of each stage's last block (strides 4, 8, 16, 32
with the ImageNet stem). In the deep ResNets built from nested stage groups
(``stage{s}_group{g}`` sub-models, see `efficientnet_advprop.models.resnet`) a stage's
endpoint is its last group's output, which is the same tensor value.
"""

import re

import keras

_EFFICIENTNET_BLOCK = re.compile(r"(block\d+[a-z]+)_")
_RESNET_BLOCK_OUT = re.compile(r"stage(\d+)_block(\d+)_out")
_RESNET_GROUP = re.compile(r"stage(\d+)_group(\d+)")


def _layer_names(model):
    return [layer.name for layer in model.layers]


def _is_resnet(names):
    return "stem_conv" in names and any(_RESNET_BLOCK_OUT.fullmatch(n)
                                        or _RESNET_GROUP.fullmatch(n) for n in names)


def _is_efficientnet(names):
    return "stem_conv" in names and any(_EFFICIENTNET_BLOCK.match(n) for n in names)


def _efficientnet_endpoints(model):
    # Blocks in build order, each with its stride and its output (the output of the
    # last layer carrying its prefix: ``add`` with a skip, ``project_bn`` without).
    blocks = {}
    for layer in model.layers:
        match = _EFFICIENTNET_BLOCK.match(layer.name)
        if match is None:
            continue
        info = blocks.setdefault(match.group(1), {"stride": 1})
        if layer.name.endswith("_dwconv"):
            info["stride"] = int(layer.strides[0])
        info["output"] = layer.output
    names = list(blocks)
    endpoints = {"stem": model.get_layer("stem_activation").output}
    reduction = 0
    for index, block in enumerate(names):
        if index == len(names) - 1 or blocks[names[index + 1]]["stride"] > 1:
            reduction += 1
            endpoints[f"reduction_{reduction}"] = blocks[block]["output"]
    if "top_activation" in _layer_names(model):
        endpoints["top"] = model.get_layer("top_activation").output
    return endpoints


def _outer_output(layer):
    """The tensor `layer` gives the model it is a layer of.

    A nested functional model's ``.output`` is its own inner graph's output, so it is
    taken from the node of its call instead (the builders call each group once).
    """
    if isinstance(layer, keras.Model):
        return layer._inbound_nodes[0].output_tensors[0]
    return layer.output


def _resnet_endpoints(model):
    names = _layer_names(model)
    stem = "stem_pool" if "stem_pool" in names else "stem_relu"
    endpoints = {"stem": model.get_layer(stem).output}
    last = {}  # stage -> (block or group number, layer name)
    for name in names:
        match = _RESNET_BLOCK_OUT.fullmatch(name) or _RESNET_GROUP.fullmatch(name)
        if match:
            stage, number = int(match.group(1)), int(match.group(2))
            if number >= last.get(stage, (0, None))[0]:
                last[stage] = (number, name)
    for stage in sorted(last):
        endpoints[f"stage{stage}"] = _outer_output(model.get_layer(last[stage][1]))
    return endpoints


def feature_endpoints(model):
    """``{endpoint name: symbolic tensor}`` of an EfficientNet or ResNet model.

    EfficientNet: ``stem``, ``reduction_1`` .. ``reduction_5`` and ``top`` (when the
    head exists). ResNet: ``stem`` and ``stage1`` .. ``stage4``. See the module
    docstring for the definitions. ValueError for any other model.
    """
    names = _layer_names(model)
    if _is_resnet(names):
        return _resnet_endpoints(model)
    if _is_efficientnet(names):
        return _efficientnet_endpoints(model)
    raise ValueError(f"model {model.name!r} is neither an EfficientNet nor a ResNet "
                     "built by efficientnet_advprop (no recognisable layer names)")


def feature_model(model, name=None):
    """A `keras.Model` (same inputs, shared weights) returning `feature_endpoints`."""
    return keras.Model(model.input, feature_endpoints(model),
                       name=name or f"{model.name}_features")
