"""Pretrained weights for the project's EfficientNet: keras.applications and official TF1.

Two sources are supported, both copied into the *main* BN set of `SplitBatchNorm` layers
(or into stock `keras.layers.BatchNormalization`):

keras.applications (`load_keras_applications_weights`)
    Keras' EfficientNetB0..B7 use the same layer names as this project (``stem_conv``,
    ``block2a_expand_bn``, ``top_conv``, ``predictions``, ...) and the same padding (their
    explicit ``ZeroPadding2D`` + "valid" equals TF "same" for every input size), so the
    copy is by name. Their preprocessing is a chain ``Rescaling(1/255)`` ->
    ``Normalization(mean, variance)`` [-> ``Rescaling(1/sqrt(std))`` only when built with
    ``weights="imagenet"``]. The released ImageNet file stores ``variance = std`` (not
    std**2, TF issue 49930), and the extra rescaling undoes that, so an ImageNet model
    computes ``(x / 255 - mean) / std``: exactly this project's "imagenet" mode. A model
    built with ``weights=None`` has an un-adapted Normalization (mean 0, variance 1) and
    no extra rescaling: it computes only ``x / 255``, which no project mode matches.
    `keras_applications_preprocessing` measures what a model really computes (by running
    its preprocessing layers), and the loader refuses a mismatch unless told not to.
    Note: `Normalization` snapshots its statistics in ``finalize_state()``; assigning its
    variables (``set_weights``) without calling that changes nothing it computes.

official TF1 checkpoints (`load_official_checkpoint`)
    Variable names of the TPU EfficientNet (tensorflow/tpu models/official/efficientnet):
    ``<model>/stem/conv2d/kernel``, ``<model>/stem/tpu_batch_normalization/{gamma,beta,
    moving_mean,moving_variance}``, ``<model>/blocks_<i>/...`` and ``<model>/head/...``.
    Inside a block the legacy layers are named on first call, per variable scope, so the
    numbering follows the call order: expand ``conv2d`` -> ``tpu_batch_normalization``,
    ``depthwise_conv2d`` -> ``tpu_batch_normalization_1``, ``se/conv2d`` (reduce),
    ``se/conv2d_1`` (expand), project ``conv2d_1`` -> ``tpu_batch_normalization_2``; a
    block without expansion (expand ratio 1) has depthwise -> ``tpu_batch_normalization``
    and project ``conv2d`` -> ``tpu_batch_normalization_1``. Training keeps exponential
    moving averages as ``<name>/ExponentialMovingAverage``; those shadows are what the
    official evaluation uses, so they are preferred when present.

Preprocessing of official checkpoints
    The checkpoints do not record it. AdvProp checkpoints were trained on [-1, 1] inputs
    ("advprop" mode), all others on ImageNet mean/std ("imagenet" mode).
    `checkpoint_preprocessing(path, advprop)` takes the explicit flag when given and
    otherwise falls back to the release convention: AdvProp checkpoints live in
    directories named ``advprop`` / ``efficientnet-bN-advprop`` ..., so a path containing
    "advprop" means "advprop".
"""

import os
import re

import keras
import numpy as np
import tensorflow as tf

from efficientnet_advprop.layers.preprocessing import InputNormalization
from efficientnet_advprop.layers.split_batch_norm import SplitBatchNorm
from efficientnet_advprop.models import efficientnet as _efficientnet

EMA_SUFFIX = "/ExponentialMovingAverage"
BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")
CLASSIFIER = "predictions"

_BLOCK_RE = re.compile(r"^(block(\d+)([a-z]+))_")


# ---------------------------------------------------------------------------------------
# Layer helpers.


def _is_bn(layer):
    return isinstance(layer, (SplitBatchNorm, keras.layers.BatchNormalization))


def _weighted_layers(model):
    """{name: layer} of every layer with variables (nested layers flattened)."""
    return {layer.name: layer
            for layer in model._flatten_layers(include_self=False, recursive=True)
            if layer.weights}


