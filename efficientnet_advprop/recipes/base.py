"""What every recipe shares: the contract with the loop, the losses and the metrics.

A recipe says how one replica's batch becomes gradients. Most recipes only describe a
loss (`compute`) and inherit `gradients`, which differentiates it; recipes that need
the backward pass themselves (Fast AdvProp reuses one backward for the parameter and
the input gradient) override `gradients`.

Conventions:
- Losses are *sums* of weighted per-sample losses over the replica's local batch. The
  loop divides each parameter's gradient by the global number of (weighted) samples
  that produced it (`training.gradients.mean_gradients`, shared by `Trainer` and
  `RecipeModel`): by default the global batch size for every parameter; a recipe can
  return `sample_weights` per parameter group ("shared" weights, BN set k) instead --
  Fast AdvProp's "update-speed synchronisation". Either way the result does not depend
  on the number of replicas.
- Metrics are (sum, count) pairs that the loop sums over replicas before dividing.
- Randomness comes from `ctx.seed` (different on every replica) or `ctx.shared_seed`
  (equal on every replica, for decisions the replicas must agree on), drawn through
  the seam's stateless random ops.
- Backend-neutral: recipes compute in `keras.ops` and differentiate through
  `seam.value_and_grad`, so the same file trains on the TensorFlow and the JAX
  engine. A recipe never imports TensorFlow or JAX.
"""

import dataclasses
import inspect

from keras import ops

from efficientnet_advprop import seam
from efficientnet_advprop.layers.split_batch_norm import MAIN

SHARED = "shared"  # key of sample_weights for every parameter outside a BN set


@dataclasses.dataclass
class StepContext:
    """What a replica knows about the current step besides its batch.

    Attributes:
      seed: a [2] seed (`seam.make_seed`), different on every replica and step.
      shared_seed: a [2] seed, the same on every replica (different per step).
      step: integer scalar, the global step being computed (0-based).
      num_replicas: replicas in sync (a Python int).
      compile: fn -> fn; wraps the pieces a recipe wants XLA-compiled when the loop
        runs with jit_compile but cannot compile the whole step (identity otherwise).
      extras: dict of per-image side information from the input pipeline, this
        replica's share of the batch (the third element of a training batch, see
        `efficientnet_advprop.data.make_dataset`); keys present only when the
        pipeline made them:
          "source_tags": int32 [B], 0 = plain clean image, 1 = AutoAugment/RandAugment
            image (`InputOptions(source_tags=True)`);
          "tda_images": float32 [B, H, W, 3], the texture-debiased view of each image
            made from the decoded image (`InputOptions(extra_views=("tda",))`).
      source_tags: `extras.get("source_tags")` (read-only). The constructor also takes
        `source_tags=` and stores it in `extras`.
    """

    seed: object
    shared_seed: object = None
    step: object = None
    num_replicas: int = 1
    source_tags: dataclasses.InitVar[object] = None
    compile: object = None
    extras: dict = None

    def __post_init__(self, source_tags):
        if self.shared_seed is None:
            self.shared_seed = self.seed
        if self.step is None:
            self.step = ops.convert_to_tensor(0, "int32")
        if self.compile is None:
            self.compile = lambda fn: fn
        self.extras = dict(self.extras or {})
        if source_tags is not None:
            if self.extras.get("source_tags") is not None:
                raise ValueError("StepContext: source_tags given twice (argument and "
                                 "extras['source_tags'])")
            self.extras["source_tags"] = source_tags

    def fold(self, tag, shared=False):
        """A seed for one random decision of this step, independent of other tags."""
        base = self.shared_seed if shared else self.seed
        return seam.fold_in(base, tag)


# Defined after the dataclass so that the constructor keeps its `source_tags=None`
# argument (an InitVar) while the attribute reads `extras`.
StepContext.source_tags = property(lambda self: self.extras.get("source_tags"),
                                   doc="extras.get('source_tags'): int32 [B] or None.")


def as_context(ctx):
    """Accepts a StepContext or a bare seed tensor (tests, notebooks)."""
    return ctx if isinstance(ctx, StepContext) else StepContext(seed=ctx)


