"""Train, evaluate and export EfficientNets with AdvProp and its baselines.

    python main.py --advprop --model=efficientnet-b0                 # embedded CIFAR-10
    python main.py --advprop --model=efficientnet-b7 --data_dir=gs://.../imagenet \
        --model_dir=gs://.../b7-advprop --tpu=local --epsilon=4
    python main.py --recipe=fast_advprop --print_config              # what would run

Flag names and defaults follow the official EfficientNet main.py where the concept
exists. This file only defines the flags and translates them; the run itself is
efficientnet_advprop/entry.py's. The settings resolve in layers, each overriding the
ones before: the defaults < the recipe's paper values (recipes/<recipe>.py) < the
dataset preset < the flags you set; then the values that follow from them
(efficientnet_advprop/config.py, `resolve`, has the detail). Without --data_dir and
--dataset the run uses the small CIFAR-10 set shipped in the package.
"""

import dataclasses
import re
import sys

from absl import app, flags

from efficientnet_advprop.recipes import RECIPES  # imports TensorFlow quietly

FLAGS = flags.FLAGS
RECIPE_NAMES = tuple(RECIPES)

# ---------------------------------------------------------------- model and data
flags.DEFINE_string("model_name", "efficientnet-b0", "Model: efficientnet-b0 .. b8, -l2, "
                    "resnet-18 .. resnet-638, nf-resnet-26/50/101 (-cifar: small stem).")
flags.DEFINE_alias("model", "model_name")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval",
                                              "eval_robustness"], "What to do.")
flags.DEFINE_string("data_dir", None, "ImageNet TFRecord layout (train-*/validation-*), "
                    "image folder (train/<class>/) or TFDS data dir (--dataset=tfds:NAME); "
                    "unset: the embedded CIFAR-10 set.")
flags.DEFINE_string("dataset", None, "imagenet | tfds:NAME | folder | embedded "
                    "(default: inferred from --data_dir).")
flags.DEFINE_string("model_dir", None, "Checkpoints and TensorBoard logs "
                    "(default: runs/<model_name>-<recipe>). Resumes automatically.")
flags.DEFINE_string("export_dir", None, "Export here (main BNs, EMA weights, preprocessing "
                    "inside); embedded set default: <model_dir>/export.")
flags.DEFINE_list("export_format", ["saved_model"], "saved_model, tflite (model.tflite, "
                  "float32), tflite_dynamic (model_dynamic_range.tflite, int8 weights).")
flags.DEFINE_enum("export_bn_set", "main", ["main", "adversarial"], "BN set the export "
                  "keeps (adversarial: the recipe's, e.g. MBN-adv of mbn_at).")
flags.DEFINE_integer("image_size", None, "Input resolution (default: the model's).")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet / NF-ResNet: scale every stage width "
                   "(small experiments; 1 = the published network).")
flags.DEFINE_enum("preprocessing", None, ["imagenet", "advprop", "none"], "Normalisation "
                  "inside the model (default: [-1, 1] for advprop, else ImageNet's).")
flags.DEFINE_string("init_checkpoint", None, "Start a new run from a .keras file or an "
                    "official TF1 checkpoint (a differing classifier is skipped; "
                    "ignored once --model_dir has a checkpoint).")
flags.DEFINE_enum("classifier_init", None, ["official", "zeros"], "Classifier "
                  "initialiser: the family's published one, or zeros (embedded preset).")
flags.DEFINE_enum("augmentation", None, ["inception", "cifar", "none"],
                  "Training crop: inception (official) or cifar (pad-4 random crop).")
flags.DEFINE_enum("auto_augment", None, ["v0", "randaugment", "none"], "AutoAugment "
                  "policy v0 or RandAugment after the crop (default: the recipe's paper, "
                  "e.g. v0 for advprop; none: off).")
flags.DEFINE_integer("randaugment_layers", 2, "RandAugment: ops per image.")
flags.DEFINE_float("randaugment_magnitude", 10.0, "RandAugment magnitude (official 0..10; "
                   "B7/B8 use 28).")
