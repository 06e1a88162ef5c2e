"""Train, evaluate and export EfficientNets with AdvProp and its baselines.

    python main.py --advprop --model=efficientnet-b0                 # embedded CIFAR-10
    python main.py --advprop --model=efficientnet-b7 --data_dir=gs://.../imagenet \
        --model_dir=gs://.../b7-advprop --tpu=local --epsilon=4

Flag names and defaults follow the official EfficientNet main.py where the concept
exists. Without --data_dir and --dataset the run uses the small CIFAR-10 set shipped in
the package and the "embedded preset" (see EMBEDDED_PRESET) for every flag you did not
set, so it finishes in minutes on a laptop CPU.
"""

import json
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS

RECIPE_NAMES = ("vanilla", "advprop", "fine_grained_advprop", "madry_at", "sat", "trades",
                "fat", "trades_fat", "fast_advprop", "mbn_at", "nofrost", "nofrost_star")

# Each paper's recipe, applied to the flags the user did not set. "lr_milestones" are
# fractions of the run here (they scale with --train_epochs and the embedded preset).
_TRADES = {"epsilon": 8.0, "attack_step_size": 2.0, "attack_iterations": 10}
_NOFROST = {  # Wang et al. 2022: SGD Nesterov, cosine, 90 epochs, PGD-10 eps 8
    "optimizer": "momentum", "nesterov": True, "base_learning_rate": 0.1,
    "weight_decay": 5e-5, "lr_schedule": "cosine", "lr_warmup_epochs": 0.0,
    "train_epochs": 90.0, "epsilon": 8.0, "attack_step_size": 1.0,
    "attack_iterations": 10, "dropout_rate": 0.25, "drop_path_rate": 0.1,
    "label_smoothing": 0.1}
RECIPE_PRESETS = {
    "fast_advprop": {  # Mei et al. 2022: ResNet SGD recipe, 105 epochs (/ 1.2 -> 88)
        "optimizer": "momentum", "base_learning_rate": 0.1, "weight_decay": 1e-4,
        "lr_schedule": "step", "lr_milestones": [30 / 105, 60 / 105, 90 / 105, 100 / 105],
        "lr_decay_factor": 0.1, "lr_warmup_epochs": 0.0, "train_epochs": 105.0,
        "epsilon": 1.0, "attack_iterations": 1},
    "mbn_at": {  # Xie & Yuille 2020: 110 epochs, x0.1 at 35/70/95, targeted PGD-30 eps 16
        "optimizer": "momentum", "base_learning_rate": 0.1, "weight_decay": 1e-4,
        "lr_schedule": "step", "lr_milestones": [35 / 110, 70 / 110, 95 / 110],
        "lr_decay_factor": 0.1, "lr_warmup_epochs": 0.0, "train_epochs": 110.0,
        "epsilon": 16.0, "attack_step_size": 1.0, "attack_iterations": 30,
        "targeted_attack": True, "clean_start_prob": 0.2, "label_smoothing": 0.1},
    "nofrost": _NOFROST,
    "nofrost_star": _NOFROST,
    "trades": _TRADES,
    "fat": _TRADES,
    "trades_fat": _TRADES,
    "fine_grained_advprop": {"auto_augment": "v0", "auto_augment_fraction": 0.5},
}

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
flags.DEFINE_string("export_dir", None, "Write a SavedModel (main BNs only, EMA weights, "
                    "preprocessing inside) here after training/eval.")
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
flags.DEFINE_enum("auto_augment", None, ["v0", "randaugment"],
                  "AutoAugment policy v0 or RandAugment after the crop (official "
                  "EfficientNet; off by default; fine_grained_advprop: v0).")
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

# ---------------------------------------------------------------- recipe and attack
flags.DEFINE_bool("advprop", False, "Shorthand for --recipe=advprop.")
flags.DEFINE_enum("recipe", None, list(RECIPE_NAMES),
                  "Training method (default vanilla, or advprop with --advprop); each "
                  "has a preset of the paper's hyper-parameters, see RECIPE_PRESETS.")
flags.DEFINE_enum("attacker", "pgd", ["pgd", "ifgsm", "gd", "fgsm"],
                  "Training attack (AdvProp §5.1).")
flags.DEFINE_float("epsilon", 1.0, "Training attack L-inf radius in 0..255 units "
                   "(AdvProp: 1 for small models, 4 = PGD5 for large).")
flags.DEFINE_integer("attack_iterations", None, "Attack steps (default eps + 1; 1 for "
                     "eps 1).")
flags.DEFINE_float("attack_step_size", 1.0, "Attack step in 0..255 units.")
flags.DEFINE_enum("attack_bn_mode", "inference", ["inference", "batch"],
                  "BN statistics used while attacking (moving stats never update).")
flags.DEFINE_bool("targeted_attack", False, "Attack towards a random wrong class.")
flags.DEFINE_float("clean_start_prob", None, "Per-image probability that PGD starts at "
                   "the clean image (mbn_at: 0.2, Xie & Yuille; others 0).")
flags.DEFINE_float("clean_loss_weight", 0.5, "sat, mbn_at, nofrost: weight of the clean "
                   "loss; the adversarial one gets 1 - it (NoFrost's lambda).")
