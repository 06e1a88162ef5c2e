"""What both training engines share, in keras.ops and plain Python: the run's
settings (`TrainConfig`), the errors that stop a run, the checkpoint names of a
model's variables, which variables are normalisation parameters or averaged by the
EMA, and the dtype policy of --precision. The TensorFlow engine (trainer.py) and the
JAX engine (jax_engine.py) import it; it imports neither TensorFlow nor JAX."""

import contextlib
import dataclasses
import json
import os
import time

import keras
import numpy as np

from efficientnet_advprop.layers.split_batch_norm import SplitBatchNorm
from efficientnet_advprop.training.schedules import (WarmupCosineDecay,
                                                     WarmupExponentialDecay,
                                                     WarmupStepDecay,
                                                     scaled_learning_rate)

# --precision -> Keras dtype policy of the model.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16",
              "float16": "mixed_float16"}

NORM_LAYERS = (SplitBatchNorm, keras.layers.BatchNormalization,
               keras.layers.GroupNormalization, keras.layers.LayerNormalization)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss stopped being finite)."""


class InputDataError(TrainingError):
    """The input pipeline failed (an undecodable image, a corrupt record)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the recipe and the data.

    Defaults are the official EfficientNet recipe (RMSProp, 0.016 per 256 images,
    5 warm-up epochs, x0.97 every 2.4 epochs, L2 1e-5 off BN, EMA 0.9999).
    """

    model_dir: str
    train_steps: int
    global_batch_size: int
    steps_per_epoch: int
    optimizer: str = "rmsprop"
    base_learning_rate: float = 0.016
    lr_schedule: str = "exponential"  # or "cosine", "step"
    lr_warmup_epochs: float = 5.0
    # "zero": the ramp starts at 0 (official EfficientNet); "base": at the unscaled
    # base_learning_rate, and only when the scaled peak is higher (Goyal et al., the
    # Xie & Yuille reference code)
    lr_warmup_start: str = "zero"
    lr_decay_epochs: float = 2.4
    lr_decay_factor: float = 0.97
    lr_milestones: tuple = ()  # epochs, for the "step" schedule
    lr_batch_size: int = None  # images the linear scaling rule counts (default: batch)
    momentum: float = 0.9
    nesterov: bool = False
    rmsprop_decay: float = 0.9
    rmsprop_epsilon: float = 1e-3
    weight_decay: float = 1e-5
    agc_clip: float = 0.0  # adaptive gradient clipping threshold; 0 = off
    agc_eps: float = 1e-3
    moving_average_decay: float = 0.9999
    seed: int = 0
    jit_compile: bool = False
    iterations_per_loop: int = 1  # train steps per tf.function call
    precision: str = "float32"  # or "bfloat16", "float16" (see PRECISIONS)
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 5
    summary_every_steps: int = 100
    image_summary_every_steps: int = 0  # 0: only with each checkpoint
    log_every_seconds: float = 10.0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose from "
                             f"{', '.join(PRECISIONS)}")
        if self.iterations_per_loop < 1:
            raise ValueError(f"iterations_per_loop={self.iterations_per_loop}: must be >= 1")

    def learning_rate_schedule(self):
        peak = scaled_learning_rate(self.base_learning_rate,
                                    self.lr_batch_size or self.global_batch_size)
        warmup = int(self.lr_warmup_epochs * self.steps_per_epoch)
        start = 0.0
        if self.lr_warmup_start == "base":
            start = self.base_learning_rate
            if peak <= start:
                warmup = 0
        elif self.lr_warmup_start != "zero":
            raise ValueError(f"unknown warm-up start {self.lr_warmup_start!r}")
        if self.lr_schedule == "cosine":
            return WarmupCosineDecay(peak, self.train_steps, warmup, warmup_start=start)
        if self.lr_schedule == "step":
            return WarmupStepDecay(
                peak, [int(round(m * self.steps_per_epoch)) for m in self.lr_milestones],
                self.lr_decay_factor, warmup, warmup_start=start)
        if self.lr_schedule != "exponential":
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r}")
        return WarmupExponentialDecay(
            peak, decay_steps=self.lr_decay_epochs * self.steps_per_epoch,
            decay_factor=self.lr_decay_factor, warmup_steps=warmup, warmup_start=start)


def _add_unique(out, key, variable):
    key = key.replace(":", "_").replace("/", ".")
    unique, n = key, 1
    while unique in out:
        unique, n = f"{key}_{n}", n + 1
    out[unique] = variable


def variable_map(variables, strip_prefix=""):
    """{unique checkpoint key: variable}, keyed by the Keras variable paths."""
    out = {}
    for variable in variables:
        path = getattr(variable, "path", None) or variable.name
        if strip_prefix and path.startswith(strip_prefix):
            path = path[len(strip_prefix):]
        _add_unique(out, path, variable)
    return out


def model_variable_map(model):
    """{layer_name.variable_name: variable} for every variable of `model`.

    Keyed by the owning layer's name (stable across processes and model instances),
    not by `variable.path`: seed-generator states get process-wide auto-numbered paths.
    """
    out, seen = {}, set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if list(layer._flatten_layers(include_self=False, recursive=False)):
            continue  # a container: its leaves carry the variables
        for variable in layer.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                _add_unique(out, f"{layer.name}/{variable.name}", variable)
    for variable in model.variables:
        if id(variable) not in seen:
            _add_unique(out, getattr(variable, "path", variable.name), variable)
    return out


def is_normalization_variable(model):
    """Returns a predicate: is this variable a parameter/statistic of a norm layer?"""
    ids = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, NORM_LAYERS):
            ids.update(id(v) for v in layer.variables)
    return lambda variable: id(variable) in ids


def averaged_variables(model):
    """What the EMA tracks: trainable weights plus every moving statistic."""
    stats = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNorm):
            stats += layer.moving_means + layer.moving_variances
        elif isinstance(layer, keras.layers.BatchNormalization):
            stats += [layer.moving_mean, layer.moving_variance]
    return list(model.trainable_variables) + stats


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy set to `name` inside the block (layers built there
    keep it), restored after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def as_extras(extras):
    """A batch's third element as the extras dict: None -> {}; a dict (of tensors or
    per-replica values) as is; anything else is the source tags of the older
    (images, labels, source_tags) batches -> {"source_tags": extras}."""
    if extras is None:
        return {}
    if isinstance(extras, dict):
        return dict(extras)
    return {"source_tags": extras}


class MetricWindows:
    """The training loops' running metric sums: (sum, count) per name, summed since the
    last TensorBoard summary; the progress bar shows their means."""

    def __init__(self):
        self._sums = {}

    def add(self, values):
        """Adds one call's {name: (sum, count)}."""
        for k, (s, c) in values.items():
            old = self._sums.get(k, (0.0, 0.0))
            self._sums[k] = (old[0] + s, old[1] + c)

    def means(self):
        return {k: s / max(c, 1.0) for k, (s, c) in self._sums.items()}

    def postfix(self):
        """The progress bar's text: "adv_acc=0.123 cle_los=2.345 ..."."""
        return " ".join(f"{k.split('/')[1][:3]}_{k.split('/')[0][:3]}={v:.3f}"
                        for k, v in sorted(self.means().items()))

    def take(self):
        """The means since the last take (what a summary writes), and a fresh start."""
        means, self._sums = self.means(), {}
        return means