flags.DEFINE_float("auto_augment_fraction", None, "Share of training images augmented "
                   "(default 1; fine_grained_advprop: 0.5).")
flags.DEFINE_integer("num_label_classes", None, "Classes (default: the dataset's).")
flags.DEFINE_integer("num_train_images", None, "Training images (default: the dataset's).")
flags.DEFINE_integer("num_eval_images", None, "Held-out images to evaluate (default: all).")
flags.DEFINE_integer("holdout_shards", None, "TFRecord data: evaluate on the first N "
                     "train-* files, train on the rest.")
flags.DEFINE_bool("skip_bad_records", False, "Drop undecodable training images and "
                  "corrupt records instead of stopping (counted in the results' "
                  "skipped_records; held-out data never).")

# ---------------------------------------------------------------- optimisation
flags.DEFINE_integer("train_batch_size", 2048, "Global training batch size.")
flags.DEFINE_integer("eval_batch_size", 1024, "Global evaluation batch size.")
flags.DEFINE_integer("train_steps", 218949, "Training steps (ignored with --train_epochs).")
flags.DEFINE_float("train_epochs", None, "Train for this many epochs instead.")
flags.DEFINE_float("base_learning_rate", 0.016, "Learning rate per 256 images.")
flags.DEFINE_enum("lr_schedule", "exponential", ["exponential", "cosine", "step"],
                  "exponential (x --lr_decay_factor every --lr_decay_epoch; official), "
                  "cosine, or step (x --lr_decay_factor at --lr_milestones).")
flags.DEFINE_list("lr_milestones", None, "Epochs of the step schedule's decays "
                  "(default: the recipe preset's, scaled to the run's epochs).")
flags.DEFINE_float("lr_decay_epoch", 2.4, "Epochs between learning-rate decays.")
flags.DEFINE_float("lr_decay_factor", 0.97, "Learning-rate decay factor.")
flags.DEFINE_float("lr_warmup_epochs", 5.0, "Linear warm-up epochs.")
flags.DEFINE_enum("lr_warmup_start", "zero", ["zero", "base"], "Warm-up from 0 "
                  "(official) or from the unscaled rate when the scaled one is higher "
                  "(Goyal et al.).")
flags.DEFINE_enum("optimizer", "rmsprop", ["rmsprop", "momentum", "sgd", "adam"],
                  "rmsprop has TF1 semantics (slot starts at 1, eps inside the sqrt).")
flags.DEFINE_float("momentum", 0.9, "Momentum of rmsprop/momentum.")
flags.DEFINE_bool("nesterov", False, "Nesterov momentum (--optimizer=momentum).")
flags.DEFINE_float("rmsprop_decay", 0.9, "RMSProp decay.")
flags.DEFINE_float("rmsprop_epsilon", 1e-3, "RMSProp epsilon.")
flags.DEFINE_float("moving_average_decay", 0.9999, "EMA decay of weights (0 = off); "
                   "evaluation and export use the averages.")
flags.DEFINE_float("weight_decay", 1e-5, "L2 on all weights except normalisation.")
flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing.")
flags.DEFINE_float("batch_norm_momentum", None, "BN momentum (default: the family's, "
                   "EfficientNet 0.99, ResNet 0.9).")
flags.DEFINE_float("batch_norm_epsilon", None, "BN epsilon (default: the family's, "
                   "EfficientNet 1e-3, ResNet 1e-5).")
flags.DEFINE_float("dropout_rate", None, "Head dropout (default: per model).")
flags.DEFINE_float("survival_prob", None, "EfficientNet drop-connect survival "
                   "probability (default 0.8).")
flags.DEFINE_float("drop_path_rate", None, "NF-ResNet stochastic depth rate of the last "
                   "block (default 0; NoFrost: 0.1).")
flags.DEFINE_bool("zero_init_last_bn", None, "BN ResNets: last BN of every branch at "
                  "gamma 0 (NoFrost's BN baselines: on).")
