"""Train, evaluate and export EfficientNets with AdvProp and its baselines.

    python main.py --advprop --model=efficientnet-b0                 # embedded CIFAR-10
    python main.py --advprop --model=efficientnet-b7 --data_dir=gs://.../imagenet \
        --model_dir=gs://.../b7-advprop --tpu=local --epsilon=4
    python main.py --recipe=fast_advprop --print_config              # what would run

Flag names and defaults follow the official EfficientNet main.py where the concept
exists. This file only defines the flags and translates them: the settings you set
override the recipe's paper values (efficientnet_advprop/recipes/<recipe>.py), which
override the dataset preset and the defaults (efficientnet_advprop/config.py); the
work is done by efficientnet_advprop/experiment.py. Without --data_dir and --dataset
the run uses the small CIFAR-10 set shipped in the package and its dataset preset.
"""

import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app, flags  # noqa: E402

from efficientnet_advprop.recipes import RECIPES  # noqa: E402

FLAGS = flags.FLAGS
RECIPE_NAMES = tuple(RECIPES)

# ---------------------------------------------------------------- model and data
flags.DEFINE_string("model_name", "efficientnet-b0", "Model: efficientnet-b0 .. b8, -l2, "
                    "resnet-18 .. resnet-638, nf-resnet-26/50/101 (-cifar: small stem).")
flags.DEFINE_alias("model", "model_name")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval",
                                              "eval_robustness"],
                  "What to do.")
flags.DEFINE_string("data_dir", None,
                    "Data: official ImageNet TFRecord layout (train-*/validation-*), a "
                    "folder with train/<class>/ images, or the TFDS data dir with "
                    "--dataset=tfds:NAME. Unset: the embedded CIFAR-10 set.")
flags.DEFINE_string("dataset", None, "imagenet | tfds:NAME | folder | embedded "
                    "(default: inferred from --data_dir).")
flags.DEFINE_string("model_dir", None, "Checkpoints and TensorBoard logs "
                    "(default: runs/<model_name>-<recipe>). Resumes automatically.")
flags.DEFINE_string("export_dir", None, "Write the exported model (main BNs only, EMA "
                    "weights, preprocessing inside) here after training/eval: see "
                    "--export_format.")
flags.DEFINE_list("export_format", ["saved_model"], "What --export_dir gets, one or more "
                  "of: saved_model (the SavedModel itself), tflite (model.tflite, "
                  "float32), tflite_dynamic (model_dynamic_range.tflite, int8 weights).")
flags.DEFINE_enum("export_bn_set", "main", ["main", "adversarial"],
                  "BN set the SavedModel keeps (adversarial: the recipe's adversarial "
                  "set, e.g. MBN-adv of mbn_at).")
flags.DEFINE_integer("image_size", None, "Input resolution (default: the model's).")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet / NF-ResNet: scale every stage width "
                   "(small experiments; 1 = the published network).")
flags.DEFINE_enum("preprocessing", None, ["imagenet", "advprop", "none"],
                  "Normalisation inside the model (default: advprop [-1, 1] for the "
                  "advprop recipe, ImageNet mean/std otherwise).")
flags.DEFINE_string("init_checkpoint", None, "Start a new run from these weights: a "
                    ".keras file or an official TF1 EfficientNet/AdvProp checkpoint "
                    "(ignored when --model_dir already has a checkpoint). The "
                    "classifier is skipped when its shape differs.")
flags.DEFINE_enum("augmentation", None, ["inception", "cifar", "none"],
                  "Training crop: inception (official) or cifar (pad-4 random crop).")
flags.DEFINE_enum("auto_augment", None, ["v0", "randaugment", "none"],
                  "AutoAugment policy v0 or RandAugment after the crop (official "
                  "EfficientNet); none turns it off. Default: off, but v0 for advprop, "
                  "fine_grained_advprop and sat (their paper's setting).")
flags.DEFINE_integer("randaugment_layers", 2, "RandAugment: ops per image.")
flags.DEFINE_float("randaugment_magnitude", 10.0, "RandAugment magnitude (0..10 is the "
                   "official range; B7/B8 recipes use 28, the mapping stays linear).")
flags.DEFINE_float("auto_augment_fraction", None, "Share of training images that get "
                   "--auto_augment (default 1; fine_grained_advprop: 0.5, the rest stay "
                   "clean and keep their own BN set).")
