"""The recipe-agnostic training loop: tf.distribute, optimizer, EMA, checkpoints, logs.

A `Trainer` owns the model, optimizer, EMA and step counter (all created under the
strategy's scope) and runs `strategy.run` on a replica step that asks the recipe for a
loss. It knows nothing about adversarial examples: recipes do.

Reproducibility and resume: the attack/recipe randomness of step s is seeded by
(seed, s) folded with the replica id; the data stream is a deterministic function of
(seed, start_step); model-internal randomness (dropout, drop-connect) lives in Keras
seed-generator variables, which the checkpoint carries with the weights, optimizer
slots, EMA shadows and the step. The arithmetic is bitwise reproducible (and a resumed
run bitwise equal to an uninterrupted one) only under
`efficientnet_advprop.training.enable_determinism`; `restore` skips a newest
checkpoint that cannot be read back.

Steps per call: `iterations_per_loop` steps run inside one tf.function call (a loop
over the distributed iterator), as the official TPU code's --iterations_per_loop; a
loop never crosses a checkpoint, summary or image-summary step, so those stay exact.

Mixed precision (`precision`): the model is built under Keras' mixed_bfloat16 or
mixed_float16 policy (float32 variables, bf16/fp16 compute). Losses, softmax and every
SplitBatchNorm (statistics and normalisation) stay float32, and the recipes' attacks
trace under `attacks.float32_compute`. float16 adds dynamic loss scaling: see
`Trainer._replica_step`.
"""

import os
import re
import sys

import keras
import numpy as np
import tensorflow as tf

from efficientnet_advprop.attacks import attack_model
from efficientnet_advprop.layers.split_batch_norm import (bn_sets_of_variables,
                                                          sync_moving_statistics)
from efficientnet_advprop.recipes.base import SHARED, StepContext
from efficientnet_advprop.training.agc import is_classifier_variable
from efficientnet_advprop.training.ema import ExponentialMovingAverage
from efficientnet_advprop.training.gradients import mean_gradients, regularize_gradients
from efficientnet_advprop.training.loop import (  # noqa: F401 (re-exported)
    NORM_LAYERS, PRECISIONS, InputDataError, MetricWindows, StepTimer, TrainConfig,
    TrainingError,
    as_extras, averaged_variables, dtype_policy, is_normalization_variable,
    model_variable_map, variable_map)
from efficientnet_advprop.training.optimizers import make_optimizer
from efficientnet_advprop.utils.progress import Progress

def op_error_reason(error):
    """The first informative line of a TensorFlow error, without {{...}} prefixes."""
    message = getattr(error, "message", "") or str(error)
    lines = [re.sub(r"\{\{[^}]*\}\}\s*", "", line).strip() for line in message.splitlines()]
    # Errors raised inside a tf.function start with a generic header and a stack trace.
    useful = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "<stack traces", "[["))]
    return (useful or lines or [""])[0]


def is_input_pipeline_error(error):
    """True when a step failed while fetching its batch (the iterator's GetNext op):
    undecodable or unreadable data, not a fault of the model or the recipe."""
    if isinstance(error, tf.errors.DataLossError):
        return True
    message = getattr(error, "message", "") or str(error)
    return isinstance(error, tf.errors.InvalidArgumentError) and "GetNext" in message