def target_variable(model, layer_name, key):
    """The variable `key` (kernel, bias, gamma, ...) of a layer; BN keys are main set."""
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise ValueError(f"the model has no layer {layer_name!r}") from None
    variable = getattr(layer, key, None)
    if variable is None:
        raise ValueError(f"layer {layer_name!r} ({type(layer).__name__}) has no {key}")
    return variable


def _assign(variable, value, what):
    value = np.asarray(value)
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(f"{what}: shape {tuple(value.shape)} does not match the model's "
                         f"{tuple(variable.shape)}")
    variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _bn_values(layer):
    """Main-set (gamma, beta, moving_mean, moving_variance) of a BN layer (None if off)."""
    return [None if getattr(layer, k, None) is None
            else keras.ops.convert_to_numpy(getattr(layer, k)) for k in BN_KEYS]


def _copy_layer(src, dst, what=None):
    """Copies one layer's weights (BN: main set to main set). Raises on any mismatch."""
    what = what or dst.name
    if _is_bn(dst) != _is_bn(src):
        raise ValueError(f"{what}: cannot copy {type(src).__name__} into "
                         f"{type(dst).__name__}")
    if _is_bn(dst):
        if abs(float(src.epsilon) - float(dst.epsilon)) > 1e-12:
            raise ValueError(f"{what}: batch-norm epsilon {src.epsilon} differs from the "
                             f"model's {dst.epsilon}")
        for key, value in zip(BN_KEYS, _bn_values(src)):
            target = getattr(dst, key, None)
            if (value is None) != (target is None):
                raise ValueError(f"{what}: {key} exists in only one of the two layers")
            if target is not None:
                _assign(target, value, f"{what}/{key}")
        return
    src_weights, dst_weights = src.weights, dst.weights
    if len(src_weights) != len(dst_weights):
        raise ValueError(f"{what}: {len(src_weights)} variables in the source, "
                         f"{len(dst_weights)} in the model")
    for s, d in zip(src_weights, dst_weights):
        _assign(d, keras.ops.convert_to_numpy(s), f"{what}/{d.name}")


# ---------------------------------------------------------------------------------------
# keras.applications.


def _affine(fn, size=(2, 2)):
    """Per-channel (scale, offset) of an affine map on [N, H, W, 3] images."""
    probe = np.zeros((2,) + tuple(size) + (3,), np.float32)
    probe[1] = 255.0
    out = keras.ops.convert_to_numpy(fn(probe)).astype(np.float64)
    offset = out[0, 0, 0]
    return (out[1, 0, 0] - offset) / 255.0, offset


def _mode_affine(mode):
    return _affine(InputNormalization(mode))


def keras_applications_preprocessing(keras_app_model):
    """What a keras.applications EfficientNet does to its [0, 255] input, measured.

    Runs the layers in front of ``stem_conv_pad`` on probe images.

    Returns:
      (mode, scale, offset): per-channel ``y = x * scale + offset`` and the project's
      `InputNormalization` mode computing the same map (None when none does, e.g.
      ``x / 255`` of a ``weights=None`` model).
    """
    try:
        pad = keras_app_model.get_layer("stem_conv_pad")
    except ValueError:
        raise ValueError(f"{keras_app_model.name!r} is not a keras.applications "
                         "EfficientNet (no stem_conv_pad layer)") from None
    front = keras.Model(keras_app_model.input, pad.input)
    size = tuple(d or 32 for d in keras_app_model.input.shape[1:3])
    scale, offset = _affine(lambda x: front(x, training=False), size)
    for mode in ("imagenet", "advprop", "none"):
        ref_scale, ref_offset = _mode_affine(mode)
        if (np.allclose(scale, ref_scale, rtol=1e-5, atol=1e-7)
                and np.allclose(offset, ref_offset, rtol=1e-5, atol=1e-5)):
            return mode, scale, offset
    return None, scale, offset


def input_mode(model):
    """The model's `InputNormalization` mode (imagenet, advprop, none), or None."""
    try:
        return model.get_layer("input_normalization").mode
    except ValueError:
        return None


