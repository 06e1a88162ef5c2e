"""Keras-native training: `model.fit()` with any recipe.

`RecipeModel(model, recipe)` wraps a model built by `build_model` (SplitBatchNorm with
the recipe's auxiliary sets) in a `keras.Model` whose `train_step` runs the recipe
through the same contract as `Trainer` (main.py's loop): `recipe.gradients(...)` on
each replica's batch with a `StepContext`, then `training.gradients.mean_gradients`
(each gradient over the global, possibly per-group weighted, sample count) and
`regularize_gradients` (the Trainer's L2 and AGC), then the compiled Keras optimizer's
`apply` -- which, under a tf.distribute strategy, sums the replicas' gradients. The
loss is never a Keras loss: `compile(loss=...)` and `compile(metrics=...)` are refused,
the recipe's own metrics are reported instead.

Randomness: the step seed is `[seed, optimizer.iterations]`, folded with the replica
id -- exactly the Trainer's `[config.seed, step]` when `seed=config.seed`. With
`seed=None` the seed is drawn by a `keras.random.SeedGenerator` from Keras' global
seed, so `keras.utils.set_random_seed` makes runs reproducible. The seed is in the
config and in a model weight (saved by `save()`, `ModelCheckpoint` and
`BackupAndRestore`), and the step is the optimizer's iteration count, so a resumed run
draws the attacks an uninterrupted one would.

Compared with main.py's `Trainer` (see docs/python_api.md, "Training with Keras fit()"):
- weight decay: `weight_decay=` is the Trainer's coupled L2 (wd * w added to the
  gradient of every non-normalisation weight, before the optimizer); a Keras
  optimizer's own `weight_decay=` is decoupled (AdamW-style) and applies to every
  variable unless excluded -- use one or the other.
- AGC: `agc_clip=` / `agc_eps=` as the Trainer's (the same function).
- EMA: not the Trainer's (no decay warm-up, no moving statistics averaged, no eval on
  the averages); Keras' `optimizer(use_ema=True)` is a different average.
- TF1 RMSProp: pass `training.TF1RMSprop` (or `make_optimizer`) to `compile`.
- iterations per loop: Keras' `compile(steps_per_execution=N)`.
- float16 loss scaling: not supported (compile refuses a LossScaleOptimizer); bfloat16
  and float32 work.
- learning-rate schedules: pass one of `training.schedules` (or any Keras schedule)
  to the optimizer; nothing is scaled by the batch size here.
"""

import dataclasses

import keras
import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import (MAIN, bn_route, bn_sets_of_variables,
                                                          sync_moving_statistics)
from efficientnet_advprop.recipes.base import (SHARED, StepContext, count_correct,
                                               cross_entropy, hard_labels)
from efficientnet_advprop.training.agc import is_classifier_variable
from efficientnet_advprop.training.gradients import mean_gradients, regularize_gradients
from efficientnet_advprop.training.loop import as_extras, is_normalization_variable

# Folded into the evaluation seeds, so that they never equal a training step's.
_EVAL_TAG = 0x5EED


def metric_name(name):
    """A recipe metric name ("loss/clean", "accuracy/adversarial") as a Keras log name
    ("clean_loss", "adversarial_accuracy"): Keras names cannot hold "/"."""
    kind, _, what = name.partition("/")
    return f"{what}_{kind}" if what else kind


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class RecipeMetrics(keras.metrics.Metric):
    """Running (sum, count) pairs of named quantities in one Keras metric.

    `update_state({name: (sum, count)})` adds to the named pair; `result()` is
    {name: sum / count}. Names get slots the first time a step is traced (recipes say
    which metrics they report only when they run), up to `capacity` of them. The
    variables are ON_READ/SUM like every Keras metric's: each replica adds its own
    share, a read in cross-replica context (the epoch's logs) sees the global sums.
    """

    def __init__(self, capacity=32, name="recipe_metrics", **kwargs):
        super().__init__(name=name, **kwargs)
        self.capacity = int(capacity)
        self.sums = self.add_variable((self.capacity,), "zeros", name="sums")
        self.counts = self.add_variable((self.capacity,), "zeros", name="counts")
        self.batches = self.add_variable((), "zeros", name="batches")
        self._slots = {}

    def _slot(self, name):
        if name not in self._slots:
            if len(self._slots) == self.capacity:
                raise ValueError(f"{self.name}: more than {self.capacity} metrics")
            self._slots[name] = len(self._slots)
        return self._slots[name]

    def update_state(self, values):
        names = sorted(values)
        indices = tf.constant([[self._slot(n)] for n in names], tf.int32)
        sums = tf.stack([tf.cast(values[n][0], tf.float32) for n in names])
        counts = tf.stack([tf.cast(values[n][1], tf.float32) for n in names])
        shape = [self.capacity]
        self.sums.assign_add(tf.scatter_nd(indices, sums, shape))
        self.counts.assign_add(tf.scatter_nd(indices, counts, shape))
        self.batches.assign_add(1.0)

    def result(self):
        sums = tf.convert_to_tensor(self.sums)
        counts = tf.convert_to_tensor(self.counts)
        return {name: sums[i] / tf.maximum(counts[i], 1.0)
                for name, i in self._slots.items()}

    def get_config(self):
        return {"capacity": self.capacity, "name": self.name}