class StepTimer:
    """The training loops' throughput, timed from the end of the first call (which
    traces and compiles) to the end of the last."""

    def __init__(self):
        self._from = self._start = None

    def after_call(self, step):
        if self._from is None:
            self._from, self._start = time.perf_counter(), step

    def images_per_second(self, step, global_batch_size):
        """None when no call after the first ran."""
        if self._start is None or step <= self._start:
            return None
        return (step - self._start) * global_batch_size / (time.perf_counter() - self._from)


# The JAX engine's checkpoint index in model_dir (its checkpoints: ckpt-<step>.npz).
CHECKPOINT_INDEX = "checkpoint.json"


def jax_checkpoint_paths(model_dir):
    """The JAX engine's checkpoint files listed in model_dir, oldest first."""
    index = os.path.join(model_dir, CHECKPOINT_INDEX)
    if not os.path.exists(index):
        return []
    with open(index) as f:
        return [os.path.join(model_dir, name) for name in json.load(f)["checkpoints"]]


def newest_jax_checkpoint(model_dir):
    """The newest ckpt-<step>.npz listed in model_dir's checkpoint.json, or None."""
    listed = jax_checkpoint_paths(model_dir)
    return listed[-1] if listed else None


def load_jax_checkpoint(model, path, averaged=True):
    """Assigns a JAX checkpoint's weights (EMA averages with `averaged`, where the run
    kept them) to `model`'s variables by layer name; returns (step, used the EMA)."""
    with np.load(path) as arrays:
        arrays = dict(arrays)
    used_ema = averaged and any(k.startswith("ema/") for k in arrays)
    for key, variable in model_variable_map(model).items():
        value = arrays.get(f"ema/{key}") if used_ema else None
        if value is None:
            if f"model/{key}" not in arrays:
                raise ValueError(f"{path}: no weights for {key}")
            value = arrays[f"model/{key}"]
        variable.assign(np.asarray(value).astype(variable.dtype))
    return int(arrays["step"]), used_ema