@dataclasses.dataclass
class RecipeOutput:
    """A recipe's loss for one replica.

    loss_sum: sum over the local batch of weighted per-sample losses (float32 scalar).
    metrics: name -> (sum, count).
    sample_weights: None (divide every gradient by the global batch size) or
      {SHARED: n, set_index: n_k, ...}: local weighted sample counts per parameter group.
    """

    loss_sum: object
    metrics: dict
    sample_weights: dict = None


@dataclasses.dataclass
class RecipeGradients:
    """Gradients of a replica's loss *sum* (aligned with the variables asked for)."""

    grads: list
    loss_sum: object
    metrics: dict
    sample_weights: dict = None


@dataclasses.dataclass(frozen=True)
class Cite:
    """A paper's value of one experiment setting and where the paper (or its
    reference code) says so."""

    value: object
    source: str


@dataclasses.dataclass(frozen=True)
class Option:
    """A setting that only this recipe reads (a --flag of main.py of the same name).

    Attributes:
      name: config field and flag name (unique across recipes unless two recipes
        share the meaning, e.g. clean_loss_weight).
      default: Cite(value, source) of the paper's value, or a plain value.
      help: one line for the flag's help.
      low, high: the closed range the value must lie in (None: unbounded);
        low_open / high_open make an end open.
      arg: the recipe constructor's keyword (default: name); to_arg maps the
        option's value to it (e.g. lambda -> 1 - lambda).
    """

    name: str
    default: object
    help: str
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    arg: str = None
    to_arg: object = None

    @property
    def value(self):
        return self.default.value if isinstance(self.default, Cite) else self.default

    @property
    def source(self):
        return self.default.source if isinstance(self.default, Cite) else "recipe default"

    @property
    def kind(self):
        return type(self.value)

    def check(self, value):
        """None if `value` is valid, else what is wrong (without the name)."""
        if self.low is None and self.high is None:
            return None
        lo_ok = (self.low is None or (value > self.low if self.low_open
                                      else value >= self.low))
        hi_ok = (self.high is None or (value < self.high if self.high_open
                                       else value <= self.high))
        if lo_ok and hi_ok:
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"must be {'<' if self.high_open else '<='} {self.high:g}"
        return (f"must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def constructor_item(self, value):
        return self.arg or self.name, (self.to_arg(value) if self.to_arg else value)


def cross_entropy(labels, logits, num_classes, label_smoothing=0.0):
    """Per-sample softmax cross-entropy with the official label smoothing.

    `labels` are int class ids [B] or soft targets [B, num_classes] (Mixup/CutMix).
    Smoothed target = target * (1 - s) + s / num_classes (tf.compat.v1.losses
    .softmax_cross_entropy semantics), computed in float32 (on TensorFlow by
    tf.nn.softmax_cross_entropy_with_logits, through keras.ops).
    """
    target = soft_targets(labels, num_classes)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return ops.categorical_crossentropy(target, ops.cast(logits, "float32"),
                                        from_logits=True)


def sparse_cross_entropy(labels, logits):
    """Per-sample cross-entropy of int class ids, float32, no smoothing."""
    return ops.sparse_categorical_crossentropy(ops.cast(labels, "int32"),
                                               ops.cast(logits, "float32"),
                                               from_logits=True)


def soft_targets(labels, num_classes):
    if len(labels.shape) == 2:
        return ops.cast(labels, "float32")
    return ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype="float32")


def hard_labels(labels):
    """Class ids from int labels or soft targets (the largest share)."""
    if len(labels.shape) == 2:
        return ops.cast(ops.argmax(labels, axis=-1), "int32")
    return ops.cast(labels, "int32")


def kl_divergence(p_logits, q_logits):
    """Per-sample KL(softmax(p) || softmax(q)), summed over classes, in float32."""
    p_log = ops.log_softmax(ops.cast(p_logits, "float32"))
    q_log = ops.log_softmax(ops.cast(q_logits, "float32"))
    return ops.sum(ops.exp(p_log) * (p_log - q_log), axis=-1)