flags.DEFINE_float("p_adv", 0.2, "fast_advprop: share of each drawn batch used "
                   "adversarially, in (0, 1); --train_batch_size counts drawn images.")
flags.DEFINE_float("fast_advprop_beta", 0.5, "fast_advprop: weight of the noisy and "
                   "the adversarial pass.")
flags.DEFINE_integer("shuffle_bn_group_size", None, "fast_advprop on one device: ghost "
                     "BN group size (default: largest m with m*m <= adversarial images).")
flags.DEFINE_bool("budget_calibration", True, "fast_advprop: divide the epochs and the "
                  "learning-rate milestones by 1 + p_adv * K (same cost as vanilla).")
flags.DEFINE_bool("sync_update_speed", True, "fast_advprop: divide each parameter's "
                  "gradient by the weighted samples that touched it.")
flags.DEFINE_float("mixup_alpha", 0.0, "vanilla, fast_advprop: Mixup alpha on the clean "
                   "images (0 = off).")
flags.DEFINE_float("cutmix_alpha", 0.0, "vanilla, fast_advprop: CutMix alpha on the "
                   "clean images (0 = off).")
flags.DEFINE_float("clean_fraction", 1.0, "mbn_at: share of each batch also used clean "
                   "(0 = adversarial images only).")
flags.DEFINE_float("alp_weight", 0.0, "mbn_at: adversarial logit pairing weight.")
flags.DEFINE_bool("mixture_bn", True, "mbn_at: separate BN sets for clean and "
                  "adversarial images (MBN); false: shared BN.")
flags.DEFINE_float("consistent_bn_epochs", 0.0, "mbn_at: train the last N epochs with "
                   "BN moving statistics (consistent BN; the paper: 10).")
flags.DEFINE_float("trades_beta", 6.0, "trades, trades_fat: weight of the KL term.")
flags.DEFINE_integer("early_stop_tau", 1, "fat, trades_fat: steps an image may take "
                     "after it is first misclassified.")
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

# Applied to flags the user did not set when the embedded dataset is used. Chosen by
# measurement (README, "Embedded default"): efficientnet-b0 from scratch at 32 pixels
# barely learns with the ImageNet recipe in a few minutes.
EMBEDDED_PRESET = {
    "image_size": 32,
    "augmentation": "cifar",
    "train_batch_size": 64,
    "eval_batch_size": 250,
    "train_epochs": 4.0,
    "base_learning_rate": 0.008,
    "lr_warmup_epochs": 0.3,
    "lr_decay_epoch": 1.0,
    "lr_decay_factor": 0.8,
    "moving_average_decay": 0.999,
    "dropout_rate": 0.1,
    "survival_prob": 1.0,
}


class UsageError(Exception):
    """A bad flag value or input: reported as one line, exit status 2."""


def _set(name):
    return FLAGS[name].present


def apply_recipe_preset(recipe_name):
    """Sets the recipe's paper hyper-parameters on flags the user left unset; returns
    the relative milestones (or None) and what was applied."""
    applied, milestones = [], None
    for name, value in RECIPE_PRESETS.get(recipe_name, {}).items():
        if name == "lr_milestones":
            if not _set("lr_milestones"):
                milestones = value
            continue
        if name == "train_epochs" and _set("train_steps"):
            continue  # an explicit step count wins over the preset's epochs
        if not _set(name):
            setattr(FLAGS, name, value)
            applied.append(f"{name}={value:g}" if isinstance(value, float)
                           else f"{name}={value}")
    return milestones, applied


def apply_embedded_preset(info, recipe_preset=()):
    """The small-data preset: data-scale flags always (unless the user set them);
    the learning rate only when the recipe's preset did not choose one."""
    if info.name != "embedded":
        return []
    applied = []
    for name, value in EMBEDDED_PRESET.items():
        if name == "train_epochs" and _set("train_steps"):
            continue  # an explicit step count wins over the preset's epochs
        if name in ("base_learning_rate", "lr_decay_epoch", "lr_decay_factor",
                    "dropout_rate") and name in recipe_preset:
            continue
        if not _set(name):
            setattr(FLAGS, name, value)
            applied.append(f"{name}={value}")
    return applied


