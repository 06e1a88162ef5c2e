"""The robustness suite as an experiment step: `evaluate(config, info, options)`.

    from efficientnet_advprop import entry, robustness_experiment as robustness

    cfg, info = entry.resolve_run({"model_dir": "runs/b0-advprop",
                                   "mode": "eval_robustness"})
    result = robustness.evaluate(cfg, info, robustness.SuiteOptions(
        robustness_attacks=("pgd", "apgd-ce"), robustness_profile="quick"))

evaluates the checkpoint in `cfg.run.model_dir` (its EMA weights, in float32) or,
with `options.saved_model_dir`, an exported SavedModel (the one BN set it kept), writes
robustness.json/.md and the plots into `options.eval_dir` (default
<model_dir>/robustness or <saved_model_dir>_robustness) and returns the result dict.
main.py --mode=eval_robustness builds the options from its flags; the option names
are those flags' names, and an invalid option raises config.ConfigError naming it.

The quick profile (`robustness_profile="quick"`, or "auto" on a CPU-only machine or
the embedded data) replaces the options not in `options.set_fields` with
QUICK_PROFILE's and evaluates at most QUICK_MAX_IMAGES images unless the config set
num_eval_images; it says what it left out in one line.
"""

import dataclasses
import json
import os
import sys

from efficientnet_advprop.config import ConfigError

DEFAULT_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "mi-fgsm", "cw", "square", "autoattack")


def _stderr(message):
    print(message, file=sys.stderr)


