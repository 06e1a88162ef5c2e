"""One resolved experiment configuration.

An experiment is six frozen sections (model, data, optim, attack, recipe, run),
resolved once by `resolve` from five layers, applied in this order, each overriding
the ones before:

    1. defaults        the official EfficientNet main.py's values (`_defaults`)
    2. recipe          the recipe file's options and `paper` table, a citation per
                       value (`_recipe_layer`)
    3. dataset preset  DATASET_PRESETS: the small embedded set's settings; some
                       entries give way to a recipe's paper (`_preset_yields`)
                       (`_dataset_preset_layer`)
    4. overrides       what the user set: main.py's flags, a notebook's dict
                       (`_override_layer`)
    5. derived         what follows from the rest (`_derive`): the unset image size,
                       preprocessing and augmentation, the dataset's class count, a
                       preset batch raised to whole BN batches, the run's steps,
                       epochs and milestones after the recipe's budget calibration

Every value keeps where it came from (`ExperimentConfig.sources`), which `describe()`
prints.

Field names are main.py's flag names, so a field's error message turns into a flag
error by prefixing "--". Validation lives here: every problem raises ConfigError
naming the field. Nothing here reads flags, touches data files or writes anything.
"""

import dataclasses
import json
import math
import os

from efficientnet_advprop.attacks.pgd import ATTACKERS, AttackConfig
from efficientnet_advprop.models.initializers import CLASSIFIER_INITS
from efficientnet_advprop.models.nf_resnet import NUM_STAGE_GAINS
from efficientnet_advprop.models.registry import (default_image_size, is_normalizer_free,
                                                  model_names)
from efficientnet_advprop.recipes import RECIPES

OPTIMIZERS = ("rmsprop", "momentum", "sgd", "adam")
LR_SCHEDULES = ("exponential", "cosine", "step")
NORMALIZERS = ("split_batch_norm", "group_norm", "instance_norm", "none")
MODES = ("train", "eval", "train_and_eval", "eval_robustness")
# What --export_dir gets (experiment.export): the SavedModel, a float32 TFLite model
# (model.tflite), a dynamic-range quantised one (model_dynamic_range.tflite).
EXPORT_FORMATS = ("saved_model", "tflite", "tflite_dynamic")
CONFIG_FILE = "experiment_config.json"

# The dataset preset of the embedded CIFAR-10 subset, chosen by measurement
# (docs/embedded_default.md): efficientnet-b0 from scratch at 32 pixels in a few
# minutes on a CPU. The data-scale entries always apply.
# The optimisation entries (RECIPE_KEEPS) were tuned with the optimizer TUNED_FOR
# names: a recipe whose paper trains with another (the SGD recipes' 0.1 per 256, no
# EMA) keeps its own. AutoAugment is off (it halves a 2-core machine's throughput and
# costs accuracy in 4 epochs) except for a recipe that routes its images by source.
TUNED_FOR = "tuned_for_optimizer"
DATASET_PRESETS = {
    "embedded": {
        TUNED_FOR: "rmsprop",
        "image_size": 32,
        "augmentation": "cifar",
        "auto_augment": None,
        "classifier_init": "zeros",
        "train_batch_size": 64,
        "eval_batch_size": 250,
        "train_epochs": 4.0,
        "base_learning_rate": 0.004,
        "lr_warmup_epochs": 0.3,
        "lr_decay_epoch": 1.0,
        "lr_decay_factor": 0.8,
        "moving_average_decay": 0.999,
        "dropout_rate": 0.1,
        "survival_prob": 1.0,
    },
}
RECIPE_KEEPS = ("base_learning_rate", "lr_decay_epoch", "lr_decay_factor", "dropout_rate",
                "moving_average_decay")


def _preset_yields(name, preset, cls):
    """Whether a preset entry gives way to the recipe's: an optimisation entry its
    paper sets when it trains with another optimizer than the preset was tuned with;
    AutoAugment's absence to a recipe that needs the source tags AutoAugment makes."""
    if name == "auto_augment":
        return cls.needs_source_tags
    if name in RECIPE_KEEPS and name in cls.paper:
        optimizer = cls.paper.get("optimizer")
        optimizer = optimizer.value if optimizer else OptimConfig.optimizer
        return optimizer != preset.get(TUNED_FOR)
    return False


class ConfigError(ValueError):
    """A setting that cannot work: `field` names it, str() is the one-line reason."""

    def __init__(self, field, value, message):
        self.field, self.value, self.message = field, value, message
        super().__init__(f"{field}={_show(value)}: {message}")


def _show(value):
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        text = str(value)
        return text if len(text) <= 8 else f"{value:.6g}"
    return str(value)


