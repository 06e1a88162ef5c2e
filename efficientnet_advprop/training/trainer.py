"""The recipe-agnostic training loop: tf.distribute, optimizer, EMA, checkpoints, logs.

A `Trainer` owns the model, optimizer, EMA and step counter (all created under the
strategy's scope) and runs `strategy.run` on a replica step that asks the recipe for a
loss. It knows nothing about adversarial examples: recipes do.

Reproducibility and resume: the attack/recipe randomness of step s is seeded by
(seed, s) folded with the replica id; the data stream is a deterministic function of
(seed, start_step); model-internal randomness (dropout, drop-connect) lives in Keras
seed-generator variables, which the checkpoint carries with the weights, optimizer
slots, EMA shadows and the step.
"""

import dataclasses
import math
import os
import re
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from efficientnet_advprop.attacks import attack_model
from efficientnet_advprop.layers.split_batch_norm import (MAIN, SplitBatchNorm,
                                                          bn_sets_of_variables,
                                                          sync_moving_statistics)
from efficientnet_advprop.recipes.base import SHARED, StepContext
from efficientnet_advprop.training.agc import adaptive_clip_gradients, is_classifier_variable
from efficientnet_advprop.training.ema import ExponentialMovingAverage
from efficientnet_advprop.training.optimizers import make_optimizer
from efficientnet_advprop.training.progress import Progress
from efficientnet_advprop.training.schedules import (WarmupCosineDecay,
                                                     WarmupExponentialDecay,
                                                     WarmupStepDecay,
                                                     scaled_learning_rate)