flags.DEFINE_integer("num_label_classes", None, "Classes (default: the dataset's).")
flags.DEFINE_integer("num_train_images", None, "Training images (default: the dataset's).")
flags.DEFINE_integer("num_eval_images", None, "Held-out images to evaluate "
                     "(default: all).")
flags.DEFINE_integer("holdout_shards", None, "TFRecord data: evaluate on the first N "
                     "train-* files and train on the rest (the official option, for "
                     "users without the validation set).")
flags.DEFINE_bool("skip_bad_records", False, "Training data: drop undecodable images, "
                  "corrupt TFRecord records (and the unreadable rest of a damaged file) "
                  "instead of stopping; the number dropped goes to stderr and the "
                  "results JSON (skipped_records). Held-out data is never skipped.")

# ---------------------------------------------------------------- optimisation
flags.DEFINE_integer("train_batch_size", 2048, "Global training batch size.")
flags.DEFINE_integer("eval_batch_size", 1024, "Global evaluation batch size.")
flags.DEFINE_integer("train_steps", 218949, "Training steps (ignored with --train_epochs).")
flags.DEFINE_float("train_epochs", None, "Train for this many epochs instead.")
flags.DEFINE_float("base_learning_rate", 0.016, "Learning rate per 256 images.")
flags.DEFINE_enum("lr_schedule", "exponential", ["exponential", "cosine", "step"],
                  "exponential: x lr_decay_factor every lr_decay_epoch (official); "
                  "cosine; step: x lr_decay_factor at each of --lr_milestones.")
flags.DEFINE_list("lr_milestones", None, "Epochs of the step schedule's decays "
                  "(default: the recipe preset's, scaled to the run's epochs).")
flags.DEFINE_float("lr_decay_epoch", 2.4, "Epochs between learning-rate decays.")
flags.DEFINE_float("lr_decay_factor", 0.97, "Learning-rate decay factor.")
flags.DEFINE_float("lr_warmup_epochs", 5.0, "Linear warm-up epochs.")
flags.DEFINE_enum("lr_warmup_start", "zero", ["zero", "base"], "Warm-up ramp from 0 "
                  "(official EfficientNet) or from the unscaled --base_learning_rate, only "
                  "when the scaled rate is higher (Goyal et al.; Xie & Yuille's code).")
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
flags.DEFINE_bool("zero_init_last_bn", None, "BN ResNets: initialise the last BN of every "
                  "residual branch at gamma 0 (default off; NoFrost's BN baselines: on, "
                  "as its code builds them).")
flags.DEFINE_list("nf_stage_gains", None, "NF-ResNets, a diagnostic in no paper: 5 "
                  "constants multiplying the stem's output and each stage's first block's "
                  "(models.signal.fit_stage_gains sets them from a batch of images).")
flags.DEFINE_float("agc_clip", 0.0, "Adaptive gradient clipping threshold (Brock et al. "
                   "2021; 0.01 for NF-ResNets); 0 = off. Clips the global gradient "
                   "before weight decay; the classifier is excluded.")
flags.DEFINE_bool("sync_batch_norm", None, "Average BN batch statistics over replicas "
                  "(default: on for TPU, in --sync_batch_norm_group_size groups; off "
                  "elsewhere).")
flags.DEFINE_integer("sync_batch_norm_group_size", None, "Replicas per group that share "
                     "BN batch statistics (consecutive replica ids; must divide the "
                     "replicas; implies --sync_batch_norm). Default: all replicas; on "
                     "TPU the official rule: no sync up to 8 replicas, then groups of "
                     "max(8, replicas / 8).")
flags.DEFINE_enum("normalizer", "split_batch_norm",
                  ["split_batch_norm", "group_norm", "instance_norm", "none"],
                  "Normalisation of EfficientNets and ResNets (group_norm: the GN "
                  "variant of Xie & Yuille; recipes with auxiliary BNs need "
                  "split_batch_norm).")
flags.DEFINE_integer("seed", 0, "Seed for data order, augmentation, attacks, init.")
flags.DEFINE_integer("min_bn_batch", 16, "Smallest number of images a BN layer may "
                     "normalise together (Fast AdvProp's reference: 16 per GPU); a "
                     "configuration below it is refused. Lower it only on purpose.")

