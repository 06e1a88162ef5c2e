"""The JAX engine: the same model, recipes and training arithmetic as the TensorFlow
`Trainer`, run as one jitted step over Keras' stateless API.

One step (`JaxTrainer._step`), traced once and compiled by XLA:

  1. every model variable is mapped to its current value in a `keras.StatelessScope`
     (so the recipe calls the model statefully, as on TensorFlow);
  2. `recipe.gradients` -- through `seam.value_and_grad`, i.e. `jax.value_and_grad`
     over the trainable values; BN moving statistics and seed-generator states
     assigned inside come out of the scope as new values;
  3. `mean_gradients` and `regularize_gradients` (the TF engine's functions);
  4. `optimizer.stateless_apply` (the same Keras optimizer classes and learning-rate
     schedules), then the EMA of weights and moving statistics with the official
     decay min(decay, (1 + step) / (10 + step)).

`iterations_per_loop` steps run in one call (over a stack of host batches, unrolled
in the trace: compile time grows with the count), cut at checkpoint and summary steps
as on TensorFlow. The host reads a call's losses (the finiteness check, the metric
windows) only after it has dispatched the next call, so the device never waits for
that bookkeeping; at a summary or checkpoint step every call so far is read first.

Devices and BN: the step is data parallel over the local devices with
`keras.distribution.DataParallel` (variables replicated, the batch sharded along its
first axis). The step sees *global* arrays, so a BN layer's batch statistics are over
the whole step's batch: synchronised BN over all devices (XLA inserts the all-reduce).
On one device -- a CPU, one GPU -- that is exactly the TF engine's per-replica BN; on
several devices it is TF's `--sync_batch_norm`. Per-device statistics (TF's default
with several replicas) are not implemented on this engine yet.

Randomness: the step's seed is `seam.make_seed(seed, step)` folded with replica 0, as
the TF engine's `[seed, step]` folded with the replica id; the JAX engine draws
different numbers from it (jax.random, not tf.random's stateless kernels). The run's
seed is an argument of the compiled step, not a constant in it, so runs that differ
only in their seed share one compiled program (through JAX's persistent compilation
cache when it is on).
Model-internal randomness (dropout, stochastic depth) lives in Keras seed-generator
variables, which are model variables here: checkpointed and restored with the weights.

Checkpoints (`ckpt-<step>.npz` in model_dir, newest listed in `checkpoint.json`,
written to a temporary file and renamed): the model's variables by layer name (the
TF engine's `model_variable_map` keys), the optimizer's variables, the EMA shadows,
the step; the data position is the step (the input stream is a function of seed and
step). A resumed run continues exactly as an uninterrupted one would (a test checks
it bitwise on the CPU). float16 loss scaling is not implemented on this engine:
`precision="float16"` is refused; bfloat16 and float32 work.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import StatelessScope

from efficientnet_advprop import seam
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_sets_of_variables
from efficientnet_advprop.recipes.base import SHARED, StepContext
from efficientnet_advprop.training.agc import is_classifier_variable
from efficientnet_advprop.training.gradients import mean_gradients, regularize_gradients
from efficientnet_advprop.training.loop import (CHECKPOINT_INDEX, PRECISIONS, TrainingError,
                                                as_extras, jax_checkpoint_paths,
                                                averaged_variables, dtype_policy,
                                                MetricWindows, StepTimer,
                                                is_normalization_variable,
                                                model_variable_map, variable_map)
from efficientnet_advprop.training.optimizers import make_optimizer
from efficientnet_advprop.training.scalar_log import ScalarWriter
from efficientnet_advprop.utils.progress import Progress


def _checkpoint_name(step):
    return f"ckpt-{int(step)}.npz"


class JaxTrainer:
    """Trains `model_fn()` with `recipe` on the JAX backend.

    Args:
      model_fn: builds the keras.Model (called under the dtype policy of
        `config.precision`, with the data-parallel distribution set when there are
        several devices).
      recipe: an efficientnet_advprop.recipes.Recipe.
      config: training.loop.TrainConfig (the TF engine's); `jit_compile` is ignored
        (the step is always compiled).
      augment: optional (float32 images [B, H, W, 3], seed) -> images, run inside
        the compiled step before the recipe (the TF-free input path's pad-crop-flip);
        its seed is folded from the step's.
      devices: the devices to train on (default: every local device).
    """

    def __init__(self, model_fn, recipe, config, augment=None, devices=None):
        if keras.backend.backend() != "jax":
            raise RuntimeError("JaxTrainer needs KERAS_BACKEND=jax")
        if config.precision == "float16":
            raise ValueError("precision=float16: the JAX engine does no loss scaling; use "
                             "bfloat16 or float32 (or the TensorFlow engine)")
        self.recipe = recipe
        self.config = config
        self.augment = augment
        self.devices = list(devices or jax.local_devices())
        self.num_devices = len(self.devices)
        if config.global_batch_size % self.num_devices:
            raise ValueError(f"--train_batch_size={config.global_batch_size} is not "
                             f"divisible by the {self.num_devices} devices")
        self.distribution = None
        if self.num_devices > 1:
            self.distribution = keras.distribution.DataParallel(devices=self.devices)
            keras.distribution.set_distribution(self.distribution)
        with dtype_policy(PRECISIONS[config.precision]):
            self.model = model_fn()
        self.schedule = config.learning_rate_schedule()
        self.optimizer = make_optimizer(
            config.optimizer, self.schedule, rmsprop_decay=config.rmsprop_decay,
            momentum=config.momentum, rmsprop_epsilon=config.rmsprop_epsilon,
            nesterov=config.nesterov)
        self.optimizer.build(self.model.trainable_variables)
        model = self.model
        self._trainable = list(model.trainable_variables)
        self._non_trainable = list(model.non_trainable_variables)
        sets = bn_sets_of_variables(model)
        self._groups = [sets.get(id(v), SHARED) for v in self._trainable]
        is_norm = is_normalization_variable(model)
        self._decayed = [v for v in self._trainable if not is_norm(v)]
        self._agc_excluded = is_classifier_variable(model)
        self._averaged = (averaged_variables(model) if config.moving_average_decay > 0
                          else [])
        position = {id(v): i for i, v in enumerate(self._trainable + self._non_trainable)}
        self._averaged_index = [position[id(v)] for v in self._averaged]
        self.state = self._initial_state()
        self.step = 0
        self.start_step = None
        self.images_per_second = None
        self._compiled = {}
        self._writer = None
        # an argument of the compiled step (see _step), the TF engine's int seed
        self.run_seed = jnp.asarray(config.seed).astype(jnp.uint32)

    # ------------------------------------------------------------------ state
    def _initial_state(self):
        # Copies: the compiled step donates (reuses) the state's buffers, which must
        # not be the Keras variables' own.
        values = [jnp.array(v.value, copy=True)
                  for v in self._trainable + self._non_trainable]
        ema = [jnp.array(values[i], jnp.float32, copy=True) for i in self._averaged_index]
        return {"trainable": values[:len(self._trainable)],
                "non_trainable": values[len(self._trainable):],
                "optimizer": [jnp.array(v.value, copy=True) for v in self.optimizer.variables],
                "ema": ema}

    @property
    def ema(self):
        """True when the run keeps weight averages (the TF engine's `trainer.ema`)."""
        return bool(self._averaged)

    def sync_to_model(self, averaged=False):
        """Writes the state into the Keras variables (EMA averages with `averaged`),
        for evaluation, export or inspection."""
        values = self.state["trainable"] + self.state["non_trainable"]
        for variable, value in zip(self._trainable + self._non_trainable, values):
            variable.assign(jnp.array(value, copy=True))
        if averaged:
            for index, shadow in zip(self._averaged_index, self.state["ema"]):
                variable = (self._trainable + self._non_trainable)[index]
                variable.assign(jnp.asarray(shadow, variable.dtype))
        for variable, value in zip(self.optimizer.variables, self.state["optimizer"]):
            variable.assign(jnp.array(value, copy=True))

    # ------------------------------------------------------------------ the step
    def _step(self, state, batch, step, run_seed):
        """One training step on a global batch -> (new state, loss, metrics).

        `run_seed` (config.seed) is traced, not a constant of the program: the runs of
        one recipe that differ only in their seed compile to the same HLO, which
        JAX's persistent compilation cache then serves to every seed after the first."""
        images, labels = batch[0], batch[1]
        extras = as_extras(batch[2] if len(batch) > 2 else None)
        config = self.config
        mapping = (list(zip(self._trainable, state["trainable"]))
                   + list(zip(self._non_trainable, state["non_trainable"])))
        with StatelessScope(state_mapping=mapping) as scope:
            seed = seam.make_seed(run_seed, step)
            images = jnp.asarray(images, jnp.float32)
            if self.augment is not None:
                images = self.augment(images, seam.fold_in(seed, 0xA06))
            ctx = StepContext(seed=seam.fold_in(seed, 0), shared_seed=seed, step=step,
                              num_replicas=1, extras=extras)
            out = self.recipe.gradients(self.model, self._trainable, images, labels, ctx)
            global_batch = float(config.global_batch_size)
            grads = mean_gradients(out.grads, out.sample_weights, self._groups,
                                   global_batch, 1)
            grads = regularize_gradients(
                grads, self._trainable, weight_decay=config.weight_decay,
                decayed=self._decayed, agc_clip=config.agc_clip, agc_eps=config.agc_eps,
                agc_excluded=self._agc_excluded, num_replicas=1)
        non_trainable = [scope.get_current_value(v) for v in self._non_trainable]
        non_trainable = [old if new is None else new
                         for new, old in zip(non_trainable, state["non_trainable"])]
        # A variable the recipe does not touch (vanilla's auxiliary BNs: zeros from
        # jax.grad, or None) gets a zero gradient: with no gradient ever, every
        # optimizer's update of it stays zero, as the TF engine leaves it alone (they
        # are normalisation parameters, so no weight decay is added to them either).
        grads = [jnp.zeros_like(v) if g is None else g
                 for g, v in zip(grads, state["trainable"])]
        trainable, optimizer = self.optimizer.stateless_apply(
            state["optimizer"], grads, state["trainable"])
        ema = state["ema"]
        if ema:
            decay = jnp.float32(config.moving_average_decay)
            count = jnp.asarray(step, jnp.float32)
            decay = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
            values = list(trainable) + list(non_trainable)
            ema = [shadow - (1.0 - decay) * (shadow - jnp.asarray(values[i], jnp.float32))
                   for shadow, i in zip(ema, self._averaged_index)]
        new_state = {"trainable": list(trainable), "non_trainable": non_trainable,
                     "optimizer": list(optimizer), "ema": ema}
        return new_state, out.loss_sum / global_batch, out.metrics

    def _loop_fn(self, length):
        """A compiled (state, batches, first_step, run_seed) -> (state, (losses,
        metrics)) running `length` steps on a stack of batches."""
        if length not in self._compiled:
            def steps(state, batches, first_step, run_seed):
                # A Python loop, unrolled in the trace: XLA:CPU runs convolutions inside
                # a while loop (lax.scan, even with unroll=True) about 13x slower than
                # the same step outside one (measured on resnet-18-cifar).
                losses, metrics = [], []
                for index in range(length):
                    batch = jax.tree_util.tree_map(lambda x, i=index: x[i], batches)
                    state, loss, step_metrics = self._step(state, batch, first_step + index,
                                                            run_seed)
                    losses.append(loss)
                    metrics.append(step_metrics)
                stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics)
                return state, (jnp.stack(losses), stacked)

            self._compiled[length] = jax.jit(steps, donate_argnums=(0,))
        return self._compiled[length]

    def _shard(self, batches):
        """Host arrays [k, B, ...] -> device arrays, batch axis split over devices."""
        if self.distribution is None:
            return jax.tree_util.tree_map(jnp.asarray, batches)
        mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
        sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "batch"))
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batches)

    # ------------------------------------------------------------- checkpoints
    def _named_arrays(self):
        """{key: numpy array} of the whole training state (what a checkpoint holds)."""
        out = {}
        model_names = {id(v): k for k, v in model_variable_map(self.model).items()}
        values = self.state["trainable"] + self.state["non_trainable"]
        for variable, value in zip(self._trainable + self._non_trainable, values):
            out["model/" + model_names[id(variable)]] = np.asarray(value)
        opt_names = {id(v): k for k, v in variable_map(
            self.optimizer.variables, strip_prefix=self.optimizer.name + "/").items()}
        for variable, value in zip(self.optimizer.variables, self.state["optimizer"]):
            out["optimizer/" + opt_names[id(variable)]] = np.asarray(value)
        everything = self._trainable + self._non_trainable
        for index, shadow in zip(self._averaged_index, self.state["ema"]):
            out["ema/" + model_names[id(everything[index])]] = np.asarray(shadow)
        out["step"] = np.asarray(self.step, np.int64)
        return out

    def _load_arrays(self, arrays):
        model_names = {id(v): k for k, v in model_variable_map(self.model).items()}
        everything = self._trainable + self._non_trainable

        def get(key, like):
            if key not in arrays:
                raise KeyError(f"{key} missing")
            value = arrays[key]
            if tuple(value.shape) != tuple(like.shape):
                raise ValueError(f"{key}: shape {value.shape}, model {like.shape}")
            return jnp.asarray(value, like.dtype)

        values = [get("model/" + model_names[id(v)], v) for v in everything]
        opt_names = {id(v): k for k, v in variable_map(
            self.optimizer.variables, strip_prefix=self.optimizer.name + "/").items()}
        optimizer = [get("optimizer/" + opt_names[id(v)], v)
                     for v in self.optimizer.variables]
        ema = [jnp.asarray(arrays["ema/" + model_names[id(everything[i])]], jnp.float32)
               for i in self._averaged_index]
        self.state = {"trainable": values[:len(self._trainable)],
                      "non_trainable": values[len(self._trainable):],
                      "optimizer": optimizer, "ema": ema}
        self.step = int(arrays["step"])

    def checkpoints(self):
        """The checkpoint files of model_dir, oldest first (from checkpoint.json)."""
        return jax_checkpoint_paths(self.config.model_dir)

    @property
    def latest_checkpoint(self):
        listed = self.checkpoints()
        return listed[-1] if listed else None

    def save(self):
        """Writes ckpt-<step>.npz (temporary file, then rename) and the index."""
        model_dir = self.config.model_dir
        os.makedirs(model_dir, exist_ok=True)
        name = _checkpoint_name(self.step)
        path = os.path.join(model_dir, name)
        partial = path + ".partial"
        with open(partial, "wb") as f:
            np.savez(f, **self._named_arrays())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        names = [os.path.basename(p) for p in self.checkpoints() if p != path] + [name]
        keep = max(1, self.config.keep_checkpoints)
        for old in names[:-keep]:
            try:
                os.remove(os.path.join(model_dir, old))
            except FileNotFoundError:
                pass
        index = os.path.join(model_dir, CHECKPOINT_INDEX)
        with open(index + ".partial", "w") as f:
            json.dump({"checkpoints": names[-keep:], "engine": "jax"}, f)
        os.replace(index + ".partial", index)
        return path

    def restore(self):
        """Loads the newest readable checkpoint (skipping unreadable ones with a note,
        as the TF engine); returns its step (0 when there is none)."""
        failed = []
        for path in reversed(self.checkpoints()):
            try:
                with np.load(path) as arrays:
                    self._load_arrays(dict(arrays))
            except (OSError, ValueError, KeyError, EOFError) as e:
                failed.append(f"{os.path.basename(path)} ({str(e).splitlines()[0]})")
                continue
            if failed:
                print(f"note: skipped unreadable checkpoint(s) {'; '.join(failed)}; "
                      f"restored {os.path.basename(path)}", file=sys.stderr)
            self.sync_to_model()
            return self.step
        if failed:
            raise TrainingError(f"no checkpoint in {self.config.model_dir} can be read: "
                                f"{'; '.join(failed)}")
        return 0

    # ---------------------------------------------------------------- the loop
    def learning_rate(self, step):
        return float(self.schedule(step))

    def _loop_length(self, step):
        config = self.config
        length = min(config.iterations_per_loop, config.train_steps - step)
        for interval in (config.checkpoint_every_steps, config.summary_every_steps):
            if interval:
                length = min(length, interval - step % interval)
        return length

    def train(self, batches_fn, on_checkpoint=None):
        """Runs until config.train_steps (resuming from model_dir's newest checkpoint).

        Args:
          batches_fn: start_step -> iterator of global batches (images, labels) or
            (images, labels, extras) as numpy arrays (extras a dict, as the TF
            engine's), starting at the batch of `start_step`.
          on_checkpoint: optional callback(trainer) after each checkpoint.
        Returns:
          dict of the last summary window's metric means.
        """
        config = self.config
        start = self.restore()
        self.start_step = start
        if start:
            print(f"resumed from {self.latest_checkpoint} at step {start}", file=sys.stderr)
        if start >= config.train_steps:
            return {}
        iterator = iter(batches_fn(start))
        writer = self._summary_writer()
        progress = Progress(config.train_steps, initial=start)
        windows, last = MetricWindows(), {}
        step = start
        timer = StepTimer()
        in_flight = None  # the call whose results are not read yet

        def take_results(call):
            # Waits for one call's results: the loss check, the metric windows.
            first, length, (losses, metrics) = call
            losses = np.asarray(losses)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                # The state already holds the bad step's update: reload what was saved.
                raise TrainingError(
                    f"loss is {losses[bad[0]]} at step {first + bad[0] + 1}; stopped "
                    f"without saving. The last good checkpoint is "
                    f"{self.latest_checkpoint or 'none'}")
            windows.add({k: (float(np.sum(s)), float(np.sum(c)))
                         for k, (s, c) in metrics.items()})
            timer.after_call(first + length)  # the first call compiles: not timed
            progress.update(length, length * config.global_batch_size, windows.postfix())

        while step < config.train_steps:
            length = self._loop_length(step)
            host = [next(iterator) for _ in range(length)]
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *host)
            self.state, outputs = self._loop_fn(length)(
                self.state, self._shard(stacked), jnp.int32(step), self.run_seed)
            # Run ahead: the device starts this call before the host reads the
            # previous one's losses, so the two overlap instead of alternating.
            if in_flight is not None:
                take_results(in_flight)
            in_flight = (step, length, outputs)
            step += length
            self.step = step
            summary = step % config.summary_every_steps == 0 or step == config.train_steps
            checkpoint = (step % config.checkpoint_every_steps == 0
                          or step == config.train_steps)
            if summary or checkpoint:
                take_results(in_flight)
                in_flight = None
            if summary:
                last = windows.take()
                scalars = dict(last, learning_rate=self.learning_rate(step - 1),
                               images_per_second=progress.rate)
                writer.write(step, scalars)
            if checkpoint:
                self.save()
                if on_checkpoint:
                    on_checkpoint(self)
        writer.flush()
        self.sync_to_model()
        rate = timer.images_per_second(step, config.global_batch_size)
        if rate is not None:
            self.images_per_second = rate
        return last

    def _summary_writer(self):
        if self._writer is None:
            self._writer = ScalarWriter(os.path.join(self.config.model_dir, "train"))
        return self._writer


def make_eval_fn(model, attack=None, bn_set=MAIN, num_classes=None):
    """A jitted (state values, images, labels, seed) -> (correct clean, correct
    adversarial) of `model` through `bn_set` in inference mode; the adversarial count
    is 0 without `attack` (an AttackConfig)."""
    from efficientnet_advprop.attacks import attack_model
    from efficientnet_advprop.layers.split_batch_norm import bn_route
    from efficientnet_advprop.recipes.base import count_correct

    variables = list(model.variables)

    def evaluate(values, images, labels, seed):
        with StatelessScope(state_mapping=list(zip(variables, values))):
            images = jnp.asarray(images, jnp.float32)
            with bn_route(bn_set):
                logits = model(images, training=False)
            clean = count_correct(labels, logits)
            adversarial = jnp.float32(0.0)
            if attack is not None:
                adv = attack_model(model, images, labels, attack, bn_set=bn_set,
                                   num_classes=num_classes, seed=seed)
                with bn_route(bn_set):
                    adversarial = count_correct(labels, model(adv, training=False))
        return clean, adversarial

    return jax.jit(evaluate)