def validate_flags():
    checks = [
        ("train_batch_size", FLAGS.train_batch_size > 0, "must be > 0"),
        ("eval_batch_size", FLAGS.eval_batch_size > 0, "must be > 0"),
        ("train_steps", FLAGS.train_steps > 0, "must be > 0"),
        ("train_epochs", FLAGS.train_epochs is None or FLAGS.train_epochs > 0, "must be > 0"),
        ("base_learning_rate", FLAGS.base_learning_rate > 0, "must be > 0"),
        ("lr_decay_epoch", FLAGS.lr_decay_epoch > 0, "must be > 0"),
        ("lr_decay_factor", 0 < FLAGS.lr_decay_factor <= 1, "must be in (0, 1]"),
        ("lr_warmup_epochs", FLAGS.lr_warmup_epochs >= 0, "must be >= 0"),
        ("moving_average_decay", 0 <= FLAGS.moving_average_decay < 1, "must be in [0, 1)"),
        ("weight_decay", FLAGS.weight_decay >= 0, "must be >= 0"),
        ("label_smoothing", 0 <= FLAGS.label_smoothing < 1, "must be in [0, 1)"),
        ("batch_norm_momentum", FLAGS.batch_norm_momentum is None
         or 0 <= FLAGS.batch_norm_momentum < 1, "must be in [0, 1)"),
        ("batch_norm_epsilon", FLAGS.batch_norm_epsilon is None
         or FLAGS.batch_norm_epsilon > 0, "must be > 0"),
        ("dropout_rate", FLAGS.dropout_rate is None or 0 <= FLAGS.dropout_rate < 1,
         "must be in [0, 1)"),
        ("survival_prob", FLAGS.survival_prob is None or 0 < FLAGS.survival_prob <= 1,
         "must be in (0, 1]"),
        ("drop_path_rate", FLAGS.drop_path_rate is None or 0 <= FLAGS.drop_path_rate < 1,
         "must be in [0, 1)"),
        ("agc_clip", FLAGS.agc_clip >= 0, "must be >= 0"),
        ("width_multiplier", FLAGS.width_multiplier > 0, "must be > 0"),
        ("epsilon", FLAGS.epsilon > 0, "must be > 0 (0..255 pixel units)"),
        ("attack_iterations", FLAGS.attack_iterations is None
         or FLAGS.attack_iterations >= 1, "must be >= 1"),
        ("attack_step_size", FLAGS.attack_step_size > 0, "must be > 0"),
        ("clean_loss_weight", 0 <= FLAGS.clean_loss_weight <= 1, "must be in [0, 1]"),
        ("clean_start_prob", FLAGS.clean_start_prob is None
         or 0 <= FLAGS.clean_start_prob <= 1, "must be in [0, 1]"),
        ("p_adv", 0 < FLAGS.p_adv < 1, "must be in (0, 1)"),
        ("fast_advprop_beta", FLAGS.fast_advprop_beta > 0, "must be > 0"),
        ("shuffle_bn_group_size", FLAGS.shuffle_bn_group_size is None
         or FLAGS.shuffle_bn_group_size >= 1, "must be >= 1"),
        ("mixup_alpha", FLAGS.mixup_alpha >= 0, "must be >= 0"),
        ("cutmix_alpha", FLAGS.cutmix_alpha >= 0, "must be >= 0"),
        ("clean_fraction", 0 <= FLAGS.clean_fraction <= 1, "must be in [0, 1]"),
        ("alp_weight", FLAGS.alp_weight >= 0, "must be >= 0"),
        ("consistent_bn_epochs", FLAGS.consistent_bn_epochs >= 0, "must be >= 0"),
        ("trades_beta", FLAGS.trades_beta >= 0, "must be >= 0"),
        ("early_stop_tau", FLAGS.early_stop_tau >= 0, "must be >= 0"),
        ("randaugment_layers", FLAGS.randaugment_layers >= 0, "must be >= 0"),
        ("randaugment_magnitude", FLAGS.randaugment_magnitude >= 0, "must be >= 0"),
        ("auto_augment_fraction", FLAGS.auto_augment_fraction is None
         or 0 <= FLAGS.auto_augment_fraction <= 1, "must be in [0, 1]"),
        ("eval_epsilon", FLAGS.eval_epsilon is None or FLAGS.eval_epsilon > 0, "must be > 0"),
        ("eval_attack_iterations", FLAGS.eval_attack_iterations >= 0, "must be >= 0"),
        ("image_size", FLAGS.image_size is None or FLAGS.image_size >= 8, "must be >= 8"),
        ("checkpoint_every_steps", FLAGS.checkpoint_every_steps is None
         or FLAGS.checkpoint_every_steps > 0, "must be > 0"),
        ("keep_checkpoints", FLAGS.keep_checkpoints > 0, "must be > 0"),
        ("summary_every_steps", FLAGS.summary_every_steps > 0, "must be > 0"),
        ("iterations_per_loop", FLAGS.iterations_per_loop >= 1, "must be >= 1"),
        ("sync_batch_norm_group_size", FLAGS.sync_batch_norm_group_size is None
         or FLAGS.sync_batch_norm_group_size >= 1, "must be >= 1"),
    ]
    for name, ok, message in checks:
        if not ok:
            raise UsageError(f"--{name}={getattr(FLAGS, name)}: {message}")
    if FLAGS.advprop and FLAGS.recipe not in (None, "advprop"):
        raise UsageError(f"--advprop conflicts with --recipe={FLAGS.recipe}")
    if FLAGS.sync_batch_norm_group_size is not None:
        if FLAGS.sync_batch_norm is False:
            raise UsageError("--sync_batch_norm_group_size needs --sync_batch_norm")
        if FLAGS.normalizer != "split_batch_norm":
            raise UsageError("--sync_batch_norm_group_size applies to "
                             "--normalizer=split_batch_norm only")
    if FLAGS.lr_milestones:
        try:
            values = [float(m) for m in FLAGS.lr_milestones]
        except ValueError:
            values = None
        if not values or values != sorted(values) or values[0] <= 0:
            raise UsageError(f"--lr_milestones={','.join(FLAGS.lr_milestones)}: expected "
                             "increasing positive epochs, e.g. 30,60,90")
    from efficientnet_advprop.models import model_names
    if FLAGS.model_name not in model_names():
        raise UsageError(f"--model_name={FLAGS.model_name}: unknown model; choose from "
                         f"{', '.join(model_names())}")
    if FLAGS.export_dir and os.path.isdir(FLAGS.export_dir) and os.listdir(FLAGS.export_dir):
        raise UsageError(f"--export_dir={FLAGS.export_dir} exists and is not empty; "
                         "choose a new directory")