# ---------------------------------------------------------------- recipe and attack
flags.DEFINE_bool("advprop", False, "Shorthand for --recipe=advprop.")
flags.DEFINE_enum("recipe", None, list(RECIPE_NAMES),
                  "Training method (default vanilla, or advprop with --advprop); each "
                  "recipe file holds its paper's settings, applied to every flag you do "
                  "not set (--print_config shows them with their sources).")
flags.DEFINE_enum("attacker", "pgd", ["pgd", "ifgsm", "gd", "fgsm"],
                  "Training attack (AdvProp §5.1).")
flags.DEFINE_float("epsilon", 1.0, "Training attack L-inf radius in 0..255 units "
                   "(AdvProp: 1 for small models, 4 = PGD5 for large).")
flags.DEFINE_integer("attack_iterations", None, "Attack steps (default eps + 1; 1 for "
                     "eps 1).")
flags.DEFINE_float("attack_step_size", 1.0, "Attack step in 0..255 units.")
flags.DEFINE_enum("attack_bn_mode", "inference", ["inference", "batch"],
                  "BN statistics used while attacking (moving stats never update).")
flags.DEFINE_bool("targeted_attack", False, "Attack towards a random wrong class "
                  "(unset: the recipe's; advprop, fine_grained_advprop and sat are "
                  "targeted, --notargeted_attack turns it off).")
flags.DEFINE_float("clean_start_prob", 0.0, "Per-image probability that PGD starts at "
                   "the clean image (mbn_at: 0.2, Xie & Yuille; others 0).")
flags.DEFINE_float("eval_epsilon", None, "Evaluation PGD radius (default: --epsilon).")
flags.DEFINE_integer("eval_attack_iterations", 10, "Evaluation PGD steps "
                     "(step 2.5 eps / n); 0 = clean accuracy only.")

# ---------------------------------------------------------------- robustness suite
# --mode=eval_robustness: attacks at --eval_epsilon (default --epsilon), PGD-N with
# N = --eval_attack_iterations, on the checkpoint in --model_dir or --saved_model_dir.
flags.DEFINE_string("saved_model_dir", None, "eval_robustness: evaluate this exported "
                    "SavedModel instead of the checkpoint in --model_dir.")
flags.DEFINE_string("eval_dir", None, "eval_robustness: where robustness.json/.md and the "
                    "PNG plots go (default: <model_dir>/robustness, or "
                    "<saved_model_dir>_robustness).")
flags.DEFINE_list("robustness_attacks", "pgd,apgd-ce,apgd-dlr,mi-fgsm,cw,square,autoattack",
                  "Attacks (pgd, pgd-targeted, apgd-ce, apgd-dlr, apgd-t, mi-fgsm, cw, "
                  "square, autoattack; 'none' for none).")
flags.DEFINE_integer("apgd_iterations", 100, "APGD iterations (AutoAttack: 100).")
flags.DEFINE_integer("square_queries", 400, "Square attack queries (NoFrost: 400).")
flags.DEFINE_enum("autoattack_version", "fast", ["fast", "standard"], "fast: APGD-CE + "
                  "APGD-DLR; standard: + APGD-T and Square (5000 queries).")
flags.DEFINE_list("curve_iterations", "10,20,50,100,200", "Accuracy-vs-iterations curve "
                  "(one PGD run, running worst case); Xie & Yuille go to 2000; 'none' "
                  "skips.")
flags.DEFINE_bool("curve_targeted", True, "Curve attack towards a random wrong class.")
flags.DEFINE_float("curve_epsilon", None, "Curve radius (default: the eval epsilon; "
                   "Xie & Yuille: 16).")
flags.DEFINE_float("curve_step_size", 1.0, "Curve attack step (Xie & Yuille: 1).")
flags.DEFINE_list("mbn_modes", "main,aux,logits,layers,random_layers", "MBN inference "
                  "modes for models with auxiliary BNs ('none' skips).")
flags.DEFINE_list("mbn_gammas", "0,0.25,0.5,0.75,1", "MBN interpolation weights of the "
                  "auxiliary set.")
flags.DEFINE_float("mbn_layer_fraction", 0.5, "MBN random_layers: share of BN layers "
                   "that mix.")
flags.DEFINE_bool("robustness_properties", True, "Decision margin, boundary thickness, "
                  "KL smoothness.")