def _option(default, help_text, kind=None, choices=None):
    """A SuiteOptions field whose metadata main.py defines its flag from."""
    return dataclasses.field(default=default, metadata={
        "help": help_text, "kind": kind or type(default).__name__, "choices": choices})


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    """What --mode=eval_robustness measures (main.py defines a flag per field, from
    the field's metadata).

    Lists are tuples; `corruptions=None` means every corruption. `set_fields` names
    the options chosen on purpose, which the quick profile leaves alone (None: those
    that differ from the defaults).
    """
    saved_model_dir: str = _option(None, "eval_robustness: evaluate this exported "
                                   "SavedModel instead of the checkpoint in --model_dir.",
                                   "str")
    eval_dir: str = _option(None, "eval_robustness: where robustness.json/.md and the PNG "
                            "plots go (default: <model_dir>/robustness, or "
                            "<saved_model_dir>_robustness).", "str")
    robustness_attacks: tuple = _option(
        DEFAULT_ATTACKS, "Attacks (pgd, pgd-targeted, apgd-ce, apgd-dlr, apgd-t, mi-fgsm, "
        "cw, square, autoattack; 'none' for none).", "list")
    apgd_iterations: int = _option(100, "APGD iterations (AutoAttack: 100).")
    square_queries: int = _option(400, "Square attack queries (NoFrost: 400).")
    autoattack_version: str = _option("fast", "fast: APGD-CE + APGD-DLR; standard: + "
                                      "APGD-T and Square (5000 queries).", "enum",
                                      ("fast", "standard"))
    curve_iterations: tuple = _option((10, 20, 50, 100, 200), "Accuracy-vs-iterations "
                                      "curve (one PGD run, running worst case); Xie & "
                                      "Yuille go to 2000; 'none' skips.", "list")
    curve_targeted: bool = _option(True, "Curve attack towards a random wrong class.")
    curve_epsilon: float = _option(None, "Curve radius (default: the eval epsilon; Xie & "
                                   "Yuille: 16).", "float")
    curve_step_size: float = _option(1.0, "Curve attack step (Xie & Yuille: 1).")
    mbn_modes: tuple = _option(("main", "aux", "logits", "layers", "random_layers"),
                               "MBN inference modes for models with auxiliary BNs "
                               "('none' skips).", "list")
    mbn_gammas: tuple = _option((0.0, 0.25, 0.5, 0.75, 1.0), "MBN interpolation weights "
                                "of the auxiliary set.", "list")
    mbn_layer_fraction: float = _option(0.5, "MBN random_layers: share of BN layers that "
                                        "mix.")
    robustness_properties: bool = _option(True, "Decision margin, boundary thickness, KL "
                                          "smoothness.")
    corruptions: tuple = _option(None, "Common corruptions generated on the fly ('all', "
                                 "'none' or names).", "list")
    corruption_severities: tuple = _option((1, 2, 3, 4, 5), "Corruption severities.",
                                           "list")
    mce_baseline: str = _option(None, "Normalise the mCE: 'alexnet' (ImageNet-C "
                                "constants) or the robustness.json of a baseline run.",
                                "str")
    shift_datasets: tuple = _option((), "Extra evaluation sets, NAME or NAME:PATH (PATH: "
                                    "a folder of class subfolders or a TFDS data dir): "
                                    "imagenet_a, imagenet_r (200-class logits), "
                                    "imagenet_sketch, stylized_imagenet, folder:PATH.",
                                    "list")
    robustness_profile: str = _option(
        "auto", "full: the papers' protocol (these flags' defaults); quick: PGD and "
        "APGD-CE-20, a 10/20/50 curve, 3 MBN modes, 5 corruptions at severity 3, no "
        "properties, at most 250 images, for flags you did not set (minutes on a CPU). "
        "auto: quick on a CPU or the embedded data.", "enum", ("auto", "quick", "full"))
    set_fields: frozenset = None

    def __post_init__(self):
        for name in ("robustness_profile", "autoattack_version"):
            choices = SuiteOptions.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(name, getattr(self, name),
                                  f"choose from {', '.join(choices)}")
        for name, field in SuiteOptions.__dataclass_fields__.items():
            if field.metadata.get("kind") == "list" and isinstance(getattr(self, name),
                                                                    list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.set_fields is None:
            defaults = SuiteOptions.__dataclass_fields__
            changed = {f for f in defaults if f != "set_fields"
                       and getattr(self, f) != defaults[f].default}
            object.__setattr__(self, "set_fields", frozenset(changed))


def check_names(options):
    """Raises ConfigError naming the option when an attack, MBN mode or corruption is
    unknown (`evaluate` checks this before it loads anything; the lists of names are
    TensorFlow's, so SuiteOptions itself does not)."""
    from efficientnet_advprop.data.corruptions import CORRUPTIONS
    from efficientnet_advprop.evaluation import ATTACK_NAMES, MBN_MODES

    for name, choices in (("robustness_attacks", ATTACK_NAMES), ("mbn_modes", MBN_MODES),
                          ("corruptions", CORRUPTIONS)):
        bad = [v for v in getattr(options, name) or () if v not in choices]
        if bad:
            raise ConfigError(name, getattr(options, name),
                              f"unknown value(s) {', '.join(map(str, bad))}; choose from "
                              f"{', '.join(choices)}")


# The quick profile's values of the options the user did not set.
QUICK_PROFILE = {
    "robustness_attacks": ("pgd", "apgd-ce"), "apgd_iterations": 20,
    "curve_iterations": (10, 20, 50), "mbn_modes": ("main", "aux", "logits"),
    "mbn_gammas": (0.0, 0.5, 1.0), "robustness_properties": False,
    "corruptions": ("gaussian_noise", "defocus_blur", "fog", "contrast",
                    "jpeg_compression"),  # one or two of each family
    "corruption_severities": (3,),
}
QUICK_MAX_IMAGES = 250


def profile_name(options, config, info):
    """quick or full: auto is quick on a CPU-only machine or the embedded data."""
    if options.robustness_profile != "auto":
        return options.robustness_profile
    import tensorflow as tf

    accelerated = (config.run.on_tpu or tf.config.list_logical_devices("GPU"))
    return "quick" if info.name == "embedded" or not accelerated else "full"


def with_profile(options, profile):
    """The options the suite runs with: the quick profile's values replace the
    options not in `set_fields`."""
    if profile != "quick":
        return options
    quick = {k: v for k, v in QUICK_PROFILE.items() if k not in options.set_fields}
    return dataclasses.replace(options, **quick)


def quick_profile_note(options, num_images, total):
    """What the quick profile left out, in one line."""
    def show(value):
        if value is None:
            return "all"
        if isinstance(value, tuple):
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return str(value)

    full = SuiteOptions.__dataclass_fields__
    left = [f"--{name} {show(value)} (full: {show(full[name].default)})"
            for name, value in QUICK_PROFILE.items() if name not in options.set_fields]
    if num_images < total:
        left.append(f"{num_images} of {total} held-out images")
    return ("quick robustness profile, --robustness_profile=full for the papers' "
            "protocol: " + "; ".join(left))


def suite_config(options, config, num_classes):
    """The evaluation.RobustnessConfig of the options (after `with_profile`)."""
    from efficientnet_advprop.data.corruptions import CORRUPTIONS
    from efficientnet_advprop.evaluation import RobustnessConfig

    check_names(options)
    baseline = options.mce_baseline
    if baseline and baseline != "alexnet":
        try:
            with open(baseline) as f:
                baseline = json.load(f)["corruptions"]["errors"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError("mce_baseline", options.mce_baseline,
                              f"not a robustness.json with corruption errors ({e})"
                              ) from None
    elif baseline == "alexnet" and num_classes != 1000:
        raise ConfigError("mce_baseline", baseline,
                          "the AlexNet constants are for 1000-class ImageNet-C; this model "
                          f"has {num_classes} classes")
    iterations = config.attack.eval_attack_iterations or 10
    try:
        return RobustnessConfig(
            epsilon=config.attack.eval_epsilon or config.attack.epsilon,
            attacks=tuple(options.robustness_attacks),
            pgd_iterations=iterations, apgd_iterations=options.apgd_iterations,
            mi_fgsm_iterations=iterations, cw_iterations=iterations,
            square_queries=options.square_queries,
            autoattack_version=options.autoattack_version,
            curve_iterations=tuple(options.curve_iterations),
            curve_targeted=options.curve_targeted, curve_epsilon=options.curve_epsilon,
            curve_step_size=options.curve_step_size, mbn_modes=tuple(options.mbn_modes),
            mbn_gammas=tuple(options.mbn_gammas),
            mbn_layer_fraction=options.mbn_layer_fraction,
            properties=options.robustness_properties,
            corruptions=(tuple(CORRUPTIONS) if options.corruptions is None
                         else tuple(options.corruptions)),
            severities=tuple(options.corruption_severities),
            mce_baseline=baseline, seed=config.run.seed)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("mode", "eval_robustness", str(e)) from None


def shift_datasets(options, config, image_size, augmentation, num_classes):
    """{spec: (dataset, logit indices or None)} of `options.shift_datasets`.

    A spec is NAME or NAME:PATH; PATH is a folder of class subfolders (WordNet IDs for
    the ImageNet variants) or a TFDS data directory. imagenet_a and imagenet_r keep
    their 200 classes' logits.
    """
    from efficientnet_advprop.evaluation import distribution_shift as shift

    out = {}
    batch = config.data.eval_batch_size
    for spec in options.shift_datasets or ():
        name, _, path = spec.partition(":")
        try:
            if name not in shift.SHIFT_DATASETS:
                raise ValueError(f"unknown dataset; choose from "
                                 f"{', '.join(shift.SHIFT_DATASETS)} (NAME or NAME:PATH)")
            subset = name in ("imagenet_a", "imagenet_r")
            if name != "folder" and num_classes != 1000:
                raise ValueError(f"an ImageNet variant needs a 1000-class model, this one "
                                 f"has {num_classes} classes")
            ds = shift.shift_dataset(name, path or None, batch_size=batch,
                                     image_size=image_size, augmentation=augmentation,
                                     subset=subset)
        except (ValueError, OSError) as e:
            raise ConfigError("shift_datasets", spec, str(e)) from None
        if config.data.num_eval_images:
            ds = ds.unbatch().take(config.data.num_eval_images).batch(batch)
        indices = {"imagenet_a": shift.imagenet_a_indices,
                   "imagenet_r": shift.imagenet_r_indices}.get(name)
        out[spec] = (ds, indices() if indices else None)
    return out


def run_suite(logits_fn, dataset, config, options, *, profile, num_classes, model,
              eval_dir, image_size, augmentation, metadata, num_images, log=_stderr):
    """The suite on one model: its report files, the summary line (stdout, JSON) and
    the result dict."""
    from efficientnet_advprop.evaluation import evaluate_robustness, write_report

    options = with_profile(options, profile)
    suite = suite_config(options, config, num_classes)
    shifts = shift_datasets(options, config, image_size, augmentation, num_classes)
    if profile == "quick":
        total = num_images
        if config.sources.get("num_eval_images") != "set":
            num_images = min(num_images, QUICK_MAX_IMAGES)
            dataset = dataset.unbatch().take(num_images).batch(config.data.eval_batch_size)
        log(quick_profile_note(options, num_images, total))
    log(f"robustness suite: eps {suite.epsilon:g}, attacks "
        f"{', '.join(suite.attacks) or 'none'}, curve {list(suite.curve_iterations)}, "
        f"{len(suite.corruptions)} corruptions x {len(suite.severities)} severities "
        f"-> {eval_dir}")
    result = evaluate_robustness(logits_fn, dataset, suite, num_classes=num_classes,
                                 model=model, shift_datasets=shifts, metadata=metadata,
                                 num_batches=-(-num_images // config.data.eval_batch_size))
    paths = write_report(result, eval_dir)
    log("wrote " + ", ".join(paths))
    summary = {k: result[k] for k in ("clean_accuracy", "worst_case_accuracy")
               if k in result}
    summary.update({k: v["accuracy"] for k, v in result.get("attacks", {}).items()})
    print(json.dumps(summary))
    return result


def evaluate(config, info=None, options=None, log=_stderr):
    """--mode=eval_robustness: the suite on the checkpoint of config.run.model_dir, or
    on options.saved_model_dir; returns the result dict."""
    from efficientnet_advprop import experiment

    options = options or SuiteOptions()
    check_names(options)
    if info is None:
        from efficientnet_advprop import data

        info = data.resolve_dataset(config.data.dataset, config.data.data_dir)
    profile = profile_name(options, config, info)
    if options.saved_model_dir:
        return _evaluate_saved_model(config, info, options, profile, log)
    job = experiment.prepare(config, info, log)
    if config.model.init_checkpoint:
        experiment.initialize(job, config.model.init_checkpoint, log)
    experiment.restore(job, log)
    return evaluate_checkpoint(job, options, profile, log)


def evaluate_checkpoint(job, options, profile, log=_stderr):
    """The suite on a prepared and restored experiment (EMA weights, float32)."""
    from efficientnet_advprop.attacks import float32_compute
    from efficientnet_advprop.evaluation import main_logits_fn

    cfg = job.config
    model_dir = cfg.run.model_dir
    with job.averaged(), float32_compute(job.trainer.model):  # attacks in float32
        return run_suite(
            main_logits_fn(job.trainer.model), job.eval_dataset(), cfg, options,
            profile=profile, num_classes=cfg.num_classes, model=job.trainer.model,
            eval_dir=options.eval_dir or os.path.join(model_dir, "robustness"),
            image_size=cfg.model.image_size, augmentation=cfg.data.augmentation,
            metadata={"name": cfg.model.model_name, "recipe": cfg.recipe.name,
                      "checkpoint": f"{model_dir} (step {int(job.trainer.step.numpy())}"
                                    f"{', EMA weights' if job.trainer.ema else ''})",
                      "dataset": job.info.name, "image_size": cfg.model.image_size},
            num_images=cfg.num_eval, log=log)


def _evaluate_saved_model(config, info, options, profile, log):
    """The suite on an exported SavedModel (the one BN set it kept, no MBN modes or BN
    statistics)."""
    import tensorflow as tf

    from efficientnet_advprop.experiment import eval_dataset
    from efficientnet_advprop.export import load_export_metadata

    path = options.saved_model_dir
    try:
        meta = load_export_metadata(path)
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError) as e:
        raise ConfigError("saved_model_dir", path, str(e)) from None
    image_size = int(meta["image_size"])
    num_classes = int(meta["num_classes"])
    if info.num_classes and info.num_classes != num_classes:
        raise ConfigError("saved_model_dir", path,
                          f"the model has {num_classes} classes, the dataset {info.name} "
                          f"has {info.num_classes}")
    augmentation = meta.get("jpeg_eval_crop", "inception")

    def logits_fn(x):
        return loaded.serving_default(x)["logits"]

    return run_suite(
        logits_fn, eval_dataset(config, info, image_size, augmentation), config, options,
        profile=profile, num_classes=num_classes, model=None,
        eval_dir=options.eval_dir or path.rstrip("/") + "_robustness",
        image_size=image_size, augmentation=augmentation, metadata={
            "name": meta.get("model_name", "saved model"), "recipe": meta.get("recipe"),
            "saved_model": path, "bn_set": meta.get("bn_set"), "dataset": info.name,
            "image_size": image_size}, num_images=config.num_eval, log=log)