class ScaleGradient(keras.layers.Layer):
    """Identity forward; the gradient flowing back through it is multiplied by
    `scale_fn()`. Placed on the model's logits it makes every backward pass of a recipe
    the backward pass of the loss times the loss scale, without the recipe knowing."""

    def __init__(self, scale_fn, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self._scale_fn = scale_fn

    def call(self, inputs):
        @tf.custom_gradient
        def scaled(x):
            def grad(upstream):
                return upstream * tf.cast(self._scale_fn(), upstream.dtype)
            return tf.identity(x), grad

        return scaled(inputs)


class Trainer:
    """Trains `model_fn()` with `recipe` under `strategy`.

    Args:
      strategy: a tf.distribute.Strategy.
      model_fn: builds the keras.Model (called inside the strategy scope, under the
        dtype policy of `config.precision`).
      recipe: an efficientnet_advprop.recipes.Recipe.
      config: TrainConfig.

    A run resumes with the precision it started with: float16 adds the loss-scale
    optimizer's variables to the checkpoint, so a checkpoint does not move between
    float16 and the other precisions (bfloat16 and float32 share theirs).
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
        self.loss_scaling = config.precision == "float16"
        with strategy.scope():
            with dtype_policy(PRECISIONS[config.precision]):
                self.model = model_fn()
            self.schedule = config.learning_rate_schedule()
            self.optimizer = make_optimizer(
                config.optimizer, self.schedule,
                rmsprop_decay=config.rmsprop_decay, momentum=config.momentum,
                rmsprop_epsilon=config.rmsprop_epsilon, nesterov=config.nesterov)
            if self.loss_scaling:  # dynamic: x0.5 on a non-finite step, x2 per 2000
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
            # What the recipe differentiates: the model, or with loss scaling the model
            # followed by ScaleGradient (same layers and variables).
            self.train_model = self.model
            if self.loss_scaling:
                inputs = keras.Input(self.model.input_shape[1:])
                scale = ScaleGradient(self._backward_scale, name="loss_scale")
                self.train_model = keras.Model(inputs, scale(self.model(inputs)),
                                               name=self.model.name + "_loss_scaled")
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
            recipe.exchanges_across_replicas and self.num_replicas > 1)
        self._grad_fn = (tf.function(self._gradients, jit_compile=True) if whole
                         else self._gradients)
        self._piece_compiler = (
            (lambda fn: tf.function(fn, jit_compile=True))
            if config.jit_compile and not whole else None)
        sets = bn_sets_of_variables(self.model)
        self._groups = [sets.get(id(v), SHARED) for v in self.model.trainable_variables]
        self._train_step = tf.function(self._distributed_step)  # one step on a batch
        self._train_loop = tf.function(self._loop)
        self._step_spec = None  # (loss, metrics) structure of a step, see _loop
        self._writer = None
        self.images_per_second = None  # training throughput of the last train() call,
        # after its first (tracing) step
        self.start_step = None  # the step the last train() call resumed from (0: fresh)

    # ----------------------------------------------------------------- checkpoints
    def restore(self):
        """Restores the newest readable checkpoint in model_dir; returns its step.

        A listed checkpoint that cannot be read back whole -- a truncated data file, a
        missing or damaged index: what a machine lost while its files were not yet on
        disk can leave -- is skipped with a note on stderr, and the one before it is
        restored (every variable: whatever the failed attempt had assigned is
        overwritten). When no listed checkpoint can be read, raises TrainingError
        rather than start again from scratch over them.
        """
        listed = list(self.manager.checkpoints)
        latest = self.manager.latest_checkpoint
        if latest and latest not in listed:
            listed.append(latest)
        failed = []
        for path in reversed(listed):  # newest first
            try:
                self.checkpoint.restore(path).assert_consumed()
            except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError,
                    OSError) as e:
                failed.append(f"{os.path.basename(path)} ({op_error_reason(e)})")
                continue
            if failed:
                print(f"note: skipped unreadable checkpoint(s) {'; '.join(failed)}; "
                      f"restored {os.path.basename(path)}", file=sys.stderr)
                self.manager._latest_checkpoint = path  # error messages name this one
            return int(self.step.numpy())
        if failed:
            raise TrainingError(f"no checkpoint in {self.config.model_dir} can be read: "
                                f"{'; '.join(failed)}")
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
    def _gradients(self, images, labels, seed, shared_seed, step, extras):
        """Replica gradients of the recipe loss, each divided by the global number of
        (weighted) samples that produced it; weight decay comes later. `extras`: the
        batch's dict of per-image side information (StepContext.extras)."""
        ctx = StepContext(seed=seed, shared_seed=shared_seed, step=step,
                          num_replicas=self.num_replicas, extras=extras,
                          compile=self._piece_compiler)
        variables = self.model.trainable_variables
        out = self.recipe.gradients(self.train_model, variables, images, labels, ctx)
        global_batch = float(self.config.global_batch_size)
        grads = mean_gradients(out.grads, out.sample_weights, self._groups, global_batch,
                               self.num_replicas)
        return grads, out.loss_sum / global_batch, out.metrics

    def _finalize(self, grads):
        """Adds the L2 gradient (after AGC on the global gradient when it is on) and
        scales for the optimizer's sum over replicas: `regularize_gradients`."""
        config = self.config
        return regularize_gradients(
            grads, self.model.trainable_variables, weight_decay=config.weight_decay,
            decayed=self.decayed_variables, agc_clip=config.agc_clip,
            agc_eps=config.agc_eps, agc_excluded=self._agc_excluded,
            num_replicas=self.num_replicas)

    def _backward_scale(self):
        """Loss scaling: what the backward pass is multiplied by. Recipes return loss
        sums, so the loss scale is divided by the global batch: the backward pass then
        carries the loss scale times the mean loss, the magnitude Keras' loss scaling
        expects."""
        return self.optimizer.dynamic_scale / float(self.config.global_batch_size)

    def _unscale(self, grads):
        """Loss scaling: the recipe's gradients divided by the backward scale, all NaN
        on every replica when any replica has a non-finite one (so that all replicas
        skip the step together)."""
        scale = self._backward_scale()
        grads = [None if g is None else g / tf.cast(scale, g.dtype) for g in grads]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                                for g in grads if g is not None])
        failed = 1.0 - tf.cast(finite, tf.float32)  # replicas with a non-finite gradient
        if self.num_replicas > 1:
            failed = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, failed)
        poison = tf.where(failed > 0.0, float("nan"), 0.0)
        return [None if g is None else g + tf.cast(poison, g.dtype) for g in grads]

    def _replica_step(self, images, labels, seed, step, extras):
        """One replica's step: recipe gradients, AGC and weight decay, optimizer.

        float16 (loss scaling): the recipe differentiates through `train_model`, so its
        gradients are those of the loss times `_backward_scale()` (the
        LossScaleOptimizer's current scale over the global batch). They are unscaled
        here before AGC and weight decay (both need true gradients) and handed to the
        optimizer multiplied by its scale, which it divides out (exactly: the scale is
        a power of two) after checking that they are finite; a non-finite step is
        skipped on every replica and halves the scale. The step counter, EMA and data
        still advance; the learning-rate schedule follows the optimizer's count of
        applied steps.
        """
        context = tf.distribute.get_replica_context()
        replica_seed = tf.random.experimental.stateless_fold_in(
            seed, tf.cast(context.replica_id_in_sync_group, tf.int64))
        grads, loss, metrics = self._grad_fn(images, labels, replica_seed, seed, step,
                                             extras)
        grads = list(grads)
        if self.loss_scaling:
            grads = self._unscale(grads)
        grads = self._finalize(grads)
        if self.loss_scaling:
            scale = self.optimizer.dynamic_scale
            grads = [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
        pairs = [(g, v) for g, v in zip(grads, self.model.trainable_variables)
                 if g is not None]
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        return loss, metrics

    def _distributed_step(self, images, labels, extras=None):
        """One step on a batch (images, labels[, extras]): extras is the input
        pipeline's dict of per-image side information ("source_tags", "tda_images", see
        make_dataset), passed to the recipe as StepContext.extras; a bare tensor there
        is taken as the source tags (the older 3-tuple batches)."""
        extras = as_extras(extras)
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), self.step])
        step = tf.identity(self.step)
        loss, metrics = self.strategy.run(self._replica_step,
                                          args=(images, labels, seed, step, extras))
        total_loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        reduced = {name: (self.strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None),
                          self.strategy.reduce(tf.distribute.ReduceOp.SUM, c, axis=None))
                   for name, (s, c) in metrics.items()}
        if self.ema is not None:
            self.ema.update(self.step)
        self.step.assign_add(1)
        return total_loss, reduced

    def _loop(self, iterator, num_steps):
        """`num_steps` steps on consecutive batches of `iterator`, in one call.

        Returns the summed step losses, the summed metrics and the position (1-based)
        of the first step whose loss is not finite, 0 if none. The loop does not stop
        there: a data-dependent exit would make the host wait for every step's loss
        before starting the next (on a TPU, the pipelining the loop is for).
        """
        loss_sum, metric_sums = tf.nest.map_structure(
            lambda spec: tf.zeros(spec.shape, spec.dtype), self._step_spec)
        first_bad = tf.constant(0, tf.int32)
        for position in tf.range(1, num_steps + 1):
            loss, metrics = self._distributed_step(*next(iterator))
            loss_sum += loss
            metric_sums = tf.nest.map_structure(tf.add, metric_sums, metrics)
            first_bad = tf.where(
                tf.logical_and(tf.equal(first_bad, 0), tf.logical_not(tf.math.is_finite(loss))),
                position, first_bad)
        return loss_sum, metric_sums, first_bad

    def _run_steps(self, iterator, length):
        """-> (summed loss, summed metrics, first non-finite step or 0) of the next
        `length` steps, as `_loop`.

        With iterations_per_loop 1 each step is one call fed from Python. Otherwise the
        steps run in `_loop`, whose accumulators need the step's output structure
        before its body is traced: one step is traced (not run) once to learn it.
        """
        if self.config.iterations_per_loop == 1:
            loss, metrics = self._train_step(*next(iterator))
            return loss, metrics, tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.int32)
        if self._step_spec is None:
            concrete = self._train_step.get_concrete_function(*iterator.element_spec)
            self._step_spec = tf.nest.map_structure(
                lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs)
        return self._train_loop(iterator, tf.constant(length))

    def _loop_length(self, step, images_too):
        """Steps of the next loop: iterations_per_loop, cut at the next checkpoint,
        summary (and image summary) step and at the end of training."""
        config = self.config
        length = min(config.iterations_per_loop, config.train_steps - step)
        every = [config.checkpoint_every_steps, config.summary_every_steps]
        if images_too:
            every.append(config.image_summary_every_steps)
        for interval in every:
            if interval:
                length = min(length, interval - step % interval)
        return length

    # ----------------------------------------------------------------- the loop
    def learning_rate(self, step=None):
        return float(self.schedule(self.step if step is None else step))

    def train(self, dataset_fn, sample_images=None, on_checkpoint=None):
        """Runs until config.train_steps, `config.iterations_per_loop` steps per call.

        After each call: the loss check (a non-finite loss raises TrainingError naming
        the step; nothing is saved), progress, and at their steps the TensorBoard
        scalars, the checkpoint and the adversarial sample images. An input pipeline
        failure (undecodable data) raises InputDataError.

        Args:
          dataset_fn: (input_context, start_step) -> per-replica batched dataset of
            (images, labels) or (images, labels, extras), extras a dict of per-image
            side information that reaches the recipe as StepContext.extras
            ("source_tags", "tda_images": make_dataset(..., options=InputOptions(
            source_tags=recipe.needs_source_tags, extra_views=recipe.input_views))); a bare
            source-tags tensor in place of the dict is accepted too. Called through
            distribute_datasets_from_function.
          sample_images: optional (images, labels) numpy batch whose adversarial
            versions are written as TensorBoard images at each checkpoint.
          on_checkpoint: optional callback(trainer) after each checkpoint.
        Returns:
          dict of the last logging window's metric means.
        """
        config = self.config
        start = self.restore()
        self.start_step = start
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
        windows = MetricWindows()
        last = {}
        step = start
        timer = StepTimer()
        while step < config.train_steps:
            length = self._loop_length(step, sample_images is not None)
            try:
                loss, metrics, first_bad = self._run_steps(iterator, length)
                first_bad = int(first_bad)
                values = {k: (float(s), float(c)) for k, (s, c) in metrics.items()}
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
                if not is_input_pipeline_error(e):
                    raise
                where = (f"before step {step + 1}" if length == 1
                         else f"in steps {step + 1}..{step + length}")
                raise InputDataError(
                    f"the input pipeline failed {where} ({op_error_reason(e)}); the "
                    f"last good checkpoint is {self.manager.latest_checkpoint or 'none'}"
                ) from None
            if first_bad:
                raise TrainingError(
                    f"loss is {float(loss)} at step {step + first_bad}; stopped without "
                    f"saving. The last good checkpoint is "
                    f"{self.manager.latest_checkpoint or 'none'}")
            step += length
            timer.after_call(step)  # the first call traces (and compiles): not timed
            windows.add(values)
            progress.update(length, length * config.global_batch_size, windows.postfix())
            if step % config.summary_every_steps == 0 or step == config.train_steps:
                last = windows.take()
                with writer.as_default(step=step):
                    for k, v in last.items():
                        tf.summary.scalar(k, v)
                    tf.summary.scalar("learning_rate", self.learning_rate(step - 1))
                    tf.summary.scalar("images_per_second", progress.rate)
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
        rate = timer.images_per_second(step, config.global_batch_size)
        if rate is not None:
            self.images_per_second = rate
        return last

    def _summary_writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.config.model_dir, "train"))
        return self._writer

    def write_adversarial_samples(self, images, labels, step, max_images=4):
        """TensorBoard images: clean, adversarial and the perturbation (amplified)."""
        attack = self.recipe.attack
        if attack is None:
            return
        images = tf.convert_to_tensor(images[:max_images], tf.float32)
        labels = tf.convert_to_tensor(labels[:max_images], tf.int32)
        bn_set = self.recipe.attack_bn_set
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