flags.DEFINE_list("corruptions", "all", "Common corruptions generated on the fly "
                  "('all', 'none' or names).")
flags.DEFINE_list("corruption_severities", "1,2,3,4,5", "Corruption severities.")
flags.DEFINE_string("mce_baseline", None, "Normalise the mCE: 'alexnet' (ImageNet-C "
                    "constants) or the robustness.json of a baseline run.")
flags.DEFINE_enum("robustness_profile", "auto", ["auto", "quick", "full"],
                  "full: the papers' protocol (the defaults of the flags above); quick: "
                  "PGD and APGD-CE-20, a 10/20/50 curve, 3 MBN modes, 5 corruptions at "
                  "severity 3, no properties, at most 250 images, for flags you did not "
                  "set (minutes on a CPU). auto: quick on a CPU or the embedded data.")
flags.DEFINE_list("shift_datasets", None, "Extra evaluation sets, NAME or NAME:PATH "
                  "(PATH: a folder of class subfolders or a TFDS data dir): imagenet_a, "
                  "imagenet_r (200-class logits), imagenet_sketch, stylized_imagenet, "
                  "folder:PATH.")

# ---------------------------------------------------------------- hardware and logs
flags.DEFINE_bool("use_tpu", False, "Train on a Cloud TPU (same as --strategy=tpu).")
flags.DEFINE_string("tpu", None, "TPU name or address; 'local' on a TPU VM.")
flags.DEFINE_string("tpu_zone", None, "GCE zone of the TPU.")
flags.DEFINE_string("gcp_project", None, "GCP project of the TPU.")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "one_device", "mirrored",
                                       "multi_worker", "tpu"], "tf.distribute strategy.")
flags.DEFINE_bool("jit_compile", None, "XLA-compile the train step (default: on for "
                  "TPU and GPU, off on a CPU, where it measured slower).")
flags.DEFINE_integer("iterations_per_loop", 1, "Train steps per tf.function call (the "
                     "official TPU flag; on a TPU use many, e.g. the official 1251 = one "
                     "ImageNet epoch at batch 1024). Checkpoint and summary steps still "
                     "fall where they are set (a loop stops there).")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"],
                  "Compute precision: bfloat16 (TPU, recent CPUs) or float16 with "
                  "dynamic loss scaling (GPU); variables, BN statistics, losses and "
                  "attacks stay float32.")
flags.DEFINE_integer("checkpoint_every_steps", None, "Steps between checkpoints "
                     "(default: one epoch).")
flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints kept.")
flags.DEFINE_integer("summary_every_steps", 100, "Steps between TensorBoard scalars.")

flags.DEFINE_bool("print_config", False, "Print the resolved configuration, each value "
                  "with where it came from, and exit (reads no data, writes nothing).")
flags.DEFINE_bool("deterministic", False, "Bitwise reproducible runs on one machine: op "
                  "determinism, seeds, one inter-op thread (README, Reliability; also "
                  "on with TF_DETERMINISTIC_OPS=1).")


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


# Flags that are not experiment settings (or are spelled differently there).
_NOT_SETTINGS = {"advprop", "print_config", "saved_model_dir", "eval_dir",
                 "robustness_attacks", "apgd_iterations", "square_queries",
                 "autoattack_version", "curve_iterations", "curve_targeted", "curve_epsilon",
                 "curve_step_size", "mbn_modes", "mbn_gammas", "mbn_layer_fraction",
                 "robustness_properties", "corruptions", "corruption_severities",
                 "mce_baseline", "shift_datasets", "robustness_profile"}


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

    names = sorted(set(FIELD_SECTION) | set(recipe_option_names()) | {"recipe"},
                   key=len, reverse=True)
    # snake_case names are flags wherever they stand; plain words only before "="
    spelled = [n for n in names if "_" in n]
    plain = [n for n in names if "_" not in n]
    text = re.sub(r"(?<![\w-])(" + "|".join(spelled) + r")(?!\w)", r"--\1", str(error))
    return re.sub(r"(?<![\w-])(" + "|".join(plain) + r")=", r"--\1=", text)