def _check(section, rules):
    for name, ok, message in rules:
        if not ok:
            raise ConfigError(name, getattr(section, name), message)


def is_bn_resnet(model_name):
    """ResNets with normalisation layers (resnet-*, not nf-resnet-*)."""
    return str(model_name).startswith("resnet-")


def _none_or(value, test):
    return value is None or test(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_name: str = "efficientnet-b0"
    image_size: int = None  # None: the model's (resolved)
    width_multiplier: float = 1.0
    preprocessing: str = None  # None: the recipe's preferred, else imagenet (resolved)
    normalizer: str = "split_batch_norm"
    batch_norm_momentum: float = None  # None: the family's
    batch_norm_epsilon: float = None
    dropout_rate: float = None  # None: the model's
    survival_prob: float = None
    drop_path_rate: float = None
    zero_init_last_bn: bool = None  # None: off; BN ResNets only
    classifier_init: str = None  # None: the family's published initialiser ("official")
    nf_stage_gains: tuple = None  # None: the published NF-ResNet (a diagnostic otherwise)
    sync_batch_norm: bool = None  # None: on for TPU (official groups), off elsewhere
    sync_batch_norm_group_size: int = None
    init_checkpoint: str = None

    def __post_init__(self):
        if self.model_name not in model_names():
            raise ConfigError("model_name", self.model_name,
                              f"unknown model; choose from {', '.join(model_names())}")
        _check(self, [
            ("image_size", _none_or(self.image_size, lambda v: v >= 8), "must be >= 8"),
            ("width_multiplier", self.width_multiplier > 0, "must be > 0"),
            ("preprocessing", self.preprocessing in (None, "imagenet", "advprop", "none"),
             "choose from imagenet, advprop, none"),
            ("normalizer", self.normalizer in NORMALIZERS,
             f"choose from {', '.join(NORMALIZERS)}"),
            ("batch_norm_momentum", _none_or(self.batch_norm_momentum,
                                             lambda v: 0 <= v < 1), "must be in [0, 1)"),
            ("batch_norm_epsilon", _none_or(self.batch_norm_epsilon, lambda v: v > 0),
             "must be > 0"),
            ("dropout_rate", _none_or(self.dropout_rate, lambda v: 0 <= v < 1),
             "must be in [0, 1)"),
            ("survival_prob", _none_or(self.survival_prob, lambda v: 0 < v <= 1),
             "must be in (0, 1]"),
            ("drop_path_rate", _none_or(self.drop_path_rate, lambda v: 0 <= v < 1),
             "must be in [0, 1)"),
            ("sync_batch_norm_group_size", _none_or(self.sync_batch_norm_group_size,
                                                    lambda v: v >= 1), "must be >= 1"),
            ("classifier_init", self.classifier_init in (None,) + CLASSIFIER_INITS,
             f"choose from {', '.join(CLASSIFIER_INITS)}"),
        ])
        if self.width_multiplier != 1.0 and self.model_name.startswith("efficientnet"):
            raise ConfigError("width_multiplier", self.width_multiplier,
                              f"applies to ResNets and NF-ResNets, not {self.model_name}")
        if self.nf_stage_gains is not None:
            try:
                gains = tuple(float(g) for g in self.nf_stage_gains)
            except (TypeError, ValueError):
                gains = ()
            if len(gains) != NUM_STAGE_GAINS or min(gains) <= 0:
                raise ConfigError("nf_stage_gains", self.nf_stage_gains,
                                  f"expected {NUM_STAGE_GAINS} positive numbers (stem, "
                                  "stages 1-4)")
            if not self.normalizer_free:
                raise ConfigError("nf_stage_gains", self.nf_stage_gains,
                                  f"applies to NF-ResNets, not {self.model_name}")
            object.__setattr__(self, "nf_stage_gains", gains)
        if self.zero_init_last_bn and not is_bn_resnet(self.model_name):
            raise ConfigError("zero_init_last_bn", self.zero_init_last_bn,
                              f"applies to the BN ResNets, not {self.model_name}")
        if self.sync_batch_norm_group_size is not None:
            if self.sync_batch_norm is False:
                raise ConfigError("sync_batch_norm_group_size",
                                  self.sync_batch_norm_group_size,
                                  "needs sync_batch_norm")
            if self.normalizer != "split_batch_norm":
                raise ConfigError("sync_batch_norm_group_size",
                                  self.sync_batch_norm_group_size,
                                  "applies to normalizer=split_batch_norm only")

    @property
    def normalizer_free(self):
        return is_normalizer_free(self.model_name)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = None
    data_dir: str = None
    num_label_classes: int = None  # None: the dataset's (resolved)
    num_train_images: int = None
    num_eval_images: int = None
    holdout_shards: int = None
    skip_bad_records: bool = False
    train_batch_size: int = 2048
    eval_batch_size: int = 1024
    augmentation: str = None  # None: cifar below 64 px, inception above (resolved)
    auto_augment: str = None
    auto_augment_fraction: float = None  # None: 1 (resolved)
    randaugment_layers: int = 2
    randaugment_magnitude: float = 10.0

    def __post_init__(self):
        _check(self, [
            ("num_label_classes", _none_or(self.num_label_classes, lambda v: v >= 2),
             "must be >= 2 (leave it unset for the dataset's)"),
            ("num_train_images", _none_or(self.num_train_images, lambda v: v >= 1),
             "must be >= 1"),
            ("num_eval_images", _none_or(self.num_eval_images, lambda v: v >= 1),
             "must be >= 1"),
            ("train_batch_size", self.train_batch_size > 0, "must be > 0"),
            ("eval_batch_size", self.eval_batch_size > 0, "must be > 0"),
            ("augmentation", self.augmentation in (None, "inception", "cifar", "none"),
             "choose from inception, cifar, none"),
            ("auto_augment", self.auto_augment in (None, "v0", "randaugment"),
             "choose from v0, randaugment"),
            ("auto_augment_fraction", _none_or(self.auto_augment_fraction,
                                               lambda v: 0 <= v <= 1), "must be in [0, 1]"),
            ("randaugment_layers", self.randaugment_layers >= 0, "must be >= 0"),
            ("randaugment_magnitude", self.randaugment_magnitude >= 0, "must be >= 0"),
        ])


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    train_steps: int = 218949  # official: 350 epochs of ImageNet at batch 2048
    train_epochs: float = None  # set: wins over train_steps (resolved into it)
    steps_per_epoch: int = None  # resolved
    base_learning_rate: float = 0.016  # per 256 images
    lr_schedule: str = "exponential"
    lr_milestones: tuple = None  # epochs of the run (resolved from fractions)
    lr_decay_epoch: float = 2.4
    lr_decay_factor: float = 0.97
    lr_warmup_epochs: float = 5.0
    lr_warmup_start: str = "zero"  # or "base": ramp from the unscaled base rate
    optimizer: str = "rmsprop"
    momentum: float = 0.9
    nesterov: bool = False
    rmsprop_decay: float = 0.9
    rmsprop_epsilon: float = 1e-3
    moving_average_decay: float = 0.9999
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    agc_clip: float = 0.0

    def __post_init__(self):
        _check(self, [
            ("train_steps", self.train_steps > 0, "must be > 0"),
            ("train_epochs", _none_or(self.train_epochs, lambda v: v > 0), "must be > 0"),
            ("base_learning_rate", self.base_learning_rate > 0, "must be > 0"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES,
             f"choose from {', '.join(LR_SCHEDULES)}"),
            ("lr_decay_epoch", self.lr_decay_epoch > 0, "must be > 0"),
            ("lr_decay_factor", 0 < self.lr_decay_factor <= 1, "must be in (0, 1]"),
            ("lr_warmup_epochs", self.lr_warmup_epochs >= 0, "must be >= 0"),
            ("lr_warmup_start", self.lr_warmup_start in ("zero", "base"),
             "choose from zero, base"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"choose from {', '.join(OPTIMIZERS)}"),
            ("moving_average_decay", 0 <= self.moving_average_decay < 1,
             "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("agc_clip", self.agc_clip >= 0, "must be >= 0"),
        ])
        if self.lr_milestones is not None:
            values = list(self.lr_milestones)
            if not values or values != sorted(values) or values[0] <= 0:
                raise ConfigError("lr_milestones", self.lr_milestones,
                                  "expected increasing positive epochs, e.g. 30,60,90")


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """The training attack (made into an AttackConfig) and the evaluation PGD."""

    attacker: str = "pgd"
    epsilon: float = 1.0
    attack_iterations: int = None  # None: AdvProp's eps + 1 (1 for eps 1)
    attack_step_size: float = 1.0
    attack_bn_mode: str = "inference"
    targeted_attack: bool = False
    clean_start_prob: float = 0.0
    eval_epsilon: float = None  # None: epsilon
    eval_attack_iterations: int = 10

    def __post_init__(self):
        _check(self, [
            ("attacker", self.attacker in ATTACKERS, f"choose from {', '.join(ATTACKERS)}"),
            ("epsilon", self.epsilon > 0, "must be > 0 (0..255 pixel units)"),
            ("attack_iterations", _none_or(self.attack_iterations, lambda v: v >= 1),
             "must be >= 1"),
            ("attack_step_size", self.attack_step_size > 0, "must be > 0"),
            ("attack_bn_mode", self.attack_bn_mode in ("inference", "batch"),
             "choose from inference, batch"),
            ("clean_start_prob", 0 <= self.clean_start_prob <= 1, "must be in [0, 1]"),
            ("eval_epsilon", _none_or(self.eval_epsilon, lambda v: v > 0), "must be > 0"),
            ("eval_attack_iterations", self.eval_attack_iterations >= 0, "must be >= 0"),
        ])

    def training_attack(self):
        return AttackConfig(attacker=self.attacker, epsilon=self.epsilon,
                            step_size=self.attack_step_size, num_iter=self.attack_iterations,
                            targeted=self.targeted_attack, bn_mode=self.attack_bn_mode,
                            clean_start_prob=self.clean_start_prob)


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    name: str = "vanilla"
    options: tuple = ()  # ((option name, value), ...) of the recipe's declared options

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ConfigError("recipe", self.name,
                              f"unknown recipe; choose from {', '.join(RECIPES)}")
        cls = RECIPES[self.name]
        declared = {o.name: o for o in cls.options}
        for key, value in self.options:
            if key not in declared:
                raise ConfigError(key, value, f"is not an option of recipe {self.name}")
            problem = declared[key].check(value)
            if problem:
                raise ConfigError(key, value, problem)

    @property
    def values(self):
        return dict(self.options)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    mode: str = "train_and_eval"
    model_dir: str = None  # None: runs/<model_name>-<recipe> (resolved)
    export_dir: str = None
    export_bn_set: str = "main"
    export_format: tuple = ("saved_model",)
    seed: int = 0
    deterministic: bool = False
    min_bn_batch: int = 16
    strategy: str = "auto"
    use_tpu: bool = False
    tpu: str = None
    tpu_zone: str = None
    gcp_project: str = None
    jit_compile: bool = None  # None: on for TPU and GPU, off on a CPU
    iterations_per_loop: int = 1
    precision: str = "float32"
    checkpoint_every_steps: int = None  # None: one epoch
    keep_checkpoints: int = 5
    summary_every_steps: int = 100

    def __post_init__(self):
        formats = self.export_format
        if isinstance(formats, str):  # "tflite" or "saved_model,tflite"
            formats = [f.strip() for f in formats.split(",") if f.strip()]
        object.__setattr__(self, "export_format", tuple(formats))
        _check(self, [
            ("mode", self.mode in MODES, f"choose from {', '.join(MODES)}"),
            ("export_bn_set", self.export_bn_set in ("main", "adversarial"),
             "choose from main, adversarial"),
            ("export_format", bool(self.export_format) and all(
                f in EXPORT_FORMATS for f in self.export_format)
             and len(set(self.export_format)) == len(self.export_format),
             f"choose one or more of {', '.join(EXPORT_FORMATS)}, each once"),
            ("min_bn_batch", self.min_bn_batch >= 1, "must be >= 1"),
            ("iterations_per_loop", self.iterations_per_loop >= 1, "must be >= 1"),
            ("precision", self.precision in ("float32", "bfloat16", "float16"),
             "choose from float32, bfloat16, float16"),
            ("checkpoint_every_steps", _none_or(self.checkpoint_every_steps,
                                                lambda v: v > 0), "must be > 0"),
            ("keep_checkpoints", self.keep_checkpoints > 0, "must be > 0"),
            ("summary_every_steps", self.summary_every_steps > 0, "must be > 0"),
        ])
        if self.on_tpu and self.precision == "float16":
            raise ConfigError("precision", self.precision, "is for GPUs; a TPU computes in "
                              "bfloat16 (precision=bfloat16)")

    @property
    def on_tpu(self):
        return bool(self.use_tpu or self.tpu or self.strategy == "tpu")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
            "attack": AttackSettings, "run": RunConfig}
FIELD_SECTION = {f.name: section for section, cls in SECTIONS.items()
                 for f in dataclasses.fields(cls)}


def recipe_option_names():
    """{option name: [recipes that declare it]} over all recipes."""
    out = {}
    for name, cls in RECIPES.items():
        for option in cls.options:
            out.setdefault(option.name, []).append(name)
    return out


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    attack: AttackSettings
    recipe: RecipeSettings
    run: RunConfig
    num_classes: int
    num_train: int
    num_eval: int
    dataset_name: str
    sources: dict = dataclasses.field(default_factory=dict, compare=False)

    # ------------------------------------------------------------- derived views
    @property
    def recipe_name(self):
        return self.recipe.name

    def value(self, name):
        """A field's value by its (flag) name."""
        if name == "recipe":
            return self.recipe.name
        section = FIELD_SECTION.get(name)
        if section is None:
            return self.recipe.values[name]
        return getattr(getattr(self, section), name)

    def make_recipe(self):
        """The recipe object, built from its options and the training attack."""
        recipe = _build_recipe(self.recipe.name, self.recipe, self.attack, self.optim,
                               self.num_classes)
        recipe.configure_schedule(self.optim.train_steps, self.optim.steps_per_epoch)
        return recipe

    def to_dict(self):
        out = {"recipe": self.recipe.name}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        out.update(self.recipe.values)
        out.update(num_classes=self.num_classes, num_train=self.num_train,
                   num_eval=self.num_eval, dataset_name=self.dataset_name)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def describe(self, flag_prefix="--"):
        """The resolved config, a line per value with where it came from."""
        lines = [f"# experiment config: {self.recipe.name} ({RECIPES[self.recipe.name].title})",
                 f"# dataset {self.dataset_name}: {self.num_train} train / {self.num_eval} "
                 f"held-out images, {self.num_classes} classes"]
        values = self.to_dict()
        sections = [("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
                    ("attack", AttackSettings), ("run", RunConfig)]
        for title, cls in sections:
            lines.append(f"[{title}]")
            for f in dataclasses.fields(cls):
                lines.append(self._line(flag_prefix, f.name, values[f.name]))
        lines.append(f"[recipe {self.recipe.name}]")
        for key, value in self.recipe.options:
            lines.append(self._line(flag_prefix, key, value))
        recipe = self.make_recipe()
        lines.append(f"# step: {recipe.describe()}")
        return "\n".join(lines)

    def _line(self, prefix, name, value):
        shown = ("none" if name in _NONE_IS_OFF else "auto") if value is None else _show(value)
        return f"{prefix}{name}={shown}  # {self.sources.get(name, 'default')}"

    def save(self, model_dir):
        """Writes the resolved config (and sources) into `model_dir` as JSON."""
        _makedirs(model_dir)
        with _open(f"{model_dir.rstrip('/')}/{CONFIG_FILE}", "w") as f:
            json.dump({"config": self.to_dict(), "sources": self.sources}, f, indent=2)


# Settings whose unset value means "none" rather than "chosen automatically".
_NONE_IS_OFF = {"init_checkpoint", "export_dir", "data_dir", "tpu", "tpu_zone",
                "gcp_project", "holdout_shards", "auto_augment", "zero_init_last_bn",
                "nf_stage_gains"}


def _remote(path):
    return "://" in str(path)  # gs://..., read and written through tf.io.gfile


def _makedirs(path):
    if _remote(path):
        import tensorflow as tf

        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def _open(path, mode="r"):
    if _remote(path):
        import tensorflow as tf

        return tf.io.gfile.GFile(path, mode)
    return open(path, mode)


def _exists(path):
    if _remote(path):
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def load_saved_config(model_dir):
    """The {field: value} a run saved in `model_dir`, or None."""
    path = f"{str(model_dir).rstrip('/')}/{CONFIG_FILE}"
    if not _exists(path):
        return None
    with _open(path) as f:
        return json.load(f)["config"]


# Settings that define what a model directory holds: an evaluation or export of the
# directory reuses the saved values, and an override that contradicts one is refused.
RUN_IDENTITY = ("recipe", "model_name", "image_size", "width_multiplier", "preprocessing",
                "normalizer", "num_label_classes", "batch_norm_momentum",
                "batch_norm_epsilon", "dropout_rate", "survival_prob", "drop_path_rate",
                "moving_average_decay", "optimizer", "precision", "augmentation",
                "nf_stage_gains")


def reuse_saved(overrides, saved, identity=RUN_IDENTITY):
    """The overrides completed with a saved run's identity settings.

    Raises ConfigError naming the first override that contradicts the saved run.
    """
    out = dict(overrides)
    for name in identity:
        if name not in saved:
            continue
        value = saved[name]
        if name == "num_label_classes":
            value = saved.get("num_classes", value)
        if name in out and out[name] is not None and _same(out[name], value) is False:
            raise ConfigError(name, out[name], f"contradicts the run in model_dir, which "
                                               f"was trained with {name}={_show(value)}")
        out[name] = value
    return out


def resolve_with_saved_run(overrides, dataset_info):
    """`resolve` for a run in a model directory that may hold one already: the saved
    run's identity settings (RUN_IDENTITY) complete the overrides, an override that
    contradicts one raises ConfigError, and each reused value's source names the
    directory (what main.py does: an eval or a resumed run needs no repeated flags)."""
    overrides = dict(overrides)
    recipe_name = overrides.get("recipe") or "vanilla"
    paper_model = getattr(RECIPES.get(recipe_name), "paper", {}).get("model_name")
    model_name = overrides.get("model_name") or (paper_model.value if paper_model
                                                 else ModelConfig.model_name)
    model_dir = overrides.get("model_dir") or os.path.join(
        "runs", f"{model_name}-{recipe_name}")
    saved, reused = None, ()
    if "://" in str(model_dir) or os.path.isdir(model_dir):
        saved = load_saved_config(model_dir)
    if saved is not None:
        completed = reuse_saved(overrides, saved)
        reused = [k for k in completed if k not in overrides]
        overrides = completed
    config = resolve(overrides, dataset_info)
    for name in reused:
        config.sources[name] = f"saved run ({model_dir})"
    return config


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def resolve(overrides=None, dataset_info=None):
    """The ExperimentConfig of `overrides` ({field name: value}, e.g. main.py's set
    flags; "recipe" names the recipe) on the dataset `dataset_info` (a
    data.DatasetInfo; None: the dataset the overrides name is resolved).

    The layers, in the order they apply (module docstring): `_defaults`,
    `_recipe_layer`, `_dataset_preset_layer`, `_override_layer`, then `_derive`.
    Raises ConfigError naming the field on any invalid or inconsistent value.
    """
    overrides = dict(overrides or {})
    recipe_name = overrides.pop("recipe", None) or "vanilla"
    if recipe_name not in RECIPES:
        raise ConfigError("recipe", recipe_name,
                          f"unknown recipe; choose from {', '.join(RECIPES)}")
    cls = RECIPES[recipe_name]
    all_options = recipe_option_names()
    for key in overrides:
        if key not in FIELD_SECTION and key not in all_options:
            raise ConfigError(key, overrides[key], "unknown setting")
    if dataset_info is None:
        from efficientnet_advprop import data

        dataset_info = data.resolve_dataset(overrides.get("dataset"),
                                            overrides.get("data_dir"))
    steps_set = "train_steps" in overrides
    values, sources = _defaults()
    relative_milestones = _recipe_layer(values, sources, cls, steps_set)
    _dataset_preset_layer(values, sources, cls, dataset_info, steps_set)
    _override_layer(values, sources, cls, overrides, all_options)
    return _derive(values, sources, cls, dataset_info, relative_milestones)


def _defaults():
    """Layer 1: every field's default (the official EfficientNet main.py's flags)."""
    values, sources = {}, {}
    for section in SECTIONS.values():
        for f in dataclasses.fields(section):
            values[f.name] = f.default
            sources[f.name] = "default"
    return values, sources


def _recipe_layer(values, sources, cls, steps_set):
    """Layer 2: the recipe's options and its `paper` table. An explicit train_steps
    keeps the paper's epochs out. Returns the paper's lr_milestones as (fractions of
    the run, source), which `_derive` scales once the run's length is known."""
    relative_milestones = None
    for option in cls.options:
        values[option.name] = option.value
        sources[option.name] = f"recipe {cls.name}: {option.source}"
    for name, cite in cls.paper.items():
        if name == "train_epochs" and steps_set:
            continue  # an explicit step count wins over the paper's epochs
        if name == "lr_milestones":
            relative_milestones = (cite.value, f"recipe {cls.name}: {cite.source}")
            continue
        values[name] = cite.value
        sources[name] = f"recipe {cls.name}: {cite.source}"
    return relative_milestones


def _dataset_preset_layer(values, sources, cls, dataset_info, steps_set):
    """Layer 3: the dataset's preset (DATASET_PRESETS), with `_preset_yields`."""
    preset = DATASET_PRESETS.get(dataset_info.name, {})
    for name, value in preset.items():
        if name == TUNED_FOR or (name == "train_epochs" and steps_set):
            continue
        if _preset_yields(name, preset, cls):
            continue
        values[name] = value
        sources[name] = f"{dataset_info.name} dataset preset"


def _override_layer(values, sources, cls, overrides, all_options):
    """Layer 4: what the user set (a recipe option must be the recipe's own)."""
    option_names = {o.name for o in cls.options}
    for name, value in overrides.items():
        if name in all_options and name not in option_names:
            raise ConfigError(name, value, f"is not an option of recipe {cls.name} "
                                           f"(it is {', '.join(all_options[name])}'s)")
        values[name] = value
        sources[name] = "set"


def _derive(values, sources, cls, dataset_info, relative_milestones):
    """Layer 5: the values that follow from the others, the sections and the recipe
    built and checked, the preset's batch raised to whole BN batches, and the run's
    length in steps (budget calibration, milestones)."""
    recipe_name = cls.name
    _derive_fields(values, sources, cls, dataset_info)
    sections, recipe_settings = _sections(values, cls)
    model_cfg, data_cfg, optim = sections["model"], sections["data"], sections["optim"]
    num_classes = values["num_label_classes"] or dataset_info.num_classes
    num_train = values["num_train_images"] or dataset_info.num_train
    num_eval = min(values["num_eval_images"] or dataset_info.num_eval, dataset_info.num_eval)
    if num_classes < 2:
        raise ConfigError("num_label_classes", values["num_label_classes"],
                          "must be >= 2 (leave it unset for the dataset's)")
    # The recipe with its options (its own checks name its options).
    recipe = _build_recipe(recipe_name, recipe_settings, sections["attack"], optim,
                           num_classes)
    _check_recipe_fits(recipe, model_cfg, data_cfg)
    data_cfg = _raise_preset_batch(recipe, model_cfg, data_cfg, sections["run"], sources)
    optim = _run_length(recipe, optim, data_cfg.train_batch_size, num_train, sources,
                        relative_milestones)
    config = ExperimentConfig(model=model_cfg, data=data_cfg, optim=optim,
                              attack=sections["attack"], recipe=recipe_settings,
                              run=sections["run"], num_classes=num_classes,
                              num_train=num_train, num_eval=num_eval,
                              dataset_name=dataset_info.name, sources=sources)
    check_bn_batches(config, num_replicas=1)
    return config


def _derive_fields(values, sources, cls, dataset_info):
    """The unset values that follow from the model, the recipe and the dataset."""
    recipe_name = cls.name

    def derive(name, value, why):
        if values.get(name) is None:
            values[name] = value
            sources[name] = f"derived: {why}"

    model = values["model_name"]
    if model not in model_names():
        raise ConfigError("model_name", model,
                          f"unknown model; choose from {', '.join(model_names())}")
    if cls.normalizer_free_only and not is_normalizer_free(model):
        raise ConfigError("model_name", model,
                          f"has batch norm, and recipe {recipe_name} trains a normalizer-free "
                          "network (choose an nf-resnet-*, or recipe bn_sat for SAT of a "
                          "BN network)")
    if (values["zero_init_last_bn"] and sources["zero_init_last_bn"] != "set"
            and not is_bn_resnet(model)):
        values["zero_init_last_bn"] = None  # a recipe's value for the BN ResNets only
        sources["zero_init_last_bn"] += f" (not applicable to {model})"
    derive("image_size", default_image_size(model), "the model's resolution")
    derive("preprocessing", cls.preferred_preprocessing or "imagenet",
           f"{recipe_name}'s preferred" if cls.preferred_preprocessing
           else "ImageNet mean/std")
    derive("augmentation", "cifar" if values["image_size"] <= 64 else "inception",
           "cifar crop at <= 64 px, inception crop above")
    derive("auto_augment_fraction", 1.0, "every training image")
    if values["model_dir"] is None:
        values["model_dir"] = f"runs/{model}-{recipe_name}"
        sources["model_dir"] = "derived: runs/<model_name>-<recipe>"
    if (dataset_info.name == "embedded" and values["export_dir"] is None
            and values["mode"] in ("train", "train_and_eval")):
        values["export_dir"] = f"{str(values['model_dir']).rstrip('/')}/export"
        sources["export_dir"] = ("derived: a run on the embedded set exports to "
                                 "<model_dir>/export (replaced by the next run there)")


def _sections(values, cls):
    """The six frozen sections of `values` (their own checks raise ConfigError)."""
    sections = {}
    try:
        for section, section_cls in SECTIONS.items():
            kwargs = {f.name: values[f.name] for f in dataclasses.fields(section_cls)}
            kwargs.pop("steps_per_epoch", None)
            if section == "optim" and kwargs["lr_milestones"] is not None:
                kwargs["lr_milestones"] = tuple(float(m) for m in kwargs["lr_milestones"])
            sections[section] = section_cls(**kwargs)
        recipe_settings = RecipeSettings(cls.name, tuple(
            (o.name, values[o.name]) for o in cls.options))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("config", "", str(e)) from None
    return sections, recipe_settings


def _check_recipe_fits(recipe, model_cfg, data_cfg):
    """A recipe's needs the model and input must meet."""
    if recipe.needs_source_tags and not data_cfg.auto_augment:
        raise ConfigError("auto_augment", data_cfg.auto_augment,
                          f"recipe {recipe.name} routes AutoAugment images to their own "
                          "BN set: set auto_augment=v0 or randaugment")
    if recipe.num_aux:
        if model_cfg.normalizer_free:
            raise ConfigError("recipe", recipe.name,
                              f"routes batch norms, and model_name={model_cfg.model_name} "
                              "has none (normalizer-free)")
        if model_cfg.normalizer != "split_batch_norm":
            raise ConfigError("normalizer", model_cfg.normalizer,
                              f"recipe {recipe.name} routes auxiliary batch norms, which "
                              f"normalizer={model_cfg.normalizer} does not have")


def _raise_preset_batch(recipe, model_cfg, data_cfg, run, sources):
    """A preset's batch grows to the recipe's smallest that keeps BN batches whole
    (Fast AdvProp's 64-image embedded batch would leave 13 adversarial images)."""
    batch = data_cfg.train_batch_size
    if (sources.get("train_batch_size", "").endswith("dataset preset")
            and not model_cfg.normalizer_free and model_cfg.normalizer == "split_batch_norm"):
        good = recipe.smallest_local_batch(run.min_bn_batch, 1, start=batch)
        if good and good != batch:
            sources["train_batch_size"] += (f" ({batch}), raised to {recipe.name}'s smallest "
                                            f"batch with BN batches >= {run.min_bn_batch}")
            data_cfg = dataclasses.replace(data_cfg, train_batch_size=good)
    return data_cfg


def _run_length(recipe, optim, batch, num_train, sources, relative_milestones):
    """The run's length: epochs (calibrated by the recipe's budget) -> steps, and the
    learning-rate milestones in epochs of this run."""
    steps_per_epoch = max(1, num_train // batch)
    calibrate = recipe.calibrates_budget
    budget = recipe.budget_factor if calibrate else 1.0
    epochs = optim.train_epochs
    train_steps = (int(math.ceil(epochs / budget * steps_per_epoch)) if epochs
                   else optim.train_steps)
    run_epochs = train_steps / steps_per_epoch
    if optim.lr_milestones is not None:
        milestones = tuple(m / budget for m in optim.lr_milestones)
        milestone_source = sources["lr_milestones"]
    elif relative_milestones:
        milestones = tuple(f * run_epochs for f in relative_milestones[0])
        milestone_source = relative_milestones[1] + " (fractions of the run)"
    else:
        milestones, milestone_source = None, sources.get("lr_milestones", "default")
    if calibrate and budget != 1.0:
        milestone_source += f"; / {budget:.2f} (budget calibration)"
        if epochs:
            sources["train_steps"] = (f"derived: {epochs:g} epochs / {budget:.2f} (budget "
                                      f"calibration) x {steps_per_epoch} steps")
    elif epochs:
        sources["train_steps"] = f"derived: {epochs:g} epochs x {steps_per_epoch} steps"
    if optim.lr_schedule == "step" and not milestones:
        raise ConfigError("lr_schedule", "step", "needs lr_milestones (epochs)")
    sources["lr_milestones"] = milestone_source
    sources["steps_per_epoch"] = f"derived: {num_train} images // batch {batch}"
    return dataclasses.replace(optim, train_steps=train_steps,
                               steps_per_epoch=steps_per_epoch, lr_milestones=milestones)


def _build_recipe(recipe_name, settings, attack, optim, num_classes):
    cls = RECIPES[recipe_name]
    try:
        training_attack = attack.training_attack() if cls.adversarial else None
    except ValueError as e:
        raise ConfigError("attacker", attack.attacker, str(e)) from None
    try:
        return cls.from_options(num_classes, attack=training_attack,
                                label_smoothing=optim.label_smoothing, **settings.values)
    except ValueError as e:
        raise ConfigError("recipe", recipe_name, str(e)) from None


def check_bn_batches(config, num_replicas=1):
    """Refuses a run in which a BN layer would normalise fewer than min_bn_batch
    images at once; the error names train_batch_size and the value that works."""
    if config.model.normalizer_free or config.model.normalizer != "split_batch_norm":
        return
    recipe = config.make_recipe()
    batch = config.data.train_batch_size
    if batch % num_replicas:
        raise ConfigError("train_batch_size", batch,
                          f"is not divisible by the {num_replicas} replicas")
    local = batch // num_replicas
    minimum = config.run.min_bn_batch
    try:
        sizes = recipe.bn_batches(local, num_replicas)
    except ValueError as e:
        sizes, problem = None, str(e)
    if sizes is not None:
        what, smallest = min(sizes.items(), key=lambda kv: kv[1])
        if smallest >= minimum:
            return
        problem = (f"gives BN batches of {smallest} images ({what}) per replica, below "
                   f"min_bn_batch={minimum}")
    good = recipe.smallest_local_batch(minimum, num_replicas, start=local)
    fix = (f"; use train_batch_size={good * num_replicas}" if good else "")
    raise ConfigError("train_batch_size", batch,
                      f"{problem}{fix} (or lower min_bn_batch={minimum} on purpose)")