def load_keras_applications_weights(model, keras_app_model, check_preprocessing=True):
    """Copies a keras.applications EfficientNet's weights into the project's model.

    Layers are matched by name (the two naming schemes coincide; every weighted layer of
    either model must exist in the other, except the source's preprocessing
    `Normalization`). Conv, depthwise and dense kernels and biases are copied as they
    are, batch norms into the main set.

    Args:
      model: the project's model of the same size (any BN-based normalizer).
      keras_app_model: ``keras.applications.EfficientNetB0`` ... ``B7`` (Keras 3).
      check_preprocessing: raise ValueError unless the source's measured preprocessing
        equals the model's `InputNormalization` mode (see the module docstring: an
        ImageNet-weights source matches "imagenet"; a ``weights=None`` source computes
        ``x / 255`` and matches no mode unless its Normalization is set up).

    Returns:
      A report dict: ``loaded`` (layer names), ``preprocessing`` (the source's mode or
      None).
    """
    mode, scale, offset = keras_applications_preprocessing(keras_app_model)
    if check_preprocessing and mode != input_mode(model):
        raise ValueError(
            f"preprocessing mismatch: {keras_app_model.name!r} computes x * "
            f"{np.round(scale, 6).tolist()} + {np.round(offset, 6).tolist()} (mode "
            f"{mode}), the model's input_normalization mode is {input_mode(model)!r}")
    src = {name: layer for name, layer in _weighted_layers(keras_app_model).items()
           if not isinstance(layer, keras.layers.Normalization)}
    dst = _weighted_layers(model)
    for name in dst:
        if name not in src:
            raise ValueError(f"layer {name!r} of the model is not in "
                             f"{keras_app_model.name!r}")
    for name in src:
        if name not in dst:
            raise ValueError(f"layer {name!r} of {keras_app_model.name!r} is not in "
                             "the model")
    for name, layer in dst.items():
        _copy_layer(src[name], layer)
    return {"loaded": sorted(dst), "preprocessing": mode}


# ---------------------------------------------------------------------------------------
# Official TF1 checkpoints.


def _blocks_from_specs(specs):
    """[(keras prefix, has expansion, has squeeze-excite)] of `block_specs`."""
    return [(s.name, s.args.expand_ratio != 1,
             s.args.se_ratio is not None and 0 < s.args.se_ratio <= 1) for s in specs]


def _letters_index(letters):
    index = 0
    for ch in letters:
        index = index * 26 + (ord(ch) - 96)
    return index - 1


def _blocks_from_model(model):
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    prefixes = {}
    for name in names:
        match = _BLOCK_RE.match(name)
        if match:
            prefixes[match.group(1)] = (int(match.group(2)),
                                        _letters_index(match.group(3)))
    return [(p, f"{p}_expand_conv" in names, f"{p}_se_reduce" in names)
            for p in sorted(prefixes, key=prefixes.get)]


def _name_map(scope, blocks, include_top):
    out = {}

    def bn(official, layer):
        for key in BN_KEYS:
            out[f"{official}/{key}"] = (layer, key)

    out[f"{scope}/stem/conv2d/kernel"] = ("stem_conv", "kernel")
    bn(f"{scope}/stem/tpu_batch_normalization", "stem_bn")
    for index, (p, expand, se) in enumerate(blocks):
        b = f"{scope}/blocks_{index}"
        bn_names = iter(["tpu_batch_normalization", "tpu_batch_normalization_1",
                         "tpu_batch_normalization_2"])
        conv_names = iter(["conv2d", "conv2d_1"])
        if expand:
            out[f"{b}/{next(conv_names)}/kernel"] = (f"{p}_expand_conv", "kernel")
            bn(f"{b}/{next(bn_names)}", f"{p}_expand_bn")
        out[f"{b}/depthwise_conv2d/depthwise_kernel"] = (f"{p}_dwconv", "kernel")
        bn(f"{b}/{next(bn_names)}", f"{p}_bn")
        if se:
            for official, layer in (("conv2d", "se_reduce"), ("conv2d_1", "se_expand")):
                out[f"{b}/se/{official}/kernel"] = (f"{p}_{layer}", "kernel")
                out[f"{b}/se/{official}/bias"] = (f"{p}_{layer}", "bias")
        out[f"{b}/{next(conv_names)}/kernel"] = (f"{p}_project_conv", "kernel")
        bn(f"{b}/{next(bn_names)}", f"{p}_project_bn")
    out[f"{scope}/head/conv2d/kernel"] = ("top_conv", "kernel")
    bn(f"{scope}/head/tpu_batch_normalization", "top_bn")
    if include_top:
        out[f"{scope}/head/dense/kernel"] = (CLASSIFIER, "kernel")
        out[f"{scope}/head/dense/bias"] = (CLASSIFIER, "bias")
    return out