def resolve_config():
    """The ExperimentConfig of the flags (and of the run saved in --model_dir)."""
    from efficientnet_advprop.config import ConfigError, load_saved_config, resolve, reuse_saved

    data = _data_module()

    overrides = setting_overrides()
    try:
        if (FLAGS.print_config and overrides.get("dataset") == "imagenet"
                and not overrides.get("data_dir")):
            # What an ImageNet run would use, shown without the data (its standard sizes).
            from efficientnet_advprop.data import tfrecord

            info = data.DatasetInfo("imagenet", tfrecord.IMAGENET_NUM_CLASSES,
                                    tfrecord.IMAGENET_NUM_TRAIN, tfrecord.IMAGENET_NUM_EVAL,
                                    224)
        else:
            info = data.resolve_dataset(
                overrides.get("dataset"), overrides.get("data_dir"),
                holdout_shards=overrides.get("holdout_shards"),
                skip_bad_records=overrides.get("skip_bad_records", False))
    except ValueError as e:
        raise UsageError(str(e)) from None
    from efficientnet_advprop.recipes import RECIPES

    recipe_name = overrides.get("recipe", "vanilla")
    paper_model = getattr(RECIPES.get(recipe_name), "paper", {}).get("model_name")
    model_name = overrides.get("model_name") or (paper_model.value if paper_model
                                                 else FLAGS.model_name)
    model_dir = overrides.get("model_dir") or os.path.join(
        "runs", f"{model_name}-{recipe_name}")
    saved, reused = None, ()
    if "://" in model_dir or os.path.isdir(model_dir):
        saved = load_saved_config(model_dir)
    try:
        if saved is not None:
            completed = reuse_saved(overrides, saved)
            reused = [k for k in completed if k not in overrides]
            overrides = completed
        config = resolve(overrides, info)
    except ConfigError as e:
        raise UsageError(flag_message(e)) from None
    for name in reused:
        config.sources[name] = f"saved run ({model_dir})"
    return config, info


def on_jax():
    """KERAS_BACKEND=jax: the JAX engine (efficientnet_advprop/jax_experiment.py)."""
    import keras

    return keras.backend.backend() == "jax"


def _data_module():
    """The module that resolves datasets: the tf.data package, or on the JAX engine
    without TensorFlow the TF-free input path."""
    if on_jax():
        from efficientnet_advprop.jax_experiment import tensorflow_available

        if not tensorflow_available():
            from efficientnet_advprop.data import numpy_input

            return numpy_input
    from efficientnet_advprop import data

    return data


def run():
    from efficientnet_advprop.config import ConfigError

    if on_jax():
        from efficientnet_advprop import jax_experiment as experiment
    else:
        from efficientnet_advprop import experiment
        from efficientnet_advprop.training import determinism_requested, enable_determinism

        if FLAGS.deterministic or determinism_requested():  # before TensorFlow's runtime
            enable_determinism(FLAGS.seed)
    config, info = resolve_config()
    if FLAGS.print_config:
        print(config.describe())
        return None
    export_dir = config.run.export_dir
    if export_dir and os.path.isdir(export_dir) and os.listdir(export_dir):
        raise UsageError(f"--export_dir={export_dir} exists and is not empty; "
                         "choose a new directory")
    if info.name == "embedded":
        preset = sorted(k for k, v in config.sources.items() if v.startswith("embedded"))
        print(f"Using the embedded CIFAR-10 subset ({info.num_train} train / "
              f"{info.num_eval} held-out images); preset: "
              + ", ".join(f"{k}={config.to_dict()[k]}" for k in preset), file=sys.stderr)
    mode = config.run.mode
    if mode == "eval_robustness" and on_jax():
        raise UsageError("--mode=eval_robustness runs on the TensorFlow engine (its attack "
                         "suite is TensorFlow's): run it with KERAS_BACKEND=tensorflow on "
                         "this --model_dir, which reads the JAX engine's checkpoints")
    if mode == "eval_robustness":
        _PROFILE["name"] = robustness_profile(info)
    if mode == "eval_robustness" and FLAGS.saved_model_dir:
        return run_saved_model_robustness(config, info)
    try:
        if config.recipe.name == "fast_advprop" and config.recipe.values["budget_calibration"]:
            print(f"fast_advprop budget calibration: {config.sources['train_steps']}; "
                  f"milestones {config.optim.lr_milestones}", file=sys.stderr)
        job = experiment.prepare(config, info)
        if config.model.init_checkpoint:
            experiment.initialize(job, config.model.init_checkpoint)
        if mode in ("train", "train_and_eval"):
            experiment.train(job)
        else:
            experiment.restore(job)
        if mode == "eval_robustness":
            return run_checkpoint_robustness(job)
        results = {"model_name": config.model.model_name, "recipe": config.recipe.name,
                   "dataset": info.name, "image_size": config.model.image_size,
                   "step": job.step()}
        if mode in ("eval", "train_and_eval"):
            results = experiment.evaluate(job)
        if job.trainer.images_per_second:
            results["train_images_per_second"] = round(job.trainer.images_per_second, 2)
        if job.skip_counter is not None:
            results["skipped_records"] = int(job.skip_counter.numpy())
            print(f"--skip_bad_records: dropped {results['skipped_records']} unreadable "
                  f"training records (each time one was read)", file=sys.stderr)
        if export_dir:
            bn_set = experiment.export(job, export_dir, config.run.export_bn_set,
                                       formats=config.run.export_format)
            print(f"exported {', '.join(config.run.export_format)} (BN set {bn_set} "
                  f"only) to {export_dir}", file=sys.stderr)
    except ConfigError as e:
        raise UsageError(flag_message(e)) from None
    print(json.dumps(results))
    return results