flags.DEFINE_list("nf_stage_gains", None, "NF-ResNets, a diagnostic in no paper: 5 gains "
                  "after the stem and each stage's first block.")
flags.DEFINE_float("agc_clip", 0.0, "Adaptive gradient clipping threshold (Brock et al. "
                   "2021; 0.01 for NF-ResNets; 0 = off), before weight decay, classifier "
                   "excluded.")
flags.DEFINE_bool("sync_batch_norm", None, "Average BN statistics over replicas "
                  "(default: on for TPU, off elsewhere).")
flags.DEFINE_integer("sync_batch_norm_group_size", None, "Replicas sharing BN statistics "
                     "(divides the replicas; implies --sync_batch_norm; default: all; "
                     "TPU: none up to 8, then groups of max(8, replicas / 8)).")
flags.DEFINE_enum("normalizer", "split_batch_norm", ["split_batch_norm", "group_norm",
                                                     "instance_norm", "none"],
                  "Normalisation (recipes with auxiliary BNs need split_batch_norm).")
flags.DEFINE_integer("seed", 0, "Seed for data order, augmentation, attacks, init.")
flags.DEFINE_integer("min_bn_batch", 16, "Smallest BN batch a configuration may have; "
                     "below it is refused (Fast AdvProp's reference: 16 per GPU).")

# ---------------------------------------------------------------- recipe and attack
flags.DEFINE_bool("advprop", False, "Shorthand for --recipe=advprop.")
flags.DEFINE_enum("recipe", None, list(RECIPE_NAMES), "Training method (default vanilla); "
                  "its paper's settings fill the flags you do not set.")
flags.DEFINE_enum("attacker", "pgd", ["pgd", "ifgsm", "gd", "fgsm"],
                  "Training attack (AdvProp §5.1).")
flags.DEFINE_float("epsilon", 1.0, "Training attack L-inf radius in 0..255 units "
                   "(AdvProp: 1 for small models, 4 = PGD5 for large).")
flags.DEFINE_integer("attack_iterations", None, "Attack steps (default eps + 1; 1 for "
                     "eps 1).")
flags.DEFINE_float("attack_step_size", 1.0, "Attack step in 0..255 units.")
flags.DEFINE_enum("attack_bn_mode", "inference", ["inference", "batch"],
                  "BN statistics used while attacking (moving stats never update).")
flags.DEFINE_bool("targeted_attack", False, "Attack a random wrong class (unset: the "
                  "recipe's; advprop, fine_grained_advprop and sat: on).")
flags.DEFINE_float("clean_start_prob", 0.0, "Per-image probability that PGD starts at "
                   "the clean image (mbn_at: 0.2, Xie & Yuille; others 0).")
flags.DEFINE_float("eval_epsilon", None, "Evaluation PGD radius (default: --epsilon).")
flags.DEFINE_integer("eval_attack_iterations", 10, "Evaluation PGD steps "
                     "(step 2.5 eps / n); 0 = clean accuracy only.")

# ---------------------------------------------------------------- robustness suite
# --mode=eval_robustness: attacks at --eval_epsilon (default --epsilon), PGD-N with
# N = --eval_attack_iterations, on the checkpoint in --model_dir or --saved_model_dir;
# one flag per field of robustness_experiment.SuiteOptions.
def _define_suite_flags():
    from efficientnet_advprop.robustness_experiment import SuiteOptions

    for field in dataclasses.fields(SuiteOptions):
        meta, default = field.metadata, field.default
        if not meta:
            continue
        if meta["kind"] == "list":
            default = "all" if default is None else ",".join(f"{v:g}" if isinstance(
                v, float) else str(v) for v in default) or None
            flags.DEFINE_list(field.name, default, meta["help"])
        elif meta["kind"] == "enum":
            flags.DEFINE_enum(field.name, default, list(meta["choices"]), meta["help"])
        else:
            define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
                      "float": flags.DEFINE_float}.get(meta["kind"], flags.DEFINE_string)
            define(field.name, default, meta["help"])