# XLA on a CPU, measured with scripts/benchmark.py --image_sizes=32 --batch_size=32
# (efficientnet-b0, 2 cores, img/s without / with XLA): vanilla 98 / 34, AdvProp PGD-1
# 56 / 14, PGD-5 34 / 9 -- about 3-4x slower, so it stays off there.
JIT_ON_CPU = False


def default_jit_compile(use_tpu):
    """--jit_compile when unset: on for TPU (XLA is what it runs) and GPU, and on a
    CPU only where it measured faster (JIT_ON_CPU)."""
    import tensorflow as tf

    return bool(use_tpu or tf.config.list_logical_devices("GPU") or JIT_ON_CPU)


def sync_batch_norm_settings(use_tpu, replicas):
    """-> (synchronized, replicas per group or None for all) of the BN layers.

    Unset flags: on TPU, synchronised in the official TpuBatchNormalization groups
    (`official_sync_group_size`); elsewhere per replica, or over all replicas with
    --sync_batch_norm. A group size implies --sync_batch_norm.
    """
    from efficientnet_advprop.layers.split_batch_norm import official_sync_group_size

    group = FLAGS.sync_batch_norm_group_size
    sync = FLAGS.sync_batch_norm
    if sync is None:
        sync = use_tpu or group is not None
    if not sync or FLAGS.normalizer != "split_batch_norm":
        return False, None
    if group is None and use_tpu:
        group = official_sync_group_size(replicas)
    if group is not None and replicas > 1 and replicas % group:
        raise UsageError(f"--sync_batch_norm_group_size={group} does not divide the "
                         f"{replicas} replicas")
    return True, group


def summary_every_steps(steps_per_epoch):
    """TensorBoard interval: the flag, at most an epoch; with several steps per loop
    and the flag unset, at least one loop (summaries would cut the loops short)."""
    every = min(FLAGS.summary_every_steps, steps_per_epoch)
    if not _set("summary_every_steps"):
        every = max(every, FLAGS.iterations_per_loop)
    return every