def run_checkpoint_robustness(job):
    """eval_robustness on the checkpoint of --model_dir (EMA weights, float32)."""
    from efficientnet_advprop.attacks import float32_compute
    from efficientnet_advprop.evaluation import main_logits_fn

    cfg = job.config
    model_dir = cfg.run.model_dir
    with job.averaged(), float32_compute(job.trainer.model):  # attacks in float32
        return run_robustness(
            main_logits_fn(job.trainer.model), job.eval_dataset(), cfg,
            num_classes=cfg.num_classes, model=job.trainer.model,
            eval_dir=FLAGS.eval_dir or os.path.join(model_dir, "robustness"),
            image_size=cfg.model.image_size, augmentation=cfg.data.augmentation,
            metadata={"name": cfg.model.model_name, "recipe": cfg.recipe.name,
                      "checkpoint": f"{model_dir} (step {int(job.trainer.step.numpy())}"
                                    f"{', EMA weights' if job.trainer.ema else ''})",
                      "dataset": job.info.name, "image_size": cfg.model.image_size},
            num_images=cfg.num_eval)


def _flag_list(name, cast=str, choices=None, all_values=None):
    """A list flag with 'none' (empty) and 'all' (every choice) as shorthands."""
    values = [v.strip() for v in (_suite_value(name) or []) if v.strip()]
    if values == ["none"]:
        return ()
    if values == ["all"] and all_values is not None:
        return tuple(all_values)
    try:
        values = tuple(cast(v) for v in values)
    except ValueError:
        raise UsageError(f"--{name}={','.join(getattr(FLAGS, name))}: not a list of "
                         f"{cast.__name__} values") from None
    bad = [v for v in values if choices is not None and v not in choices]
    if bad:
        raise UsageError(f"--{name}: unknown value(s) {', '.join(map(str, bad))}; choose "
                         f"from {', '.join(choices)}")
    return values


# --robustness_profile=quick: values of the suite's flags the user did not set.
QUICK_PROFILE = {
    "robustness_attacks": ["pgd", "apgd-ce"], "apgd_iterations": 20,
    "curve_iterations": ["10", "20", "50"], "mbn_modes": ["main", "aux", "logits"],
    "mbn_gammas": ["0", "0.5", "1"], "robustness_properties": False,
    "corruptions": ["gaussian_noise", "defocus_blur", "fog", "contrast",
                    "jpeg_compression"],  # one or two of each family
    "corruption_severities": ["3"],
}
QUICK_MAX_IMAGES = 250


def robustness_profile(info):
    """quick or full: auto is quick on a CPU-only machine or the embedded data."""
    if FLAGS.robustness_profile != "auto":
        return FLAGS.robustness_profile
    import tensorflow as tf

    accelerated = (FLAGS.use_tpu or FLAGS.tpu
                   or tf.config.list_logical_devices("GPU"))
    return "quick" if info.name == "embedded" or not accelerated else "full"


