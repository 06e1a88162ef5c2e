"""``--init_checkpoint``: start training from a saved ``.keras`` model or an official one.

`init_from_checkpoint(model, path)` accepts

* a ``.keras`` file (this project's saved or converted models): weights are copied by
  layer name, batch norms main set to main set (a stock BatchNormalization source works
  too); the classifier ``predictions`` is skipped when its shape differs (another
  number of classes). The source's preprocessing mode (its ``input_normalization``
  config) must equal the model's: a model trained on [-1, 1] inputs is useless on
  mean/std inputs and the other way round, so a mismatch raises ValueError.
* an official TF1 checkpoint (prefix or directory), read by
  `weights.load_official_checkpoint` with EMA shadows preferred. Such checkpoints do
  not record their preprocessing: an explicit `advprop` argument that disagrees with
  the model raises; the path-name guess ("advprop" in the path) only warns.

The report lists what was loaded, skipped (with the reason) and left unused.
"""

import os
import warnings

import keras

from efficientnet_advprop.models import weights as _weights


def _check_modes(source_mode, model_mode, path):
    if source_mode != model_mode:
        raise ValueError(
            f"init checkpoint {path} expects preprocessing {source_mode!r} but the model "
            f"uses {model_mode!r}; build the model with preprocessing={source_mode!r}")


def _init_from_keras(model, path):
    source = keras.saving.load_model(path, compile=False)
    _check_modes(_weights.input_mode(source), _weights.input_mode(model), path)
    src = _weights._weighted_layers(source)
    loaded, skipped = [], {}
    for name, layer in _weights._weighted_layers(model).items():
        if name not in src:
            skipped[name] = "not in the checkpoint"
            continue
        if name == _weights.CLASSIFIER:
            own = [tuple(w.shape) for w in layer.weights]
            theirs = [tuple(w.shape) for w in src[name].weights]
            if own != theirs:
                skipped[name] = (f"shapes {theirs} in the checkpoint, {own} in the model "
                                 "(num_classes differs)")
                continue
        _weights._copy_layer(src[name], layer)
        loaded.append(name)
    unused = sorted(set(src) - set(loaded) - set(skipped))
    return {"source": "keras", "path": path, "preprocessing": _weights.input_mode(source),
            "loaded": sorted(loaded), "skipped": skipped, "unused": unused}


def _copy_main_to_aux(model):
    from efficientnet_advprop.layers.split_batch_norm import SplitBatchNorm

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNorm):
            for index in range(1, layer.num_sets):
                for store in (layer.gammas, layer.betas, layer.moving_means,
                              layer.moving_variances):
                    if store[0] is not None:
                        store[index].assign(store[0].value)


def init_from_checkpoint(model, path, advprop=None, aux_from_main=False):
    """Initialises `model` from a ``.keras`` file or an official TF1 checkpoint.

    Args:
      model: the project's model (any normalizer with BN main sets).
      path: ``*.keras`` file, or official checkpoint prefix / directory.
      advprop: official checkpoints only: True / False states their preprocessing
        (a disagreement with the model raises); None guesses from the path and warns.
      aux_from_main: also copy every loaded main BN set into the auxiliary sets
        (default: auxiliary sets keep their initial values).

    Returns:
      A report dict: source ("keras" / "official"), path, preprocessing, loaded (layer
      names), skipped ({layer: reason}), unused (source layers or variables not read).
    """
    path = os.fspath(path)
    model_mode = _weights.input_mode(model)
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise ValueError(f"--init_checkpoint={path} does not exist")
        report = _init_from_keras(model, path)
    else:
        mode = _weights.checkpoint_preprocessing(path, advprop)
        if advprop is not None:
            _check_modes(mode, model_mode, path)
        elif mode != model_mode:
            warnings.warn(f"init checkpoint {path} looks like an {mode!r} checkpoint "
                          f"(from its path) but the model uses {model_mode!r}")
        report = _weights.load_official_checkpoint(model, path, prefer_ema=True,
                                                   skip_mismatched_classifier=True)
        report.update(source="official", path=path, preprocessing=mode)
    if aux_from_main:
        _copy_main_to_aux(model)
    return report