_define_suite_flags()

# ---------------------------------------------------------------- hardware and logs
flags.DEFINE_bool("use_tpu", False, "Train on a Cloud TPU (same as --strategy=tpu).")
flags.DEFINE_string("tpu", None, "TPU name or address; 'local' on a TPU VM.")
flags.DEFINE_string("tpu_zone", None, "GCE zone of the TPU.")
flags.DEFINE_string("gcp_project", None, "GCP project of the TPU.")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "one_device", "mirrored",
                                       "multi_worker", "tpu"], "tf.distribute strategy.")
flags.DEFINE_bool("jit_compile", None, "XLA-compile the train step (default: on for "
                  "TPU and GPU, off on a CPU, where it measured slower).")
flags.DEFINE_integer("iterations_per_loop", 1, "Train steps per compiled call (official "
                     "TPU flag, e.g. 1251); checkpoints still fall where set.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"], "Compute "
                  "precision (bfloat16: TPU, recent CPUs; float16: GPU, with dynamic loss "
                  "scaling); variables, BN statistics, losses and attacks stay float32.")
flags.DEFINE_integer("checkpoint_every_steps", None, "Steps between checkpoints "
                     "(default: one epoch).")
flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints kept.")
flags.DEFINE_integer("summary_every_steps", 100, "Steps between TensorBoard scalars.")

flags.DEFINE_bool("print_config", False, "Print every resolved value with its source, "
                  "and exit (reads no data, writes nothing).")
flags.DEFINE_bool("deterministic", False, "Bitwise reproducible runs on one machine "
                  "(docs/reliability.md; also TF_DETERMINISTIC_OPS=1).")


def _define_recipe_options():
    """One flag per recipe option, defined from the recipe files (help names the
    recipes that read it and each one's paper value)."""
    by_name = {}
    for recipe in RECIPES.values():
        for option in recipe.options:
            by_name.setdefault(option.name, []).append((recipe.name, option))
    for name, uses in by_name.items():
        option = uses[0][1]
        values = "; ".join(f"{r}: {o.value}" for r, o in uses)
        help_text = f"{', '.join(r for r, _ in uses)}: {option.help} ({values})"
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float}.get(option.kind, flags.DEFINE_string)
        define(name, option.value, help_text)


_define_recipe_options()



class UsageError(Exception):
    """A bad flag value or input: reported as one line, exit status 2."""


def setting_overrides():
    """{setting: value} of every flag the user set (the config's top layer)."""
    from efficientnet_advprop.config import FIELD_SECTION, recipe_option_names

    names = set(FIELD_SECTION) | set(recipe_option_names()) | {"recipe"}
    out = {}
    for name in names:
        if name in FLAGS and FLAGS[name].present:
            out[name] = FLAGS[name].value
    if FLAGS.advprop:
        if FLAGS.recipe not in (None, "advprop"):
            raise UsageError(f"--advprop conflicts with --recipe={FLAGS.recipe}")
        out["recipe"] = "advprop"
    if out.get("auto_augment") == "none":
        out["auto_augment"] = None  # off, also where the recipe's paper uses it
    if "export_format" in out:
        out["export_format"] = tuple(out["export_format"])
    if "lr_milestones" in out:
        try:
            out["lr_milestones"] = tuple(float(m) for m in out["lr_milestones"])
        except ValueError:
            raise UsageError(f"--lr_milestones={','.join(FLAGS.lr_milestones)}: expected "
                             "increasing positive epochs, e.g. 30,60,90") from None
    return out


def flag_message(error):
    """A config error as a flag error: setting names written as --flags."""
    from efficientnet_advprop.config import FIELD_SECTION, recipe_option_names
    from efficientnet_advprop.robustness_experiment import SuiteOptions

    names = sorted(set(FIELD_SECTION) | set(recipe_option_names()) | {"recipe"}
                   | set(SuiteOptions.__dataclass_fields__), key=len, reverse=True)
    # snake_case names are flags wherever they stand; plain words only before "="
    spelled = [n for n in names if "_" in n]
    plain = [n for n in names if "_" not in n]
    text = re.sub(r"(?<![\w-])(" + "|".join(spelled) + r")(?!\w)", r"--\1", str(error))
    return re.sub(r"(?<![\w-])(" + "|".join(plain) + r")=", r"--\1=", text)