def official_variable_names(model_name, width_coefficient=None, depth_coefficient=None,
                            include_top=True):
    """{official checkpoint variable name: (project layer name, variable key)}.

    Keys are e.g. ``efficientnet-b0/blocks_1/tpu_batch_normalization_2/moving_mean``;
    variable keys are kernel, bias, gamma, beta, moving_mean, moving_variance (BN keys
    mean the main set). Pure: builds no model.
    """
    scope = _efficientnet.canonical_name(model_name)
    specs = _efficientnet.block_specs(scope, width_coefficient, depth_coefficient)
    return _name_map(scope, _blocks_from_specs(specs), include_top)


def official_variable_names_for_model(model, scope):
    """Like `official_variable_names`, read off a built model (any width/depth)."""
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    return _name_map(scope, _blocks_from_model(model), CLASSIFIER in names)


def _open_checkpoint(checkpoint_path):
    path = os.fspath(checkpoint_path)
    try:
        reader = tf.train.load_checkpoint(path)
    except (ValueError, tf.errors.OpError) as e:
        raise ValueError(f"no TF checkpoint at {path!r} "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from None
    return reader


def checkpoint_scope(reader):
    """The model scope (``efficientnet-b0``) of an official checkpoint (path or reader)."""
    if not hasattr(reader, "get_variable_to_shape_map"):
        reader = _open_checkpoint(reader)
    tail = "/stem/conv2d/kernel"
    scopes = sorted({name[:-len(tail)] for name in reader.get_variable_to_shape_map()
                     if name.endswith(tail)})
    if len(scopes) != 1:
        raise ValueError("cannot find the model scope of the checkpoint (expected one "
                         f"'<model>{tail}' variable, found {scopes or 'none'})")
    return scopes[0]


def checkpoint_num_classes(checkpoint_path):
    """Number of classes of an official checkpoint's classifier (None without head)."""
    reader = _open_checkpoint(checkpoint_path)
    shapes = reader.get_variable_to_shape_map()
    shape = shapes.get(f"{checkpoint_scope(reader)}/head/dense/kernel")
    return None if shape is None else int(shape[-1])


def checkpoint_preprocessing(checkpoint_path, advprop=None):
    """"advprop" or "imagenet": the explicit flag, else whether the path says advprop."""
    if advprop is None:
        advprop = "advprop" in os.path.abspath(os.fspath(checkpoint_path)).lower()
    return "advprop" if advprop else "imagenet"


def load_official_checkpoint(model, checkpoint_path, prefer_ema=True, scope=None,
                             skip_mismatched_classifier=False):
    """Loads an official TF1 EfficientNet checkpoint into the project's model.

    Args:
      model: the project's EfficientNet (same size as the checkpoint; any width/depth).
      checkpoint_path: a checkpoint prefix or a directory with a ``checkpoint`` file.
      prefer_ema: read ``<name>/ExponentialMovingAverage`` where the checkpoint has it.
      scope: the checkpoint's model scope (None: detected, ``efficientnet-b0`` ...).
      skip_mismatched_classifier: leave ``predictions`` alone when its shape differs
        (fine-tuning on another number of classes) instead of raising.

    Raises:
      ValueError naming the first official variable that is missing or whose shape
      differs, or a weighted layer of the model that no official variable covers.

    Returns:
      A report dict: scope, ``loaded`` (layer names), ``ema`` (number of shadows used),
      ``skipped`` ({layer: reason}), ``unused`` (checkpoint variables not read, EMA
      shadows, optimizer slots and global_step left out).
    """
    reader = _open_checkpoint(checkpoint_path)
    shapes = reader.get_variable_to_shape_map()
    scope = scope or checkpoint_scope(reader)
    names = official_variable_names_for_model(model, scope)
    covered = {layer for layer, _ in names.values()}
    for name in _weighted_layers(model):
        if name not in covered:
            raise ValueError(f"layer {name!r} of the model has no official checkpoint "
                             "variable")
    skipped = {}
    if skip_mismatched_classifier and CLASSIFIER in covered:
        kernel = names.get(f"{scope}/head/dense/kernel")
        ckpt_shape = shapes.get(f"{scope}/head/dense/kernel")
        own = tuple(target_variable(model, *kernel).shape)
        if ckpt_shape is not None and tuple(ckpt_shape) != own:
            skipped[CLASSIFIER] = (f"shape {tuple(ckpt_shape)} in the checkpoint, "
                                   f"{own} in the model")
    pending, ema = [], 0
    for official, (layer, key) in names.items():
        if layer in skipped:
            continue
        source = official
        if prefer_ema and official + EMA_SUFFIX in shapes:
            source, ema = official + EMA_SUFFIX, ema + 1
        if source not in shapes:
            raise ValueError(f"checkpoint {os.fspath(checkpoint_path)!r} has no variable "
                             f"{official!r} (for {layer}/{key})")
        variable = target_variable(model, layer, key)
        if tuple(shapes[source]) != tuple(variable.shape):
            raise ValueError(f"checkpoint variable {source!r} has shape "
                             f"{tuple(shapes[source])}, {layer}/{key} of the model has "
                             f"{tuple(variable.shape)}")
        pending.append((variable, reader.get_tensor(source), f"{layer}/{key}"))
    for variable, value, what in pending:
        _assign(variable, value, what)
    used = set(names)
    unused = sorted(n for n in shapes
                    if n not in used and not n.endswith(EMA_SUFFIX)
                    and n != "global_step" and n.startswith(scope + "/")
                    and "/Momentum" not in n and "/RMSProp" not in n)
    return {"scope": scope, "loaded": sorted(covered - set(skipped)), "ema": ema,
            "skipped": skipped, "unused": unused}


def convert_official_checkpoint(checkpoint_path, model_name=None, output=None,
                                advprop=None, num_classes=None, image_size=None,
                                prefer_ema=True):
    """Builds the project's model for an official checkpoint and loads it.

    Args:
      checkpoint_path: checkpoint prefix or directory.
      model_name: ``efficientnet-b0`` ... (None: the checkpoint's scope). Must agree
        with the checkpoint's scope.
      output: where to save the model as ``.keras`` (None: do not save); an existing
        file is refused (FileExistsError).
      advprop: True / False, None to decide from the path (`checkpoint_preprocessing`).
      num_classes: None: from the checkpoint's classifier.
      image_size: None: the model's resolution.

    Returns:
      (model, report); the model's InputNormalization records the preprocessing.
    """
    from efficientnet_advprop.models.registry import build_model

    if output is not None:
        output = os.fspath(output)
        if not output.endswith(".keras"):
            raise ValueError(f"--output={output} must end in .keras")
        if os.path.exists(output):
            raise FileExistsError(f"--output={output} exists; choose a new path")
    reader = _open_checkpoint(checkpoint_path)
    scope = checkpoint_scope(reader)
    if model_name is None:
        model_name = scope
    model_name = _efficientnet.canonical_name(model_name)
    if model_name != scope:
        raise ValueError(f"--model_name={model_name} but the checkpoint holds {scope}")
    if num_classes is None:
        num_classes = checkpoint_num_classes(checkpoint_path)
        if num_classes is None:
            raise ValueError("the checkpoint has no classifier; pass num_classes")
    mode = checkpoint_preprocessing(checkpoint_path, advprop)
    model = build_model(model_name, num_classes=num_classes, image_size=image_size,
                        preprocessing=mode)
    report = load_official_checkpoint(model, checkpoint_path, prefer_ema=prefer_ema,
                                      scope=scope)
    report["preprocessing"] = mode
    if output is not None:
        model.save(output)
        report["output"] = output
    return model, report
