"""The claims suite: which runs, at which scale, test which of the papers' claims.

A *run* is one training recipe under the tier's shared budget (model, optimizer,
schedule, epochs, augmentation) and the evaluations the claims need from it. A *claim*
compares runs (or two BN sets of one run); `efficientnet_advprop.claims.report` decides
from the runs' per-seed results whether it holds.

Choices the issue leaves open, written down here once:
- Every run of a tier shares one optimisation recipe (SGD Nesterov, cosine, label
  smoothing 0.1, no EMA, CIFAR crop + flip, no AutoAugment): the claims are paired
  comparisons, so only the training method differs. The papers' own ImageNet settings
  (RMSProp + AutoAugment for AdvProp, 90-105 epochs) do not fit a CPU budget.
- Attacks are cheapened, not weakened in kind: the eps-4 and eps-8 training attacks are
  PGD-1 from a random start with step 1.25 eps (Wong et al. 2020's "fast" adversarial
  training); AdvProp's PGD-1 at eps 1 (step 1) and Fast AdvProp's defaults are the
  papers' own. Evaluation uses PGD-10 (step 2.5 eps / 10, random start) through the
  main BNs in inference mode.
- Fast AdvProp at the cpu tier's 128 clean images draws 160: 32 adversarial images, in
  the reference's 4-GPU layout at half its batch (4 BN groups of 32 clean + 8
  adversarial; the reference: 64 + 16). Its shuffle moves every image out of its group,
  which needs at least 3 groups, so groups of 16 (2 groups) cannot be used here.
- NoFrost vs BN-SAT: both use the bottleneck ResNet-26 at the tier's width (the BN one
  with separate clean/adversarial forwards, as NoFrost's SAT(BN) baseline), loss
  (1 - lambda) CE(clean) + lambda CE(adv) with lambda 0.5.
"""

import dataclasses

# ----------------------------------------------------------------- the tiers
@dataclasses.dataclass(frozen=True)
class Tier:
    """One scale of the suite.

    data: "split" (the 45,000 / 5,000 CIFAR-10 split built from ../shared/data) or
      "embedded" (the package's 15,000 / 2,000 subset; the smoke tier).
    width: width multiplier of every model; model / pair_model: the BN model of the
      AdvProp claims and the BN/NF pair of the NoFrost claim.
    epochs: training epochs of every run (Fast AdvProp's are calibrated by its budget).
    train_steps: a fixed step count instead (smoke tier), None otherwise.
    curve_images / eval_images / attack_images / corruption_images / mbn_images:
      held-out images of the per-epoch curve, the final clean accuracy, the final
      PGD-10 evaluation, the corruption error and the MBN interpolation sweep.
    corruptions / severities: the generated CIFAR-10-C-style corruptions evaluated.
    eval_iterations: PGD steps of the evaluation attack.
    min_bn_batch: the smallest BN batch allowed (only the smoke tier lowers it).
    recipe_options: ((recipe, ((setting, value), ...)), ...) set for that recipe's runs
      (Fast AdvProp's shuffle-BN groups, which the smaller tiers' batches need).
    iterations_per_loop: training steps per compiled call (1 on a GPU: one small
      program to compile, and the JAX engine dispatches the next call before reading
      the last, so the device does not wait for the host).
    precision: float32 (the CPU tier), or bfloat16 (the mixed_bfloat16 policy: bfloat16
      compute, float32 variables) on the GPU tiers, as accelerators train.
    runs: the runs of the suite this tier makes (None: all of them).
    """

    name: str
    data: str
    model: str
    pair_models: tuple
    width: float
    batch_size: int
    epochs: float
    seeds: tuple
    base_learning_rate: float
    weight_decay: float
    warmup_epochs: float
    curve_images: int
    eval_images: int
    attack_images: int
    corruption_images: int
    mbn_images: int
    corruptions: tuple
    severities: tuple
    eval_iterations: int = 10
    mbn_gammas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    train_steps: int = None
    min_bn_batch: int = 16
    recipe_options: tuple = ()
    iterations_per_loop: int = 10
    budget: str = ""
    precision: str = "float32"
    runs: tuple = None

    @property
    def bn_model(self):
        return self.pair_models[0]

    @property
    def nf_model(self):
        return self.pair_models[1]


ALL_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression")