def _suite_value(name):
    if _PROFILE["name"] == "quick" and not FLAGS[name].present and name in QUICK_PROFILE:
        return QUICK_PROFILE[name]
    return getattr(FLAGS, name)


_PROFILE = {"name": "full"}


def quick_profile_note(num_images, total):
    """What the quick profile left out, in one line."""
    def full(name):
        value = FLAGS[name].default
        return ",".join(value) if isinstance(value, list) else str(value)

    left = [f"--{name} {','.join(map(str, value)) if isinstance(value, list) else value} "
            f"(full: {full(name)})" for name, value in QUICK_PROFILE.items()
            if not FLAGS[name].present]
    if num_images < total:
        left.append(f"{num_images} of {total} held-out images")
    return ("quick robustness profile, --robustness_profile=full for the papers' "
            "protocol: " + "; ".join(left))


def robustness_config(config, num_classes):
    from efficientnet_advprop.data.corruptions import CORRUPTIONS
    from efficientnet_advprop.evaluation import ATTACK_NAMES, MBN_MODES, RobustnessConfig

    baseline = FLAGS.mce_baseline
    if baseline and baseline != "alexnet":
        try:
            with open(baseline) as f:
                baseline = json.load(f)["corruptions"]["errors"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--mce_baseline={FLAGS.mce_baseline}: not a robustness.json "
                             f"with corruption errors ({e})") from None
    elif baseline == "alexnet" and num_classes != 1000:
        raise UsageError(f"--mce_baseline=alexnet: the AlexNet constants are for "
                         f"1000-class ImageNet-C; this model has {num_classes} classes")
    iterations = config.attack.eval_attack_iterations or 10
    try:
        return RobustnessConfig(
            epsilon=config.attack.eval_epsilon or config.attack.epsilon,
            attacks=_flag_list("robustness_attacks", choices=ATTACK_NAMES),
            pgd_iterations=iterations, apgd_iterations=_suite_value("apgd_iterations"),
            mi_fgsm_iterations=iterations, cw_iterations=iterations,
            square_queries=FLAGS.square_queries,
            autoattack_version=FLAGS.autoattack_version,
            curve_iterations=_flag_list("curve_iterations", int),
            curve_targeted=FLAGS.curve_targeted, curve_epsilon=FLAGS.curve_epsilon,
            curve_step_size=FLAGS.curve_step_size,
            mbn_modes=_flag_list("mbn_modes", choices=MBN_MODES),
            mbn_gammas=_flag_list("mbn_gammas", float),
            mbn_layer_fraction=FLAGS.mbn_layer_fraction,
            properties=_suite_value("robustness_properties"),
            corruptions=_flag_list("corruptions", choices=CORRUPTIONS,
                                   all_values=CORRUPTIONS),
            severities=_flag_list("corruption_severities", int),
            mce_baseline=baseline, seed=config.run.seed)
    except ValueError as e:
        raise UsageError(f"--mode=eval_robustness: {e}") from None


def shift_datasets(config, image_size, augmentation, num_classes):
    """{spec: (dataset, logit indices or None)} from --shift_datasets.

    A spec is NAME or NAME:PATH; PATH is a folder of class subfolders (WordNet IDs for
    the ImageNet variants) or a TFDS data directory. imagenet_a and imagenet_r keep
    their 200 classes' logits.
    """
    from efficientnet_advprop.evaluation import distribution_shift as shift

    out = {}
    for spec in FLAGS.shift_datasets or ():
        name, _, path = spec.partition(":")
        try:
            if name not in shift.SHIFT_DATASETS:
                raise ValueError(f"unknown dataset; choose from "
                                 f"{', '.join(shift.SHIFT_DATASETS)} (NAME or NAME:PATH)")
            subset = name in ("imagenet_a", "imagenet_r")
            if name != "folder" and num_classes != 1000:
                raise ValueError(f"an ImageNet variant needs a 1000-class model, this one "
                                 f"has {num_classes} classes")
            ds = shift.shift_dataset(name, path or None, batch_size=config.data.eval_batch_size,
                                     image_size=image_size, augmentation=augmentation,
                                     subset=subset)
        except (ValueError, OSError) as e:
            raise UsageError(f"--shift_datasets={spec}: {e}") from None
        if config.data.num_eval_images:
            ds = ds.unbatch().take(config.data.num_eval_images).batch(config.data.eval_batch_size)
        indices = {"imagenet_a": shift.imagenet_a_indices,
                   "imagenet_r": shift.imagenet_r_indices}.get(name)
        out[spec] = (ds, indices() if indices else None)
    return out