def count_correct(labels, logits):
    predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
    return ops.sum(ops.cast(ops.equal(predictions, hard_labels(labels)), "float32"))


def batch_metrics(prefix, labels, logits, per_sample_loss):
    count = ops.cast(ops.shape(logits)[0], "float32")
    return {f"loss/{prefix}": (ops.sum(per_sample_loss), count),
            f"accuracy/{prefix}": (count_correct(labels, logits), count)}


class Recipe:
    """Base class. Subclasses set `name` and `num_aux` and implement `compute` (or
    `gradients`). A recipe file holds its paper: `paper` and `options` below.

    Class attributes (the contract with the config and the loop; every one is
    declared here, so nothing reads an undeclared attribute):
      name: the --recipe name.
      title: the paper (or papers) the recipe follows, one line.
      paper: {experiment setting: Cite(value, source)} -- the paper's values of the
        shared settings (optimizer, learning rate, epochs, attack, ...), applied to
        every setting the user did not set. "lr_milestones" are fractions of the run.
      options: tuple of Option -- the settings only this recipe reads.
      adversarial: the recipe trains on attacked images (takes an AttackConfig).
      num_aux: auxiliary BN sets the model must have.
      attack: the AttackConfig used to make training examples, or None.
      attack_bn_set: the BN set the attack runs through (and the set that normalises
        adversarial images; evaluation reports it next to the main set).
      needs_source_tags: the input pipeline must tag each image with its source
        (`InputOptions(source_tags=True)` -> `ctx.extras["source_tags"]`).
      input_views: extra per-image views the input pipeline must make, names from
        `efficientnet_advprop.data.EXTRA_VIEWS` (`InputOptions(
        extra_views=recipe.input_views)`); "tda" -> `ctx.extras["tda_images"]`.
      preferred_preprocessing: the model's input normalisation this recipe's paper
        uses (None: the model family's default).
      normalizer_free_only: the method is defined on a normalizer-free network
        (NoFrost); the config refuses a model with normalisation layers.
      exchanges_across_replicas: the step exchanges images between replicas (the
        loop then keeps the replicas' batches aligned).
      budget_factor: cost of one drawn image relative to vanilla training; a recipe
        whose paper calibrates the budget (Fast AdvProp) sets `calibrates_budget`.
    """

    name = "recipe"
    title = ""
    paper = {}
    options = ()
    adversarial = True
    num_aux = 0
    attack = None
    attack_bn_set = MAIN
    needs_source_tags = False
    input_views = ()
    preferred_preprocessing = None
    normalizer_free_only = False
    exchanges_across_replicas = False
    calibrates_budget = False

    def __new__(cls, *args, **kwargs):
        recipe = super().__new__(cls)
        # What the recipe was built from, so that `get_config` can rebuild it (a Keras
        # model that trains with it, RecipeModel, saves it in its config).
        recipe._constructor_arguments = (args, kwargs)
        return recipe

    def __init__(self, num_classes, label_smoothing=0.1):
        self.num_classes = int(num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def loss(self, labels, logits):
        return cross_entropy(labels, logits, self.num_classes, self.label_smoothing)

    def joint_losses(self, labels, logits, num_clean, clean_labels=None):
        """Per-sample losses and metrics of one forward of [clean; adversarial] images:
        the first `num_clean` logits are clean (labels `clean_labels`, default
        `labels`), the rest adversarial (labels `labels`)."""
        clean_labels = labels if clean_labels is None else clean_labels
        clean_logits, adv_logits = logits[:num_clean], logits[num_clean:]
        clean_loss = self.loss(clean_labels, clean_logits)
        adv_loss = self.loss(labels, adv_logits)
        metrics = batch_metrics("clean", clean_labels, clean_logits, clean_loss)
        metrics.update(batch_metrics("adversarial", labels, adv_logits, adv_loss))
        return clean_loss, adv_loss, metrics

    def compute(self, model, images, labels, ctx):
        """-> RecipeOutput for one replica's batch; `ctx` is a StepContext."""
        raise NotImplementedError

    def gradients(self, model, variables, images, labels, ctx):
        """-> RecipeGradients of the loss sum with respect to `variables`."""
        def loss():
            out = self.compute(model, images, labels, ctx)
            return out.loss_sum, (out.metrics, out.sample_weights)

        loss_sum, (metrics, weights), grads, _ = seam.value_and_grad(loss, variables)
        return RecipeGradients(list(grads), loss_sum, metrics, weights)

    def passes_per_image(self):
        """Forward+backward passes per image drawn, the cost model of Fast AdvProp."""
        return 1.0

    @property
    def budget_factor(self):
        return 1.0

    # ------------------------------------------------ hooks for the config and loop
    def lr_batch_size(self, global_batch):
        """Images the linear learning-rate scaling counts (default: all drawn)."""
        return global_batch

    def drawn_batch(self, clean_batch):
        """The smallest batch to draw for `clean_batch` clean images: the batch itself,
        except for a recipe that counts only part of its drawn images as clean
        (`lr_batch_size`; Fast AdvProp draws B / (1 - p_adv))."""
        batch = int(clean_batch)
        while self.lr_batch_size(batch) < clean_batch:
            batch += 1
        return batch

    def bn_batches(self, local_batch, num_replicas=1):
        """{what: images} of every batch a BN layer normalises together in one step
        of a replica's `local_batch` (the smallest must reach the config's
        min_bn_batch). Raises ValueError when the batch cannot be split at all."""
        return {"replica batch": local_batch}

    def configure_schedule(self, train_steps, steps_per_epoch):
        """Called once the run's length is known (e.g. consistent BN's last epochs)."""

    def smallest_local_batch(self, min_bn_batch, num_replicas=1, start=1):
        """The smallest replica batch >= start whose BN batches all reach
        `min_bn_batch` (None if there is none below 64 x min_bn_batch)."""
        for batch in range(max(1, start), 64 * max(1, min_bn_batch) + 1):
            try:
                sizes = self.bn_batches(batch, num_replicas)
            except ValueError:
                continue
            if min(sizes.values()) >= min_bn_batch:
                return batch
        return None

    @classmethod
    def option_defaults(cls):
        return {o.name: o.value for o in cls.options}

    @classmethod
    def from_options(cls, num_classes, attack=None, label_smoothing=0.1, **values):
        """Builds the recipe from option values by option name (see `options`)."""
        known = {o.name: o for o in cls.options}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{cls.name} has no option(s) {', '.join(unknown)}")
        kwargs = {}
        for name, option in known.items():
            key, value = option.constructor_item(values.get(name, option.value))
            kwargs[key] = value
        if attack is not None:
            kwargs["attack"] = attack
        return cls(num_classes, label_smoothing=label_smoothing, **kwargs)

    def describe(self):
        return self.name

    def get_config(self):
        """{"name", "arguments"}: the recipe's --recipe name and the constructor
        arguments it was built with (JSON-able; an AttackConfig becomes
        {"attack_config": {...}}). `recipes.recipe_from_config` rebuilds the recipe.
        State set after construction (`configure_schedule`) is not included."""
        args, kwargs = getattr(self, "_constructor_arguments", ((), {}))
        bound = inspect.signature(type(self).__init__).bind(self, *args, **kwargs)
        arguments = {name: _json_argument(self.name, name, value)
                     for name, value in list(bound.arguments.items())[1:]}
        return {"name": self.name, "arguments": arguments}


def _json_argument(recipe, name, value):
    from efficientnet_advprop.attacks import AttackConfig

    if isinstance(value, AttackConfig):
        return {"attack_config": dataclasses.asdict(value)}
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)) and all(
            isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise TypeError(f"recipe {recipe}: argument {name}={value!r} cannot be saved in a "
                    "config (expected numbers, strings, lists of them or an AttackConfig)")


def recipe_argument(value):
    """A `get_config` argument value back as the constructor takes it."""
    from efficientnet_advprop.attacks import AttackConfig

    if isinstance(value, dict) and set(value) == {"attack_config"}:
        return AttackConfig(**value["attack_config"])
    return value