def _attack_dict(attack):
    return None if attack is None else dataclasses.asdict(attack)


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class RecipeModel(keras.Model):
    """A Keras model whose `fit` trains `model` with `recipe`.

    Args:
      model: a built keras.Model from `build_model` (RGB in [0, 255] in, logits out),
        with at least `recipe.num_aux` auxiliary BN sets.
      recipe: an `efficientnet_advprop.recipes.Recipe` (`make_recipe(name, ...)`).
      seed: an int: the step seed is `[seed, step]`, as `Trainer` with
        `TrainConfig(seed=seed)`; None: drawn from Keras' global seed.
      weight_decay: the Trainer's L2 coefficient (coupled, non-normalisation weights
        only); 0 for none.
      agc_clip, agc_eps: adaptive gradient clipping as the Trainer's (0: off).
      eval_attack: an AttackConfig (e.g. `evaluation.eval_attack_config(1.0, 10)`):
        `evaluate` then also reports `adversarial_accuracy` under this attack through
        the main BNs; None: clean accuracy only.

    Batches: (images, labels) or (images, labels, extras), images float RGB in
    [0, 255] (any dtype, cast to float32), labels int class ids (or soft targets),
    extras the dict `make_dataset` yields with `InputOptions(source_tags=...,
    extra_views=...)` (StepContext.extras). A Keras sample_weight would be read as
    extras: not supported. Training batches must split evenly over the replicas
    (drop_remainder=True), as main.py's.

    Logs: "loss" (the recipe's loss per image) and every recipe metric as
    "<what>_<kind>" ("clean_accuracy", "adversarial_loss", ...); evaluation:
    "loss" (cross-entropy without label smoothing), "clean_accuracy" and, with
    `eval_attack`, "adversarial_accuracy", all through the main BNs in inference mode.
    """

    def __init__(self, model, recipe, *, seed=None, weight_decay=0.0, agc_clip=0.0,
                 agc_eps=1e-3, eval_attack=None, **kwargs):
        kwargs.setdefault("name", f"{model.name}_{recipe.name}")
        super().__init__(**kwargs)
        if isinstance(eval_attack, dict):
            eval_attack = AttackConfig(**eval_attack)
        if weight_decay < 0 or agc_clip < 0:
            raise ValueError("weight_decay and agc_clip must be >= 0")
        self.model = model
        self.recipe = recipe
        if seed is None:  # Keras' global seed (keras.utils.set_random_seed) decides
            seed = int(keras.ops.convert_to_numpy(keras.random.SeedGenerator().state)[0])
        self.seed = int(seed)
        self.weight_decay = float(weight_decay)
        self.agc_clip = float(agc_clip)
        self.agc_eps = float(agc_eps)
        self.eval_attack = eval_attack
        # A weight, so that weights-only checkpoints (BackupAndRestore) restore it too.
        self.seed_variable = self.add_weight(
            shape=(), dtype="int64", initializer=keras.initializers.Constant(self.seed),
            trainable=False, name="seed")
        self.train_metrics = RecipeMetrics(name="train_metrics")
        self.eval_metrics = RecipeMetrics(name="eval_metrics")
        if model.built:
            self.built = True
        is_norm = is_normalization_variable(model)
        self._decayed = [v for v in model.trainable_variables if not is_norm(v)]
        self._agc_excluded = is_classifier_variable(model) if self.agc_clip else None

    # ------------------------------------------------------------------ Keras API
    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Keras' compile; the loss is the recipe's, so `loss`, `loss_weights`,
        `metrics` and `weighted_metrics` must be left unset."""
        if loss is not None or metrics or kwargs.get("weighted_metrics") or kwargs.get(
                "loss_weights"):
            raise ValueError("RecipeModel trains with its recipe's loss and reports the "
                             "recipe's metrics: compile it with an optimizer only")
        super().compile(optimizer=optimizer, **kwargs)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError("RecipeModel does not do float16 loss scaling (a "
                             "mixed_float16 policy wraps the optimizer in a "
                             "LossScaleOptimizer); use bfloat16 or float32, or main.py")
        if self.built and not self.optimizer.built:
            # Slots for every trainable variable, as the Trainer's: a recipe that
            # leaves some without a gradient (vanilla: the auxiliary BNs) must not
            # build the optimizer on the first step's subset.
            self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        """Compiles a loaded model as it was saved (Keras' own, which skips models
        that override `compile`), optimizer variables included."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        return [self.train_metrics, self.eval_metrics]

    def get_metrics_result(self):
        """The results of the metrics updated since the last reset (training or
        evaluation), read in cross-replica context: global sums over replicas."""
        out = {}
        for metric in self.metrics:
            if float(keras.ops.convert_to_numpy(metric.batches)) > 0:
                out.update({k: float(v) for k, v in metric.result().items()})
        return out

    # ------------------------------------------------------------------ the steps
    @staticmethod
    def _unpack(data):
        if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
            raise ValueError("RecipeModel batches are (images, labels) or (images, "
                             "labels, extras)")
        images, labels = data[0], data[1]
        extras = data[2] if len(data) == 3 else None
        return tf.cast(images, tf.float32), labels, as_extras(extras)

    def step_seed(self, step):
        """int64 [2]: the step's seed before the replica id is folded in."""
        base = tf.cast(tf.convert_to_tensor(self.seed_variable), tf.int64)
        return tf.stack([base, tf.cast(step, tf.int64)])

    @staticmethod
    def _replica():
        strategy = tf.distribute.get_strategy()
        context = tf.distribute.get_replica_context()
        replica_id = tf.cast(context.replica_id_in_sync_group, tf.int64)
        return strategy.num_replicas_in_sync, replica_id

    def train_step(self, data):
        images, labels, extras = self._unpack(data)
        num_replicas, replica_id = self._replica()
        step = tf.convert_to_tensor(self.optimizer.iterations)
        seed = self.step_seed(step)
        ctx = StepContext(seed=tf.random.experimental.stateless_fold_in(seed, replica_id),
                          shared_seed=seed, step=tf.cast(step, tf.int64),
                          num_replicas=num_replicas, extras=extras)
        variables = self.model.trainable_variables
        out = self.recipe.gradients(self.model, variables, images, labels, ctx)
        local_batch = (images.shape[0] if images.shape[0] is not None
                       else tf.shape(images)[0])
        global_batch = tf.cast(local_batch, tf.float32) * float(num_replicas)
        sets = bn_sets_of_variables(self.model)
        groups = [sets.get(id(v), SHARED) for v in variables]
        grads = mean_gradients(out.grads, out.sample_weights, groups, global_batch,
                               num_replicas)
        grads = regularize_gradients(
            grads, variables, weight_decay=self.weight_decay, decayed=self._decayed,
            agc_clip=self.agc_clip, agc_eps=self.agc_eps,
            agc_excluded=self._agc_excluded, num_replicas=num_replicas)
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        values = {metric_name(k): v for k, v in out.metrics.items()}
        values["loss"] = (out.loss_sum, tf.cast(local_batch, tf.float32))
        self.train_metrics.update_state(values)
        return self.train_metrics.result()

    def test_step(self, data):
        images, labels, _ = self._unpack(data)
        num_replicas, replica_id = self._replica()
        with bn_route(MAIN):
            logits = tf.cast(self.model(images, training=False), tf.float32)
        count = tf.cast(tf.shape(images)[0], tf.float32)
        num_classes = logits.shape[-1]
        values = {"loss": (tf.reduce_sum(cross_entropy(labels, logits, num_classes)), count),
                  "clean_accuracy": (count_correct(labels, logits), count)}
        if self.eval_attack is not None:
            batch_index = tf.cast(tf.convert_to_tensor(self.eval_metrics.batches), tf.int64)
            seed = tf.random.experimental.stateless_fold_in(
                self.step_seed(batch_index), _EVAL_TAG)
            seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
            adv = attack_model(self.model, images, hard_labels(labels), self.eval_attack, bn_set=MAIN,
                               num_classes=num_classes, seed=seed)
            with bn_route(MAIN):
                adv_logits = self.model(adv, training=False)
            values["adversarial_accuracy"] = (count_correct(labels, adv_logits), count)
        self.eval_metrics.update_state(values)
        return self.eval_metrics.result()

    # ------------------------------------------------------------ saving, export
    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "model": keras.saving.serialize_keras_object(self.model),
                "recipe": self.recipe.get_config(), "seed": self.seed,
                "weight_decay": self.weight_decay, "agc_clip": self.agc_clip,
                "agc_eps": self.agc_eps, "eval_attack": _attack_dict(self.eval_attack)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from efficientnet_advprop.recipes import recipe_from_config

        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"),
                                                      custom_objects=custom_objects)
        recipe = recipe_from_config(config.pop("recipe"))
        return cls(model, recipe, **config)

    def sync_moving_statistics(self):
        """Sets every replica's BN moving statistics to their mean over replicas (in
        cross-replica context) -- what reads from cross-replica context (save, export)
        see anyway; call it before evaluating inside a strategy if replicas must
        agree, as Trainer.save does."""
        sync_moving_statistics(self.model)

    def export_saved_model(self, export_dir, **kwargs):
        """`export.export_saved_model` of the wrapped model: auxiliary BNs stripped,
        preprocessing inside, signatures serving_default and serve_jpeg."""
        from efficientnet_advprop import export

        return export.export_saved_model(self.model, export_dir, **kwargs)

    def export_tflite(self, path, **kwargs):
        """`export.export_tflite` of the wrapped model (main BNs, float32 or
        dynamic-range quantised)."""
        from efficientnet_advprop import export

        return export.export_tflite(self.model, path, **kwargs)

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """Keras' `Model.export` of the deployed network: the wrapped model with its
        auxiliary BNs stripped (`export.strip_auxiliary_bn`)."""
        from efficientnet_advprop.models.strip import strip_auxiliary_bn

        return strip_auxiliary_bn(self.model).export(filepath, format=format, **kwargs)