def run_robustness(logits_fn, dataset, config, *, num_classes, model, eval_dir, image_size,
                   augmentation, metadata, num_images):
    """--mode=eval_robustness: the suite, its report files, and the result dict."""
    from efficientnet_advprop.evaluation import evaluate_robustness, write_report

    suite = robustness_config(config, num_classes)
    shifts = shift_datasets(config, image_size, augmentation, num_classes)
    if _PROFILE["name"] == "quick":
        total = num_images
        if not FLAGS["num_eval_images"].present:
            num_images = min(num_images, QUICK_MAX_IMAGES)
            batch = config.data.eval_batch_size
            dataset = dataset.unbatch().take(num_images).batch(batch)
        print(quick_profile_note(num_images, total), file=sys.stderr)
    print(f"robustness suite: eps {suite.epsilon:g}, attacks "
          f"{', '.join(suite.attacks) or 'none'}, curve {list(suite.curve_iterations)}, "
          f"{len(suite.corruptions)} corruptions x {len(suite.severities)} severities "
          f"-> {eval_dir}", file=sys.stderr)
    result = evaluate_robustness(logits_fn, dataset, suite, num_classes=num_classes,
                                 model=model, shift_datasets=shifts, metadata=metadata,
                                 num_batches=-(-num_images // config.data.eval_batch_size))
    paths = write_report(result, eval_dir)
    print("wrote " + ", ".join(paths), file=sys.stderr)
    summary = {k: result[k] for k in ("clean_accuracy", "worst_case_accuracy")
               if k in result}
    summary.update({k: v["accuracy"] for k, v in result.get("attacks", {}).items()})
    print(json.dumps(summary))
    return result


def run_saved_model_robustness(config, info):
    """eval_robustness on an exported SavedModel (main BN set only, no BN statistics)."""
    import tensorflow as tf

    from efficientnet_advprop.export import load_export_metadata

    path = FLAGS.saved_model_dir
    try:
        meta = load_export_metadata(path)
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--saved_model_dir={path}: {e}") from None
    image_size = int(meta["image_size"])
    num_classes = int(meta["num_classes"])
    if info.num_classes and info.num_classes != num_classes:
        raise UsageError(f"--saved_model_dir={path}: the model has {num_classes} classes, "
                         f"the dataset {info.name} has {info.num_classes}")
    augmentation = meta.get("jpeg_eval_crop", "inception")
    num_eval = config.num_eval

    def logits_fn(x):
        return loaded.serving_default(x)["logits"]

    from efficientnet_advprop.experiment import eval_dataset

    return run_robustness(
        logits_fn, eval_dataset(config, info, image_size, augmentation), config,
        num_classes=num_classes, model=None,
        eval_dir=FLAGS.eval_dir or path.rstrip("/") + "_robustness",
        image_size=image_size, augmentation=augmentation, metadata={
            "name": meta.get("model_name", "saved model"), "recipe": meta.get("recipe"),
            "saved_model": path, "bn_set": meta.get("bn_set"), "dataset": info.name,
            "image_size": image_size}, num_images=num_eval)


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
        if not _is_bad_input_data(e):
            raise
        from efficientnet_advprop.training.trainer import op_error_reason

        print(f"main.py: error: --data_dir={_data_name()}: an image or record cannot be "
              f"read ({op_error_reason(e)})", file=sys.stderr)
        sys.exit(2)


def _data_name():
    return FLAGS.data_dir or FLAGS.dataset or "(embedded)"


_BAD_DATA_MARKERS = ("image file format", "decode", "corrupted record", "truncated",
                     "Invalid JPEG", "Premature end")


def _is_bad_input_data(error):
    """An input-pipeline failure caused by the data itself (not by a program bug)."""
    if "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None:
        return False  # nothing of TensorFlow ran (the JAX engine without tf.data)
    import tensorflow as tf

    if isinstance(error, tf.errors.DataLossError):
        return True
    message = getattr(error, "message", "") or str(error)
    return (isinstance(error, tf.errors.InvalidArgumentError)
            and any(marker in message for marker in _BAD_DATA_MARKERS))


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