NORM_LAYERS = (SplitBatchNorm, keras.layers.BatchNormalization,
               keras.layers.GroupNormalization, keras.layers.LayerNormalization)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss stopped being finite)."""


class InputDataError(TrainingError):
    """The input pipeline failed (an undecodable image, a corrupt record)."""


def op_error_reason(error):
    """The first line of a TensorFlow error, without its {{function_node ...}} prefix."""
    message = (getattr(error, "message", "") or str(error)).strip().splitlines()[0]
    return re.sub(r"\{\{[^}]*\}\}\s*", "", message)


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
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 5
    summary_every_steps: int = 100
    image_summary_every_steps: int = 0  # 0: only with each checkpoint
    log_every_seconds: float = 10.0

    def learning_rate_schedule(self):
        peak = scaled_learning_rate(self.base_learning_rate,
                                    self.lr_batch_size or self.global_batch_size)
        warmup = int(self.lr_warmup_epochs * self.steps_per_epoch)
        if self.lr_schedule == "cosine":
            return WarmupCosineDecay(peak, self.train_steps, warmup)
        if self.lr_schedule == "step":
            return WarmupStepDecay(
                peak, [int(round(m * self.steps_per_epoch)) for m in self.lr_milestones],
                self.lr_decay_factor, warmup)
        if self.lr_schedule != "exponential":
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r}")
        return WarmupExponentialDecay(
            peak, decay_steps=self.lr_decay_epochs * self.steps_per_epoch,
            decay_factor=self.lr_decay_factor, warmup_steps=warmup)


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


class Trainer:
    """Trains `model_fn()` with `recipe` under `strategy`.

    Args:
      strategy: a tf.distribute.Strategy.
      model_fn: builds the keras.Model (called inside the strategy scope).
      recipe: an efficientnet_advprop.recipes.Recipe.
      config: TrainConfig.
    """

    def __init__(self, strategy, model_fn, recipe, config):
        self.strategy = strategy
        self.recipe = recipe
        self.config = config
        self.num_replicas = strategy.num_replicas_in_sync
        if config.global_batch_size % self.num_replicas:
            raise ValueError(
                f"--train_batch_size={config.global_batch_size} is not divisible by the "
                f"{self.num_replicas} replicas")
        with strategy.scope():
            self.model = model_fn()
            self.schedule = config.learning_rate_schedule()
            self.optimizer = make_optimizer(
                config.optimizer, self.schedule,
                rmsprop_decay=config.rmsprop_decay, momentum=config.momentum,
                rmsprop_epsilon=config.rmsprop_epsilon, nesterov=config.nesterov)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.ema = (ExponentialMovingAverage(averaged_variables(self.model),
                                                 config.moving_average_decay)
                        if config.moving_average_decay > 0 else None)
        self._agc_excluded = is_classifier_variable(self.model)
        is_norm = is_normalization_variable(self.model)
        self.decayed_variables = [v for v in self.model.trainable_variables
                                  if not is_norm(v)]
        # Keras 3 objects do not expose every variable to tf.train's object graph
        # (variables held in lists -- BN sets, seed-generator states -- are skipped),
        # so the checkpoint holds explicit name -> variable maps of everything.
        tracked = {"model": model_variable_map(self.model),
                   "optimizer": variable_map(self.optimizer.variables,
                                             strip_prefix=self.optimizer.name + "/")}
        if self.ema:
            names = {id(v): k for k, v in tracked["model"].items()}
            tracked["ema"] = {names[id(v)]: shadow for v, shadow in
                              zip(self.ema.variables_averaged, self.ema.shadows)}
        self.checkpoint = tf.train.Checkpoint(step=self.step, **tracked)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, config.model_dir, max_to_keep=config.keep_checkpoints,
            step_counter=self.step)
        # With XLA the replica's forward/attack/backward is one compiled cluster; the
        # optimizer update (which all-reduces) stays outside it. Without XLA the
        # function is inlined: a nested tf.function cannot hold the cross-replica
        # sync of synchronised BN under MirroredStrategy. A recipe that exchanges
        # images between replicas (Fast AdvProp's shuffle BN) cannot be one cluster
        # under MirroredStrategy either (XLA there has no collectives): it compiles
        # its pieces through ctx.compile instead.
        whole = config.jit_compile and not (
            getattr(recipe, "exchanges_across_replicas", False) and self.num_replicas > 1)
        self._grad_fn = (tf.function(self._gradients, jit_compile=True) if whole
                         else self._gradients)
        self._piece_compiler = (
            (lambda fn: tf.function(fn, jit_compile=True))
            if config.jit_compile and not whole else None)
        sets = bn_sets_of_variables(self.model)
        self._groups = [sets.get(id(v), SHARED) for v in self.model.trainable_variables]
        self._train_step = tf.function(self._distributed_step)
        self._writer = None
        self.images_per_second = None  # training throughput of the last train() call,
        # after its first (tracing) step

    # ----------------------------------------------------------------- checkpoints
    def restore(self):
        """Restores the latest checkpoint in model_dir; returns the restored step."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_consumed()
        return int(self.step.numpy())

    def initialize_from(self, load_fn):
        """Starts a fresh run from given weights: `load_fn(model)` unless model_dir
        already has a checkpoint (a resume wins). EMA shadows restart from the loaded
        weights. Returns load_fn's result, or None when resuming."""
        if self.manager.latest_checkpoint:
            return None
        result = load_fn(self.model)
        if self.ema is not None:
            self.ema.reset()
        return result

    def save(self):
        sync_moving_statistics(self.model)
        return self.manager.save(checkpoint_number=int(self.step.numpy()))

    # ------------------------------------------------------------------ the step
    def _gradients(self, images, labels, seed, shared_seed, step, source_tags):
        """Replica gradients of the recipe loss, each divided by the global number of
        (weighted) samples that produced it; weight decay comes later."""
        ctx = StepContext(seed=seed, shared_seed=shared_seed, step=step,
                          num_replicas=self.num_replicas, source_tags=source_tags,
                          compile=self._piece_compiler)
        variables = self.model.trainable_variables
        out = self.recipe.gradients(self.model, variables, images, labels, ctx)
        global_batch = float(self.config.global_batch_size)
        if out.sample_weights is None:
            divisors = [global_batch] * len(variables)
        else:
            weights = {k: tf.cast(v, tf.float32) * float(self.num_replicas)
                       for k, v in out.sample_weights.items()}
            divisors = [tf.maximum(weights.get(group, weights[SHARED]), 1e-6)
                        for group in self._groups]
        grads = [None if g is None else g / tf.cast(d, g.dtype)
                 for g, d in zip(out.grads, divisors)]
        return grads, out.loss_sum / global_batch, out.metrics

    def _finalize(self, grads):
        """Adds the L2 gradient (after AGC on the global gradient when it is on) and
        scales for the optimizer's sum over replicas.

        AGC is not linear, so it must see the gradient summed over replicas: the sum is
        all-reduced here, clipped, and handed to the optimizer divided by the replica
        count (the optimizer's own all-reduce then restores the global value).
        Without AGC, each replica adds wd * w / replicas (the gradient of the official
        0.5 * wd * ||w||^2 term, shared out over the replicas).
        """
        variables = self.model.trainable_variables
        decayed = {id(v) for v in self.decayed_variables}
        wd = self.config.weight_decay
        if self.config.agc_clip:
            if self.num_replicas > 1:
                context = tf.distribute.get_replica_context()
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            grads = adaptive_clip_gradients(grads, variables, clip=self.config.agc_clip,
                                            eps=self.config.agc_eps,
                                            exclude=self._agc_excluded)
            scale = 1.0 / self.num_replicas
            return [None if g is None else
                    (g + wd * tf.cast(v, g.dtype) if wd and id(v) in decayed else g) * scale
                    for g, v in zip(grads, variables)]
        return [None if g is None else
                (g + wd / self.num_replicas * tf.cast(v, g.dtype)
                 if wd and id(v) in decayed else g)
                for g, v in zip(grads, variables)]

    def _replica_step(self, images, labels, seed, step, source_tags):
        context = tf.distribute.get_replica_context()
        replica_seed = tf.random.experimental.stateless_fold_in(
            seed, tf.cast(context.replica_id_in_sync_group, tf.int64))
        grads, loss, metrics = self._grad_fn(images, labels, replica_seed, seed, step,
                                             source_tags)
        grads = self._finalize(list(grads))
        pairs = [(g, v) for g, v in zip(grads, self.model.trainable_variables)
                 if g is not None]
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        return loss, metrics

    def _distributed_step(self, images, labels, source_tags=None):
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), self.step])
        step = tf.identity(self.step)
        loss, metrics = self.strategy.run(self._replica_step,
                                          args=(images, labels, seed, step, source_tags))
        total_loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        reduced = {name: (self.strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None),
                          self.strategy.reduce(tf.distribute.ReduceOp.SUM, c, axis=None))
                   for name, (s, c) in metrics.items()}
        if self.ema is not None:
            self.ema.update(self.step)
        self.step.assign_add(1)
        return total_loss, reduced

    # ----------------------------------------------------------------- the loop
    def learning_rate(self, step=None):
        return float(self.schedule(self.step if step is None else step))

    def train(self, dataset_fn, sample_images=None, on_checkpoint=None):
        """Runs until config.train_steps.

        Args:
          dataset_fn: (input_context, start_step) -> per-replica batched dataset of
            (images, labels) or (images, labels, source_tags); called through
            distribute_datasets_from_function.
          sample_images: optional (images, labels) numpy batch whose adversarial
            versions are written as TensorBoard images at each checkpoint.
          on_checkpoint: optional callback(trainer) after each checkpoint.
        Returns:
          dict of the last logging window's metric means.
        """
        config = self.config
        start = self.restore()
        if start:
            print(f"resumed from {self.manager.latest_checkpoint} at step {start}",
                  file=sys.stderr)
        if start >= config.train_steps:
            return {}
        dist = self.strategy.distribute_datasets_from_function(
            lambda ctx: dataset_fn(ctx, start))
        iterator = iter(dist)
        writer = self._summary_writer()
        progress = Progress(config.train_steps, initial=start)
        window = {}
        summary_window = {}
        last = {}
        step = start
        while step < config.train_steps:
            try:
                batch = next(iterator)
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
                reason = op_error_reason(e)
                raise InputDataError(
                    f"the input pipeline failed before step {step + 1} ({reason}); the "
                    f"last good checkpoint is {self.manager.latest_checkpoint or 'none'}"
                ) from None
            loss, metrics = self._train_step(*batch)
            step += 1
            loss = float(loss)
            if step == start + 1:  # the first step traces (and compiles): not timed
                timed_from = time.perf_counter()
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss} at step {step}; stopped without saving. The last "
                    f"good checkpoint is {self.manager.latest_checkpoint or 'none'}")
            values = {k: (float(s), float(c)) for k, (s, c) in metrics.items()}
            for acc in (window, summary_window):
                for k, (s, c) in values.items():
                    old = acc.get(k, (0.0, 0.0))
                    acc[k] = (old[0] + s, old[1] + c)
            means = {k: s / max(c, 1.0) for k, (s, c) in window.items()}
            postfix = " ".join(f"{k.split('/')[1][:3]}_{k.split('/')[0][:3]}={v:.3f}"
                               for k, v in sorted(means.items()))
            progress.update(1, config.global_batch_size, postfix)
            if step % config.summary_every_steps == 0 or step == config.train_steps:
                last = {k: s / max(c, 1.0) for k, (s, c) in summary_window.items()}
                with writer.as_default(step=step):
                    for k, v in last.items():
                        tf.summary.scalar(k, v)
                    tf.summary.scalar("learning_rate", self.learning_rate(step - 1))
                    tf.summary.scalar("images_per_second", progress.rate)
                summary_window = {}
                window = {}
            if step % config.checkpoint_every_steps == 0 or step == config.train_steps:
                self.save()
                if sample_images is not None:
                    self.write_adversarial_samples(*sample_images, step=step)
                if on_checkpoint:
                    on_checkpoint(self)
            elif (config.image_summary_every_steps and sample_images is not None
                  and step % config.image_summary_every_steps == 0):
                self.write_adversarial_samples(*sample_images, step=step)
        writer.flush()
        timed_steps = step - start - 1
        if timed_steps > 0:
            self.images_per_second = (timed_steps * config.global_batch_size
                                      / (time.perf_counter() - timed_from))
        return last

    def _summary_writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.config.model_dir, "train"))
        return self._writer

    def write_adversarial_samples(self, images, labels, step, max_images=4):
        """TensorBoard images: clean, adversarial and the perturbation (amplified)."""
        attack = getattr(self.recipe, "attack", None)
        if attack is None:
            return
        images = tf.convert_to_tensor(images[:max_images], tf.float32)
        labels = tf.convert_to_tensor(labels[:max_images], tf.int32)
        bn_set = getattr(self.recipe, "attack_bn_set", MAIN)
        seed = tf.constant([self.config.seed, 7], tf.int64)
        adv = attack_model(self.model, images, labels, attack, bn_set=bn_set, seed=seed)
        delta = adv - images
        amplified = 0.5 + delta / (2.0 * attack.epsilon)  # [-eps, eps] -> [0, 1]
        with self._summary_writer().as_default(step=step):
            tf.summary.image("samples/clean", images / 255.0, max_outputs=max_images)
            tf.summary.image("samples/adversarial", adv / 255.0, max_outputs=max_images)
            tf.summary.image("samples/perturbation", tf.clip_by_value(amplified, 0.0, 1.0),
                             max_outputs=max_images)


def set_global_seed(seed):
    """Seeds Python, NumPy, TF and Keras generators (dropout masks, initialisers)."""
    keras.utils.set_random_seed(int(seed))
    np.random.seed(int(seed))