TIERS = {
    # A few steps of every run on the embedded data: keeps the suite from rotting
    # (tests/test_claims.py runs it); its numbers mean nothing.
    "smoke": Tier(
        name="smoke", data="embedded", model="resnet-18-cifar",
        pair_models=("resnet-26-cifar", "nf-resnet-26-cifar"), width=0.125,
        batch_size=32, epochs=1.0, train_steps=2, seeds=(0,), base_learning_rate=0.4,
        weight_decay=5e-4, warmup_epochs=0.0, curve_images=32, eval_images=64,
        attack_images=32, corruption_images=32, mbn_images=32,
        corruptions=("gaussian_noise", "contrast"), severities=(3,), eval_iterations=2,
        mbn_gammas=(0.0, 0.5, 1.0), min_bn_batch=2, iterations_per_loop=1,
        recipe_options=(("fast_advprop", (("shuffle_bn_group_size", 2),)),),
        budget="2 steps per run"),
    # This 2-core CPU, 2 seeds (docs/reproducing.md, "Cost").
    "cpu": Tier(
        name="cpu", data="split", model="resnet-18-cifar",
        pair_models=("resnet-26-cifar", "nf-resnet-26-cifar"), width=0.125,
        batch_size=128, epochs=4.0, seeds=(0, 1), base_learning_rate=0.4,
        weight_decay=5e-4, warmup_epochs=0.5, curve_images=1000, eval_images=5000,
        attack_images=1000, corruption_images=500, mbn_images=500,
        corruptions=ALL_CORRUPTIONS, severities=(1, 2, 3, 4, 5),
        recipe_options=(("fast_advprop", (("shuffle_bn_group_size", 8),
                                          ("min_bn_batch", 8))),),
        budget="4 epochs of 45,000 images per run"),
    # One GPU (scripts/reproduce_claims.py --tier=gpu --engine=jax through the device
    # tool: the GPUs lent have no TensorFlow, results/device/2026-11-26-h100-probe.md),
    # 3 seeds, every run in one process. Sized before any GPU ran it, from XLA's count
    # of each step's operations (docs/reproducing.md, "Sizing the GPU tiers"): 17.6
    # PFLOP for the tier, about 5 minutes of training at 60 TFLOP/s sustained, plus
    # compilation; a call cut short by --time_budget_s resumes in the next.
    "gpu": Tier(
        name="gpu", data="split", model="resnet-18-cifar",
        pair_models=("resnet-26-cifar", "nf-resnet-26-cifar"), width=0.5,
        batch_size=256, epochs=10.0, seeds=(0, 1, 2), base_learning_rate=0.4,
        weight_decay=5e-4, warmup_epochs=0.5, curve_images=1000, eval_images=5000,
        attack_images=2000, corruption_images=1000, mbn_images=1000,
        corruptions=ALL_CORRUPTIONS, severities=(1, 2, 3, 4, 5), iterations_per_loop=1,
        precision="bfloat16", budget="10 epochs of 45,000 images per run"),
}
# The AdvProp claims' three runs on the full-width ResNet-18 (11 M parameters) for 15
# epochs, where vanilla is expected past 90% held-out: 27.6 PFLOP, about 4 minutes of
# training at 120 TFLOP/s sustained. Otherwise the gpu tier.
TIERS["gpu_wide"] = dataclasses.replace(
    TIERS["gpu"], name="gpu_wide", width=1.0, epochs=15.0,
    runs=("vanilla", "advprop_eps1", "fast_advprop"),
    budget="15 epochs of 45,000 images per run, full width")


