"""Signal-propagation statistics of residual networks at the end of every block.

The quantities of the signal propagation plots of Brock, De & Smith ("Characterizing
signal propagation to close the performance gap in unnormalized ResNets", ICLR 2021),
for a block output ``x`` of shape ``[N, H, W, C]``:

* average channel squared mean: ``mean_c (mean_{n,h,w} x)^2``;
* average channel variance: ``mean_c var_{n,h,w} x``;
* for NF-ResNet blocks also the residual branch's average channel variance, of the
  last convolution's output ``f`` (before ``alpha``; zero while the gain of that
  convolution is still at its zero initialisation).

`fit_stage_gains` sets the diagnostic ``stage_gains`` of an NF-ResNet from one batch of
images, so that the stem and every stage's first block hand on unit variance.

`compare_pool_gain` measures a freshly initialised NF-ResNet with and without the
``x 2`` on its pooled transition shortcuts (``compensate_avgpool_var``), with the same
weights; scripts/signal_propagation.py runs it on CIFAR-10 images.
"""

import re

import keras
import numpy as np

from efficientnet_advprop.models.nf_resnet import NUM_STAGE_GAINS, nf_resnet

_BLOCK_OUT = re.compile(r"stage(\d+)_block(\d+)_out")


def block_names(model):
    """``stage{s}_block{b}`` of every top-level block output layer, in graph order."""
    return [layer.name[:-len("_out")] for layer in model.layers
            if _BLOCK_OUT.fullmatch(layer.name)]


def signal_statistics(model, images, batch_size=32):
    """Per-block statistics of `model` (inference mode) on `images` [N, H, W, 3].

    Returns a list with one dict per block, in order: ``block`` (``stage2_block1``),
    ``stage``, ``index`` (block number within the stage, from 1), ``channel_sq_mean``,
    ``channel_var`` and, where the block has a ``conv3`` layer, ``branch_var``. The
    moments are accumulated in float64 over batches of `batch_size` images.
    """
    blocks = block_names(model)
    if not blocks:
        raise ValueError(f"model {model.name!r} has no stage{{s}}_block{{b}}_out layers")
    layer_names = {layer.name for layer in model.layers}
    tensors, keys = [], []
    for block in blocks:
        tensors.append(model.get_layer(block + "_out").output)
        keys.append((block, "out"))
        if block + "_conv3" in layer_names:
            tensors.append(model.get_layer(block + "_conv3").output)
            keys.append((block, "branch"))
    probe = keras.Model(model.input, tensors)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] batch, got shape "
                         f"{images.shape}")
    sums, squares, counts = {}, {}, {}
    for start in range(0, len(images), batch_size):
        outputs = probe(images[start:start + batch_size], training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        for key, value in zip(keys, outputs):
            value = np.asarray(value, np.float64)
            flat = value.reshape(-1, value.shape[-1])
            sums[key] = sums.get(key, 0.0) + flat.sum(axis=0)
            squares[key] = squares.get(key, 0.0) + np.square(flat).sum(axis=0)
            counts[key] = counts.get(key, 0) + flat.shape[0]

    def moments(key):
        mean = sums[key] / counts[key]
        var = np.maximum(squares[key] / counts[key] - np.square(mean), 0.0)
        return mean, var

    rows = []
    for block in blocks:
        stage, index = (int(g) for g in _BLOCK_OUT.fullmatch(block + "_out").groups())
        mean, var = moments((block, "out"))
        row = {"block": block, "stage": stage, "index": index,
               "channel_sq_mean": float(np.mean(np.square(mean))),
               "channel_var": float(np.mean(var))}
        if (block, "branch") in sums:
            row["branch_var"] = float(np.mean(moments((block, "branch"))[1]))
        rows.append(row)
    return rows


def compare_pool_gain(model_name, images, *, width_multiplier=1.0, seed=0,
                      active_branches=False, alpha=0.2, activation="relu",
                      batch_size=32):
    """`signal_statistics` of NF-ResNet `model_name` without and with the x 2 pooled
    shortcut (``{"off": rows, "on": rows}``), both with the same initial weights.

    `images`: float RGB in [0, 255] (the models normalise inside, ImageNet mean/std).
    `seed` sets Keras' initialisation. `active_branches` sets the gain of every
    residual branch's last convolution to 1 instead of its zero initialisation, so the
    branches contribute (at the zero initialisation every block is the identity on its
    shortcut and only the stem and the transition shortcuts shape the signal).
    """
    images = np.asarray(images, np.float32)
    models = {}
    for key, gain in (("off", False), ("on", True)):
        keras.utils.set_random_seed(seed)
        models[key] = nf_resnet(model_name, image_size=images.shape[1],
                                include_top=False, width_multiplier=width_multiplier,
                                alpha=alpha, activation=activation,
                                compensate_avgpool_var=gain)
    weights = models["off"].get_weights()
    if [w.shape for w in weights] != [w.shape for w in models["on"].get_weights()]:
        raise AssertionError("the two variants differ in their variables")
    models["on"].set_weights(weights)  # identical weights, whatever the seed stream did
    if active_branches:
        for model in models.values():
            for layer in model.layers:
                if layer.name.endswith("_conv3"):
                    layer.gain.assign(np.ones(layer.filters, np.float32))
    return {key: signal_statistics(model, images, batch_size)
            for key, model in models.items()}


def gain_points(model):
    """The layers `fit_stage_gains` sets, in order: stem, then stage 1..4 (their
    first block's output)."""
    names = ["stem_data_gain"] + [f"stage{s}_block1_data_gain"
                                  for s in range(1, NUM_STAGE_GAINS)]
    return [model.get_layer(n) for n in names]


def fit_stage_gains(model_name, images, *, seed=0, **builder_kwargs):
    """Data-dependent stage gains of NF-ResNet `model_name` (a diagnostic, in no paper).

    Builds the model as initialised with `seed` (`builder_kwargs` go to `nf_resnet`),
    then sets the gains one after the other -- stem first -- to 1 / std of the average
    channel variance of that point's output on `images` (float RGB [0, 255], inference
    mode), so that the stem and each stage's first block hand on variance 1, the
    variance each block's beta assumes. Returns the NUM_STAGE_GAINS gains.
    """
    images = np.asarray(images, np.float32)
    keras.utils.set_random_seed(seed)
    model = nf_resnet(model_name, image_size=images.shape[1], include_top=False,
                      stage_gains=(1.0,) * NUM_STAGE_GAINS, **builder_kwargs)
    layers = gain_points(model)
    probe = keras.Model(model.input, [layer.output for layer in layers])
    gains = []
    for k, layer in enumerate(layers):
        value = np.asarray(probe(images, training=False)[k], np.float64)
        var = float(np.mean(value.reshape(-1, value.shape[-1]).var(axis=0)))
        layer.scale = 1.0 / np.sqrt(var)  # read by Scale.call at the next probe
        gains.append(float(layer.scale))
    return tuple(gains)