def resolve_config():
    """The ExperimentConfig of the flags (and of the run saved in --model_dir)."""
    from efficientnet_advprop.config import ConfigError
    from efficientnet_advprop.entry import resolve_dataset, resolve_run

    settings = setting_overrides()
    try:
        info = resolve_dataset(settings, describe_only=FLAGS.print_config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        return resolve_run(settings, info)
    except ConfigError as e:
        raise UsageError(flag_message(e)) from None


def _flag_list(name, cast=str):
    """A list flag as a tuple; 'none' is empty; --corruptions=all is None (all)."""
    values = [v.strip() for v in getattr(FLAGS, name) or [] if v.strip()]
    if values == ["none"]:
        return ()
    if values == ["all"] and name == "corruptions":
        return None
    try:
        return tuple(cast(v) for v in values)
    except ValueError:
        raise UsageError(f"--{name}={','.join(getattr(FLAGS, name))}: not a list of "
                         f"{cast.__name__} values") from None


def suite_options():
    """The robustness suite's options (robustness_experiment.SuiteOptions) of the
    flags of the same names."""
    from efficientnet_advprop.robustness_experiment import SuiteOptions

    lists = {"robustness_attacks": str, "curve_iterations": int, "mbn_modes": str,
             "mbn_gammas": float, "corruptions": str, "corruption_severities": int,
             "shift_datasets": str}
    kwargs = {}
    for name in SuiteOptions.__dataclass_fields__:
        if name == "set_fields":
            continue
        kwargs[name] = _flag_list(name, lists[name]) if name in lists else FLAGS[name].value
    present = frozenset(name for name in kwargs if FLAGS[name].present)
    return SuiteOptions(**kwargs, set_fields=present)


def run():
    from efficientnet_advprop import entry
    from efficientnet_advprop.config import ConfigError

    if not entry.on_jax():
        from efficientnet_advprop.training import determinism_requested, enable_determinism

        if FLAGS.deterministic or determinism_requested():  # before TensorFlow's runtime
            enable_determinism(FLAGS.seed)
    config, info = resolve_config()
    if FLAGS.print_config:
        print(config.describe())
        return None
    try:
        options = suite_options() if config.run.mode == "eval_robustness" else None
        return entry.run(config, info, options)
    except ConfigError as e:
        raise UsageError(flag_message(e)) from None


def main(argv):
    if len(argv) > 1:
        print(f"main.py: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    # after absl handled --help
    from absl import logging

    if not FLAGS["verbosity"].present:
        # TensorFlow's Python INFO lines (checkpoint sharding, signature renaming) go
        # through absl, which app.run sets to INFO; warnings and errors still show.
        logging.set_verbosity(logging.WARNING)
    from efficientnet_advprop.training import InputDataError, RunLockedError, TrainingError

    try:
        run()
    except (UsageError, RunLockedError) as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except InputDataError as e:
        print(f"main.py: error: --data_dir={_data_name()}: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:  # before the generic handler, which re-raises
        print(f"main.py: training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 -- only undecodable input is answered here
        from efficientnet_advprop.entry import bad_input_data_reason

        reason = bad_input_data_reason(e)
        if reason is None:
            raise
        print(f"main.py: error: --data_dir={_data_name()}: an image or record cannot be "
              f"read ({reason})", file=sys.stderr)
        sys.exit(2)


def _data_name():
    return FLAGS.data_dir or FLAGS.dataset or "(embedded)"


def parse_flags(argv):
    """absl parsing with a one-line error and exit status 2 for a bad flag."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def console_main():
    """Entry point of the `efficientnet-advprop` console script."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console_main()