# ------------------------------------------------------------------ the runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the suite.

    recipe: the --recipe; pair: trains the tier's BN/NF pair model ("bn" or "nf")
      instead of the tier's model; overrides: config settings beyond the tier's shared
      ones; evals: the evaluations the claims need, names from EVALS.
    eval_epsilon: radius of the final PGD evaluation (and the MBN sweep).
    """

    name: str
    recipe: str
    title: str
    overrides: tuple = ()
    pair: str = None
    eval_epsilon: float = 4.0
    evals: tuple = ("clean",)


EVALS = ("clean", "aux", "pgd", "corruptions", "bn_stats", "mbn")


def _fast_attack(eps):
    """PGD-1 from a random start, step 1.25 eps (the 'fast' adversarial training)."""
    return (("epsilon", float(eps)), ("attack_iterations", 1),
            ("attack_step_size", 1.25 * eps))


RUNS = (  # in the order they run: the cheap pairs of claims first
    RunSpec("vanilla", "vanilla", "vanilla (clean images only)",
            evals=("clean", "pgd", "corruptions")),
    RunSpec("advprop_eps1", "advprop", "AdvProp, PGD-1 eps 1 step 1 (the paper's small-model attack)",
            overrides=(("epsilon", 1.0), ("attack_iterations", 1), ("attack_step_size", 1.0)),
            evals=("clean", "aux", "pgd", "corruptions", "bn_stats")),
    RunSpec("fast_advprop", "fast_advprop",
            "Fast AdvProp (p_adv 0.2, K 1, eps 1), budget-calibrated epochs",
            evals=("clean", "aux", "pgd", "corruptions")),
    RunSpec("advprop_eps4", "advprop", "AdvProp, eps 4 (PGD-1, step 5)",
            overrides=_fast_attack(4), evals=("clean", "aux", "pgd", "bn_stats", "mbn")),
    RunSpec("sat_eps4", "sat", "adversarial training, shared BN, joint forward, eps 4 (PGD-1, step 5)",
            overrides=_fast_attack(4), evals=("clean", "pgd")),
    RunSpec("bn_sat_eps8", "bn_sat", "BN-ResNet-26 + SAT(BN), separate forwards, eps 8 (PGD-1, step 10)",
            overrides=_fast_attack(8), pair="bn", eval_epsilon=8.0, evals=("clean", "pgd")),
    RunSpec("nofrost_eps8", "nofrost", "NF-ResNet-26 + SAT (NoFrost), eps 8 (PGD-1, step 10)",
            overrides=_fast_attack(8), pair="nf", eval_epsilon=8.0, evals=("clean", "pgd")),
)
# NoFrost's own optimiser: lr 0.1 per 256 and weight decay 5e-5 (Wang et al. 2022 §4.1),
# SGD Nesterov as every run of a tier (Nesterov is its code's, PGDAT.py); its head
# dropout and drop-path are left out, as in every run of a tier.
NOFROST_OPTIMIZER = (("base_learning_rate", 0.1), ("weight_decay", 5e-5))

# Runs that no claim reads. Not in the default suite; run them with --runs=NAME,... (and
# --seeds=0 for one seed).
# - The NoFrost pair's two models on clean images only: how fast each architecture
#   learns at the tier's budget, apart from what adversarial training costs it.
# - The NoFrost pair again with NoFrost's optimiser instead of the tier's shared one
#   (lr 0.4 per 256, weight decay 5e-4, chosen for the BN ResNets of the other claims).
# The stage gains of the unit-variance control are set by the runner from one batch of
# the training split (runner.fit_gains_on_training_batch), not written here.
FIT_ON_TRAINING_BATCH = "fit"
DIAGNOSTICS = (
    RunSpec("vanilla_bn26", "vanilla", "control: BN-ResNet-26 on clean images only",
            pair="bn", eval_epsilon=8.0, evals=("clean", "pgd")),
    RunSpec("vanilla_nf26", "vanilla", "control: NF-ResNet-26 on clean images only",
            pair="nf", eval_epsilon=8.0, evals=("clean", "pgd")),
    RunSpec("nofrost_eps8_paper_optim", "nofrost",
            "NF-ResNet-26 + SAT (NoFrost), eps 8, NoFrost's lr 0.1/256 and wd 5e-5",
            overrides=_fast_attack(8) + NOFROST_OPTIMIZER, pair="nf", eval_epsilon=8.0,
            evals=("clean", "pgd")),
    RunSpec("bn_sat_eps8_paper_optim", "bn_sat",
            "BN-ResNet-26 + SAT(BN), eps 8, NoFrost's lr 0.1/256 and wd 5e-5",
            overrides=_fast_attack(8) + NOFROST_OPTIMIZER, pair="bn", eval_epsilon=8.0,
            evals=("clean", "pgd")),
    # Issue 24's question: is the NF-ResNet slow because its activations start far
    # below the unit variance its betas assume (stages at 0.56 / 0.24 / 0.12 / 0.06 at
    # width 1/8 on CIFAR-10, with timm's stem gain), not because it has no BN? The same
    # nofrost_eps8 run with gains set from one training batch so that the stem and
    # every stage's first block start at variance 1 (models.signal.fit_stage_gains).
    RunSpec("nofrost_eps8_unit_var", "nofrost",
            "control: NF-ResNet-26 + SAT (NoFrost), eps 8, stage gains set from one "
            "training batch (unit variance at init)",
            overrides=_fast_attack(8) + (("nf_stage_gains", FIT_ON_TRAINING_BATCH),),
            pair="nf", eval_epsilon=8.0, evals=("clean", "pgd")),
)
RUNS_BY_NAME = {r.name: r for r in RUNS + DIAGNOSTICS}


def drawn_batch(recipe_name, clean_batch):
    """The batch the recipe (with its paper's options) draws to train on `clean_batch`
    clean images (`Recipe.drawn_batch`)."""
    from efficientnet_advprop.recipes import RECIPES

    return RECIPES[recipe_name].from_options(10).drawn_batch(clean_batch)


def tier_overrides(tier, run, seed, data_dir, model_dir):
    """The config overrides (efficientnet_advprop.config.resolve) of one run."""
    model = {"bn": tier.bn_model, "nf": tier.nf_model}.get(run.pair, tier.model)
    batch = drawn_batch(run.recipe, tier.batch_size)
    out = {
        "recipe": run.recipe, "model_name": model, "width_multiplier": tier.width,
        "train_batch_size": batch, "optimizer": "momentum", "nesterov": True,
        "momentum": 0.9, "base_learning_rate": tier.base_learning_rate,
        "lr_schedule": "cosine", "lr_warmup_epochs": tier.warmup_epochs,
        "lr_warmup_start": "zero", "weight_decay": tier.weight_decay,
        "label_smoothing": 0.1, "moving_average_decay": 0.0, "dropout_rate": 0.0,
        "drop_path_rate": 0.0, "augmentation": "cifar", "auto_augment": None,
        "seed": int(seed), "model_dir": model_dir, "min_bn_batch": tier.min_bn_batch,
        "iterations_per_loop": tier.iterations_per_loop, "precision": tier.precision,
        "eval_attack_iterations": 0, "summary_every_steps": 100,
    }
    if model.startswith("resnet"):
        out["batch_norm_momentum"] = 0.9  # the ResNet papers' BN (MBN-AT), every run
    if tier.train_steps:
        out["train_steps"] = tier.train_steps
    else:
        out["train_epochs"] = tier.epochs
    if data_dir:
        out["data_dir"] = data_dir
    out.update(dict(run.overrides))
    out.update(dict(dict(tier.recipe_options).get(run.recipe, ())))
    return out


# ---------------------------------------------------------------- the claims
@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim and the runs it needs (see report.CHECKS for the test)."""

    key: str
    title: str
    paper: str
    runs: tuple


CLAIMS = (
    Claim("disentangled_bn", "Disentangled BN preserves clean accuracy",
          "AdvProp beats adversarial training with shared BN on clean ImageNet by "
          "+0.9 (B0) to +0.1 (B7); with ResNet-50..200 shared-BN training loses "
          "1.4-3.2 points to vanilla (Xie et al. 2020)",
          ("advprop_eps4", "sat_eps4")),
    Claim("aux_bn_worse", "Auxiliary BN is worse on clean images",
          "main BN beats auxiliary BN on clean ImageNet by 3.4 (B0) to 1.9 (B7) points "
          "(Xie et al. 2020, Table 3)", ("advprop_eps1", "advprop_eps4")),
    Claim("advprop_vs_vanilla", "AdvProp (PGD-1, eps 1) improves on vanilla",
          "B0 77.6 with PGD-1 (ResNet-50..200 +0.4..+0.8 over vanilla with PGD5 eps 4, "
          "Table 8); lower ImageNet-C error (Xie et al. 2020)", ("vanilla", "advprop_eps1")),
    Claim("fast_advprop_cost", "Fast AdvProp at vanilla's cost",
          "ResNet-50 76.2 -> 76.5 clean, mCE 58.5 -> 56.4 at 1x the vanilla budget "
          "(Mei et al. 2022)", ("vanilla", "fast_advprop")),
    Claim("bn_statistics", "Adversarial and clean BN statistics differ; MBN interpolation "
          "trades clean accuracy for robustness",
          "adversarial images give larger running means and variances (Xie & Yuille "
          "2020, Fig. 5); gamma interpolation moves monotonically from clean to robust "
          "(Wang et al. 2022, MBNAT baseline)", ("advprop_eps4",)),
    Claim("nofrost", "NoFrost: normalizer-free SAT keeps clean accuracy at comparable robustness",
          "ResNet-50, eps 8: NoFrost 74.06 clean / 22.45 PGD vs SAT(BN) 59.28 / 13.57 "
          "(Wang et al. 2022)", ("nofrost_eps8", "bn_sat_eps8")),
)
CLAIMS_BY_KEY = {c.key: c for c in CLAIMS}