def recipe_options(recipe_name):
    """The make_recipe keyword arguments the flags give for `recipe_name`."""
    from efficientnet_advprop.attacks import AttackConfig

    options = {"label_smoothing": FLAGS.label_smoothing}
    if recipe_name in ("vanilla", "fast_advprop"):
        options.update(mixup_alpha=FLAGS.mixup_alpha, cutmix_alpha=FLAGS.cutmix_alpha)
    if recipe_name == "vanilla":
        return options
    try:
        options["attack"] = AttackConfig(
            attacker=FLAGS.attacker, epsilon=FLAGS.epsilon, step_size=FLAGS.attack_step_size,
            num_iter=FLAGS.attack_iterations, targeted=FLAGS.targeted_attack,
            bn_mode=FLAGS.attack_bn_mode, clean_start_prob=FLAGS.clean_start_prob or 0.0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if recipe_name == "sat":
        options["clean_weight"] = FLAGS.clean_loss_weight
    elif recipe_name in ("nofrost", "nofrost_star"):
        options["adv_weight"] = 1.0 - FLAGS.clean_loss_weight
    elif recipe_name == "mbn_at":
        options.update(clean_fraction=FLAGS.clean_fraction,
                       clean_weight=FLAGS.clean_loss_weight, alp_weight=FLAGS.alp_weight,
                       mixture_bn=FLAGS.mixture_bn)
    elif recipe_name in ("trades", "trades_fat"):
        options["beta"] = FLAGS.trades_beta
    elif recipe_name == "fast_advprop":
        options.update(adv_fraction=FLAGS.p_adv, beta=FLAGS.fast_advprop_beta,
                       shuffle_bn_group_size=FLAGS.shuffle_bn_group_size,
                       sync_update_speed=FLAGS.sync_update_speed)
    if recipe_name in ("fat", "trades_fat"):
        options["early_stop_tau"] = FLAGS.early_stop_tau
    return options


def run():
    import tensorflow as tf

    from efficientnet_advprop import data, export
    from efficientnet_advprop.evaluation import eval_attack_config, evaluate
    from efficientnet_advprop.layers import MAIN
    from efficientnet_advprop.models import (build_model, default_image_size,
                                             is_normalizer_free)
    from efficientnet_advprop.recipes import make_recipe
    from efficientnet_advprop.training import (TrainConfig, Trainer, make_strategy,
                                               set_global_seed)

    validate_flags()
    try:
        info = data.resolve_dataset(FLAGS.dataset, FLAGS.data_dir,
                                    holdout_shards=FLAGS.holdout_shards,
                                    skip_bad_records=FLAGS.skip_bad_records)
    except ValueError as e:
        raise UsageError(str(e)) from None
    recipe_name = "advprop" if FLAGS.advprop else (FLAGS.recipe or "vanilla")
    relative_milestones, recipe_applied = apply_recipe_preset(recipe_name)
    if recipe_applied:
        print(f"--recipe={recipe_name} preset: {', '.join(recipe_applied)}", file=sys.stderr)
    applied = apply_embedded_preset(info, RECIPE_PRESETS.get(recipe_name, {}))
    if info.name == "embedded":
        logging.info("No --data_dir/--dataset: using the embedded CIFAR-10 subset "
                     "(%d train / %d held-out images, 10 classes) with the embedded "
                     "preset: %s", info.num_train, info.num_eval, ", ".join(applied))
        print(f"Using the embedded CIFAR-10 subset ({info.num_train} train / "
              f"{info.num_eval} held-out images); preset: {', '.join(applied)}",
              file=sys.stderr)

    if FLAGS.mode == "eval_robustness" and FLAGS.saved_model_dir:
        return run_saved_model_robustness(info)
    num_classes = FLAGS.num_label_classes or info.num_classes
    image_size = FLAGS.image_size or default_image_size(FLAGS.model_name)
    num_train = FLAGS.num_train_images or info.num_train
    num_eval = min(FLAGS.num_eval_images or info.num_eval, info.num_eval)
    batch = FLAGS.train_batch_size
    steps_per_epoch = max(1, num_train // batch)
    model_dir = FLAGS.model_dir or os.path.join("runs", f"{FLAGS.model_name}-{recipe_name}")
    augmentation = FLAGS.augmentation or ("cifar" if image_size <= 64 else "inception")
    use_tpu = FLAGS.use_tpu or bool(FLAGS.tpu)
    if use_tpu and FLAGS.precision == "float16":
        raise UsageError("--precision=float16 is for GPUs; a TPU computes in bfloat16 "
                         "(--precision=bfloat16)")
    strategy = make_strategy("tpu" if use_tpu else FLAGS.strategy, tpu=FLAGS.tpu,
                             tpu_zone=FLAGS.tpu_zone, gcp_project=FLAGS.gcp_project)
    replicas = strategy.num_replicas_in_sync
    if batch % replicas:
        raise UsageError(f"--train_batch_size={batch} is not divisible by the "
                         f"{replicas} replicas")
    jit = FLAGS.jit_compile if FLAGS.jit_compile is not None else default_jit_compile(use_tpu)
    sync_bn, sync_group = sync_batch_norm_settings(use_tpu, replicas)
    set_global_seed(FLAGS.seed)

    try:
        recipe = make_recipe(recipe_name, num_classes, **recipe_options(recipe_name))
    except ValueError as e:
        raise UsageError(f"--recipe={recipe_name}: {e}") from None
    lr_batch_size = None
    if recipe_name == "fast_advprop":
        try:  # the clean/adversarial split of one replica's batch
            clean, _ = recipe.split(batch // replicas)
        except ValueError as e:
            raise UsageError(f"--p_adv={FLAGS.p_adv}, --train_batch_size={batch}: "
                             f"{e}") from None
        lr_batch_size = clean * replicas  # the reference's lr is per 256 clean images
    if recipe.needs_source_tags and not FLAGS.auto_augment:
        raise UsageError(f"--recipe={recipe_name} routes AutoAugment images to their own "
                         "BN set: set --auto_augment=v0 or randaugment")
    auto_augment_fraction = (FLAGS.auto_augment_fraction
                             if FLAGS.auto_augment_fraction is not None else 1.0)

    # Epochs and learning-rate milestones, with Fast AdvProp's budget calibration.
    epochs = FLAGS.train_epochs
    budget = getattr(recipe, "budget_factor", 1.0)
    calibrate = recipe_name == "fast_advprop" and FLAGS.budget_calibration
    if epochs and calibrate:
        epochs = epochs / budget
    train_steps = int(math.ceil(epochs * steps_per_epoch)) if epochs else FLAGS.train_steps
    run_epochs = train_steps / steps_per_epoch
    if FLAGS.lr_milestones:
        milestones = [float(m) for m in FLAGS.lr_milestones]
        if calibrate:
            milestones = [m / budget for m in milestones]
    else:
        milestones = [f * run_epochs for f in (relative_milestones or [])]
    if FLAGS.lr_schedule == "step" and not milestones:
        raise UsageError("--lr_schedule=step needs --lr_milestones (epochs)")
    if calibrate:
        print(f"fast_advprop budget calibration: epochs and milestones / {budget:.2f} -> "
              f"{run_epochs:.2f} epochs, milestones "
              f"{', '.join(f'{m:.2f}' for m in milestones) or 'none'}", file=sys.stderr)
    preprocessing = FLAGS.preprocessing or ("advprop" if recipe_name == "advprop"
                                            else "imagenet")

    name = FLAGS.model_name
    kwargs = {"image_size": image_size, "preprocessing": preprocessing}
    if FLAGS.width_multiplier != 1.0:
        if name.startswith("efficientnet"):
            raise UsageError(f"--width_multiplier applies to ResNets and NF-ResNets, not "
                             f"--model_name={name}")
        kwargs["width_multiplier"] = FLAGS.width_multiplier
    if is_normalizer_free(name):
        if recipe.num_aux:
            raise UsageError(f"--recipe={recipe_name} routes batch norms, and "
                             f"--model_name={name} has none (normalizer-free)")
        kwargs.update(dropout_rate=FLAGS.dropout_rate or 0.0,
                      drop_path_rate=FLAGS.drop_path_rate or 0.0)
    else:
        if recipe.num_aux and FLAGS.normalizer != "split_batch_norm":
            raise UsageError(f"--recipe={recipe_name} routes auxiliary batch norms; "
                             f"--normalizer={FLAGS.normalizer} has none (use "
                             "--mixture_bn=false for mbn_at's GN variant)")
        kwargs.update(normalizer=FLAGS.normalizer, num_aux=recipe.num_aux,
                      batch_norm_momentum=FLAGS.batch_norm_momentum,
                      batch_norm_epsilon=FLAGS.batch_norm_epsilon,
                      synchronized=sync_bn, sync_group_size=sync_group)
        if name.startswith("efficientnet"):
            kwargs.update(dropout_rate=FLAGS.dropout_rate, survival_prob=(
                FLAGS.survival_prob if FLAGS.survival_prob is not None else 0.8))
        else:
            kwargs.update(dropout_rate=FLAGS.dropout_rate or 0.0)
    if FLAGS.consistent_bn_epochs and recipe_name == "mbn_at":
        from efficientnet_advprop.recipes import consistent_bn_start_step
        recipe.consistent_bn_from_step = consistent_bn_start_step(
            train_steps, steps_per_epoch, FLAGS.consistent_bn_epochs)

    def model_fn():
        return build_model(name, num_classes, **kwargs)

    config = TrainConfig(
        model_dir=model_dir, train_steps=train_steps, global_batch_size=batch,
        steps_per_epoch=steps_per_epoch, optimizer=FLAGS.optimizer,
        base_learning_rate=FLAGS.base_learning_rate, lr_schedule=FLAGS.lr_schedule,
        lr_warmup_epochs=FLAGS.lr_warmup_epochs, lr_decay_epochs=FLAGS.lr_decay_epoch,
        lr_decay_factor=FLAGS.lr_decay_factor, lr_milestones=tuple(milestones),
        lr_batch_size=lr_batch_size, momentum=FLAGS.momentum, nesterov=FLAGS.nesterov,
        rmsprop_decay=FLAGS.rmsprop_decay, rmsprop_epsilon=FLAGS.rmsprop_epsilon,
        weight_decay=FLAGS.weight_decay, agc_clip=FLAGS.agc_clip,
        moving_average_decay=FLAGS.moving_average_decay,
        seed=FLAGS.seed, jit_compile=jit, iterations_per_loop=FLAGS.iterations_per_loop,
        precision=FLAGS.precision,
        checkpoint_every_steps=FLAGS.checkpoint_every_steps or steps_per_epoch,
        keep_checkpoints=FLAGS.keep_checkpoints,
        summary_every_steps=summary_every_steps(steps_per_epoch))
    os.makedirs(model_dir, exist_ok=True)
    trainer = Trainer(strategy, model_fn, recipe, config)
    print(f"{FLAGS.model_name} {recipe.describe()} | {info.name} {image_size}px | "
          f"batch {batch} x {train_steps} steps ({train_steps / steps_per_epoch:.2f} "
          f"epochs) | {strategy.num_replicas_in_sync} replica(s) "
          f"{type(strategy).__name__} | jit {jit} | {FLAGS.precision} | "
          f"{FLAGS.iterations_per_loop} step(s)/call | BN sync "
          f"{(sync_group or replicas) if sync_bn else 1} replica(s) | model_dir {model_dir}",
          file=sys.stderr)
    skipped = data.make_skip_counter() if FLAGS.skip_bad_records else None

    def train_dataset(ctx, start_step):
        return data.make_dataset(
            info, FLAGS.data_dir, "train",
            batch_size=ctx.get_per_replica_batch_size(batch), image_size=image_size,
            is_training=True, seed=FLAGS.seed, start_step=start_step,
            augmentation=augmentation, input_context=ctx, auto_augment=FLAGS.auto_augment,
            randaugment_layers=FLAGS.randaugment_layers,
            randaugment_magnitude=FLAGS.randaugment_magnitude,
            auto_augment_fraction=auto_augment_fraction,
            source_tags=recipe.needs_source_tags,
            skip_bad_records=FLAGS.skip_bad_records, skip_counter=skipped)

    def eval_dataset():
        return make_eval_dataset(info, image_size, augmentation, num_eval)

    if FLAGS.init_checkpoint:
        from efficientnet_advprop.models.init_checkpoint import init_from_checkpoint
        try:
            report = trainer.initialize_from(lambda model: init_from_checkpoint(
                model, FLAGS.init_checkpoint, aux_from_main=recipe.num_aux > 0))
        except (ValueError, OSError) as e:
            raise UsageError(f"--init_checkpoint={FLAGS.init_checkpoint}: {e}") from None
        if report is not None:
            skipped = ", ".join(f"{k} ({v})" for k, v in report["skipped"].items())
            print(f"initialised {len(report['loaded'])} layers from "
                  f"{FLAGS.init_checkpoint} ({report['source']}); skipped: "
                  f"{skipped or 'none'}", file=sys.stderr)

    if FLAGS.mode in ("train", "train_and_eval"):
        samples = next(iter(eval_dataset().unbatch().batch(4).take(1)))
        trainer.train(train_dataset, sample_images=(samples[0].numpy(),
                                                    samples[1].numpy()))
    else:
        if trainer.restore() == 0:
            raise UsageError(f"--model_dir={model_dir}: no checkpoint to evaluate")
    if FLAGS.mode == "eval_robustness":
        from efficientnet_advprop.attacks import float32_compute
        from efficientnet_advprop.evaluation import main_logits_fn

        swap = trainer.ema.swapped() if trainer.ema else _null()
        with swap, float32_compute(trainer.model):  # attacks are measured in float32
            return run_robustness(
                main_logits_fn(trainer.model), eval_dataset(), num_classes=num_classes,
                model=trainer.model, eval_dir=FLAGS.eval_dir or os.path.join(
                    model_dir, "robustness"), image_size=image_size,
                augmentation=augmentation, metadata={
                    "name": FLAGS.model_name, "recipe": recipe_name,
                    "checkpoint": f"{model_dir} (step {int(trainer.step.numpy())}"
                                  f"{', EMA weights' if trainer.ema else ''})",
                    "dataset": info.name, "image_size": image_size}, num_images=num_eval)

    results = {"model_name": FLAGS.model_name, "recipe": recipe_name,
               "dataset": info.name, "image_size": image_size,
               "step": int(trainer.step.numpy())}
    if trainer.images_per_second:
        results["train_images_per_second"] = round(trainer.images_per_second, 2)
    if skipped is not None:
        results["skipped_records"] = int(skipped.numpy())
        print(f"--skip_bad_records: dropped {results['skipped_records']} unreadable "
              f"training records (each time one was read)", file=sys.stderr)
    if FLAGS.mode in ("eval", "train_and_eval"):
        eval_eps = FLAGS.eval_epsilon or FLAGS.epsilon
        eval_attack = (eval_attack_config(eval_eps, FLAGS.eval_attack_iterations)
                       if FLAGS.eval_attack_iterations else None)
        swap = trainer.ema.swapped() if trainer.ema else _null()
        with swap:
            main = evaluate(trainer.model, eval_dataset(), strategy=strategy,
                            attack=eval_attack, bn_set=MAIN, seed=FLAGS.seed)
            results.update({"num_eval_images": main["num_examples"],
                            "clean_accuracy": main["clean_accuracy"]})
            if eval_attack is not None:
                results[f"pgd{eval_attack.iterations}_eps{eval_eps:g}_accuracy"] = (
                    main["adversarial_accuracy"])
            adv_set = recipe.attack_bn_set
            if recipe.num_aux and adv_set != MAIN:  # the adversarial BN set, alone
                aux = evaluate(trainer.model, eval_dataset(), strategy=strategy,
                               attack=eval_attack, bn_set=adv_set, seed=FLAGS.seed)
                results["aux_bn_clean_accuracy"] = aux["clean_accuracy"]
                if eval_attack is not None:
                    results[f"aux_bn_pgd{eval_attack.iterations}_eps{eval_eps:g}_accuracy"] = (
                        aux["adversarial_accuracy"])
        writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
        with writer.as_default(step=results["step"]):
            for k, v in results.items():
                if k.endswith("accuracy"):
                    tf.summary.scalar(k, v)
        with open(os.path.join(model_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print("held-out " + " | ".join(
            f"{k} {v:.4f}" for k, v in results.items() if k.endswith("accuracy")),
            file=sys.stderr)

    if FLAGS.export_dir:
        bn_set = recipe.attack_bn_set if FLAGS.export_bn_set == "adversarial" else MAIN
        swap = trainer.ema.swapped() if trainer.ema else _null()
        with swap:
            export.export_saved_model(trainer.model, FLAGS.export_dir, metadata={
                "model_name": FLAGS.model_name, "recipe": recipe_name,
                "preprocessing": preprocessing, "num_classes": num_classes,
                "class_names": list(info.class_names), "step": results["step"],
                "ema": bool(trainer.ema), "bn_set": bn_set}, eval_crop=augmentation,
                bn_set=bn_set)
        print(f"exported SavedModel (BN set {bn_set} only) to {FLAGS.export_dir}",
              file=sys.stderr)
    print(json.dumps(results))
    return results


def make_eval_dataset(info, image_size, augmentation, num_eval):
    """The held-out set, eval preprocessing, `num_eval` images at most."""
    from efficientnet_advprop import data

    ds = data.make_dataset(info, FLAGS.data_dir, "eval", batch_size=FLAGS.eval_batch_size,
                           image_size=image_size, is_training=False, seed=FLAGS.seed,
                           augmentation=augmentation)
    if num_eval < info.num_eval:
        ds = ds.unbatch().take(num_eval).batch(FLAGS.eval_batch_size)
    return ds


def _flag_list(name, cast=str, choices=None, all_values=None):
    """A list flag with 'none' (empty) and 'all' (every choice) as shorthands."""
    values = [v.strip() for v in (getattr(FLAGS, name) or []) if v.strip()]
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


def robustness_config(num_classes):
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
    iterations = FLAGS.eval_attack_iterations or 10
    try:
        return RobustnessConfig(
            epsilon=FLAGS.eval_epsilon or FLAGS.epsilon,
            attacks=_flag_list("robustness_attacks", choices=ATTACK_NAMES),
            pgd_iterations=iterations, apgd_iterations=FLAGS.apgd_iterations,
            mi_fgsm_iterations=iterations, cw_iterations=iterations,
            square_queries=FLAGS.square_queries,
            autoattack_version=FLAGS.autoattack_version,
            curve_iterations=_flag_list("curve_iterations", int),
            curve_targeted=FLAGS.curve_targeted, curve_epsilon=FLAGS.curve_epsilon,
            curve_step_size=FLAGS.curve_step_size,
            mbn_modes=_flag_list("mbn_modes", choices=MBN_MODES),
            mbn_gammas=_flag_list("mbn_gammas", float),
            mbn_layer_fraction=FLAGS.mbn_layer_fraction,
            properties=FLAGS.robustness_properties,
            corruptions=_flag_list("corruptions", choices=CORRUPTIONS,
                                   all_values=CORRUPTIONS),
            severities=_flag_list("corruption_severities", int),
            mce_baseline=baseline, seed=FLAGS.seed)
    except ValueError as e:
        raise UsageError(f"--mode=eval_robustness: {e}") from None


def shift_datasets(image_size, augmentation, num_classes):
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
            ds = shift.shift_dataset(name, path or None, batch_size=FLAGS.eval_batch_size,
                                     image_size=image_size, augmentation=augmentation,
                                     subset=subset)
        except (ValueError, OSError) as e:
            raise UsageError(f"--shift_datasets={spec}: {e}") from None
        if FLAGS.num_eval_images:
            ds = ds.unbatch().take(FLAGS.num_eval_images).batch(FLAGS.eval_batch_size)
        indices = {"imagenet_a": shift.imagenet_a_indices,
                   "imagenet_r": shift.imagenet_r_indices}.get(name)
        out[spec] = (ds, indices() if indices else None)
    return out


def run_robustness(logits_fn, dataset, *, num_classes, model, eval_dir, image_size,
                   augmentation, metadata, num_images):
    """--mode=eval_robustness: the suite, its report files, and the result dict."""
    from efficientnet_advprop.evaluation import evaluate_robustness, write_report

    config = robustness_config(num_classes)
    shifts = shift_datasets(image_size, augmentation, num_classes)
    print(f"robustness suite: eps {config.epsilon:g}, attacks "
          f"{', '.join(config.attacks) or 'none'}, curve {list(config.curve_iterations)}, "
          f"{len(config.corruptions)} corruptions x {len(config.severities)} severities "
          f"-> {eval_dir}", file=sys.stderr)
    result = evaluate_robustness(logits_fn, dataset, config, num_classes=num_classes,
                                 model=model, shift_datasets=shifts, metadata=metadata,
                                 num_batches=-(-num_images // FLAGS.eval_batch_size))
    paths = write_report(result, eval_dir)
    print("wrote " + ", ".join(paths), file=sys.stderr)
    summary = {k: result[k] for k in ("clean_accuracy", "worst_case_accuracy")
               if k in result}
    summary.update({k: v["accuracy"] for k, v in result.get("attacks", {}).items()})
    print(json.dumps(summary))
    return result


def run_saved_model_robustness(info):
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
    num_eval = min(FLAGS.num_eval_images or info.num_eval, info.num_eval)

    def logits_fn(x):
        return loaded.serving_default(x)["logits"]

    return run_robustness(
        logits_fn, make_eval_dataset(info, image_size, augmentation, num_eval),
        num_classes=num_classes, model=None,
        eval_dir=FLAGS.eval_dir or path.rstrip("/") + "_robustness",
        image_size=image_size, augmentation=augmentation, metadata={
            "name": meta.get("model_name", "saved model"), "recipe": meta.get("recipe"),
            "saved_model": path, "bn_set": meta.get("bn_set"), "dataset": info.name,
            "image_size": image_size}, num_images=num_eval)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv):
    if len(argv) > 1:
        print(f"main.py: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    # after absl handled --help
    from efficientnet_advprop.training import InputDataError, TrainingError

    try:
        run()
    except UsageError as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except InputDataError as e:
        print(f"main.py: error: --data_dir={_data_name()}: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 -- only undecodable input is answered here
        if not _is_bad_input_data(e):
            raise
        from efficientnet_advprop.training.trainer import op_error_reason

        print(f"main.py: error: --data_dir={_data_name()}: an image or record cannot be "
              f"read ({op_error_reason(e)})", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"main.py: training stopped: {e}", file=sys.stderr)
        sys.exit(1)


def _data_name():
    return FLAGS.data_dir or FLAGS.dataset or "(embedded)"


_BAD_DATA_MARKERS = ("image file format", "decode", "corrupted record", "truncated",
                     "Invalid JPEG", "Premature end")


def _is_bad_input_data(error):
    """An input-pipeline failure caused by the data itself (not by a program bug)."""
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
