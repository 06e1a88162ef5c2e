"""NoFrost and NoFrost* (Wang et al., "Removing Batch Normalization Boosts Adversarial
Training", ICML 2022).

NoFrost is standard adversarial training of a normalizer-free network (NF-ResNet):
  1. x_adv = untargeted PGD-10, eps 8, step 1, uniform random start, model in
     inference mode (the attack never changes anything in the model).
  2. loss = (1 - lambda) * CE(f(x), y) + lambda * CE(f(x_adv), y), lambda = 0.5, with the
     clean and the adversarial images in *separate* forward passes (with a BN model
     that means separate batch statistics; with an NF model it is only how the batch is
     computed).
AGC and the optimiser (SGD Nesterov, cosine) are the loop's business; their values are
the `paper` table below (NOFROST_SETTINGS), at NoFrost's batch of 256. NoFrost §4.1
trains every baseline of its tables with the same settings: `bn_sat` (SAT of a BN
network with separate forwards, NoFrost's "SAT (BN)"), `trades` (beta 1), `fat` and
`trades_fat` use them too; their BN ResNets start with the last BN of every residual
branch at zero, as the released code builds them. `nofrost` and `nofrost_star` train
NoFrost's NF-ResNet (nf-resnet-50 by default) and refuse a network with batch norm.
AGC: the released NoFrost code does not clip (agc_clip 0); the NFNet paper does.

NoFrost* adds an augmented view for out-of-distribution robustness: the loss is the
mean of CE over the clean, the augmented and the adversarial views, where the
augmented view is DeepAugment-style for the first half of the batch and texture-
debiased augmentation (TDA) for the second half ("half each").
"""

from keras import ops

from efficientnet_advprop import seam
from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.base import (Cite, Option, Recipe, RecipeOutput, as_context,
                                               batch_metrics)

NOFROST_ATTACK = AttackConfig(attacker="pgd", epsilon=8.0, step_size=1.0, num_iter=10)
PAPER = "Wang et al. 2022"
REFERENCE = "amazon-science/normalizer-free-robust-training"
CODE = f"{REFERENCE} PGDAT.py"
# The training settings of NoFrost and of every baseline in its tables. Values from the
# paper (§4.1, "Batch size is 256", lr 0.1, SGD momentum 0.9, weight decay 5e-5, cosine,
# PGD-10 at eps 8) are cited as the paper; values that only its released code sets are
# cited as the code (PGDAT.py's argument defaults and optimiser).
NOFROST_SETTINGS = {
    "optimizer": Cite("momentum", f"{PAPER} §4.1: SGD"),
    "momentum": Cite(0.9, f"{PAPER} §4.1: momentum 0.9"),
    "nesterov": Cite(True, f"{CODE}: SGD(..., nesterov=True)"),
    "train_batch_size": Cite(256, f"{PAPER} §4.1: 'Batch size is 256'"),
    "base_learning_rate": Cite(0.1, f"{PAPER} §4.1: lr 0.1 (per 256, {CODE}: lr *= "
                                    "batch_size / 256)"),
    "weight_decay": Cite(5e-5, f"{PAPER} §4.1: weight decay 5e-5"),
    "lr_schedule": Cite("cosine", f"{PAPER} §4.1: cosine"),
    "lr_warmup_epochs": Cite(0.0, f"{CODE}: CosineAnnealingLR, no warm-up"),
    "train_epochs": Cite(90.0, f"{PAPER} §4.1: 90 epochs"),
    "label_smoothing": Cite(0.1, f"{CODE}: --smoothing 0.1"),
    "moving_average_decay": Cite(0.0, f"{CODE}: no weight EMA"),
    "agc_clip": Cite(0.0, f"{CODE}: no AGC"),
    "epsilon": Cite(8.0, f"{PAPER} §4.1: eps 8"),
    "attack_step_size": Cite(1.0, f"{CODE}: step auto = min(1.25 eps, eps + 4) / steps = "
                                  "1 at eps 8, PGD-10"),
    "attack_iterations": Cite(10, f"{PAPER} §4.1: PGD-10"),
    "targeted_attack": Cite(False, f"{PAPER} §4.1: untargeted"),
    "dropout_rate": Cite(0.25, f"{CODE}: --drop 0.25 (head dropout)"),
    "drop_path_rate": Cite(0.1, f"{CODE}: --drop_path 0.1"),
}
# ... and for the baselines, whose networks have batch norm: the code zero-initialises
# the last BN of every residual branch (BN ResNets; not applicable to other families).
BN_BASELINE_SETTINGS = {
    **NOFROST_SETTINGS,
    "zero_init_last_bn": Cite(True, f"{CODE}: create_model(..., zero_init_last_bn=True) "
                                    "for its BN models"),
}
LAMBDA = Option("clean_loss_weight", Cite(0.5, f"{PAPER} §4.1: lambda 0.5"),
                "Weight of the clean loss (1 - lambda); the adversarial one gets lambda.",
                0.0, 1.0, arg="adv_weight", to_arg=lambda clean: 1.0 - clean)


class NoFrost(Recipe):
    name = "nofrost"
    title = "NoFrost: SAT of a normalizer-free network (Wang et al., ICML 2022)"
    paper = {**NOFROST_SETTINGS,
             "model_name": Cite("nf-resnet-50", f"{PAPER} §4.1: NF-ResNet-50 ({CODE}: "
                                                "timm nf_resnet50)")}
    # NoFrost *is* the normalizer-free network: a BN model is refused (use bn_sat).
    normalizer_free_only = True
    options = (LAMBDA,)

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, adv_weight=0.5):
        super().__init__(num_classes, label_smoothing)
        if not 0.0 <= adv_weight <= 1.0:
            raise ValueError(f"adversarial loss weight (lambda) must be in [0, 1], got "
                             f"{adv_weight}")
        self.attack = attack or NOFROST_ATTACK
        self.adv_weight = float(adv_weight)

    def _forward(self, model, images, labels, prefix, metrics):
        with bn_route(MAIN):
            logits = model(images, training=True)
        per_sample = self.loss(labels, logits)
        metrics.update(batch_metrics(prefix, labels, logits, per_sample))
        return ops.sum(per_sample)

    def compute(self, model, images, labels, ctx):
        ctx = as_context(ctx)
        adv = attack_model(model, images, labels, self.attack, bn_set=MAIN,
                           num_classes=self.num_classes, seed=ctx.fold(0))
        metrics = {}
        clean = self._forward(model, images, labels, "clean", metrics)
        robust = self._forward(model, ops.cast(adv, images.dtype), labels, "adversarial",
                               metrics)
        return RecipeOutput(loss_sum=(1.0 - self.adv_weight) * clean
                            + self.adv_weight * robust, metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + 2.0

    def describe(self):
        a = self.attack
        return (f"{self.name} (lambda {self.adv_weight:g}, PGD-{a.iterations} eps "
                f"{a.epsilon:g} step {a.step_size:g}, separate forwards)")


def augmented_view(images, seed, tda_images):
    """NoFrost*'s augmented view of a batch: DeepAugment-style of the first half of
    `images` (a random network drawn from `seed`), then the second half of
    `tda_images` -- the input pipeline's texture-debiased views of the same images
    (same shape as `images`). Returns float32, the shape of `images`.

    As in the reference code (amazon-research/normalizer-free-robust-training), TDA is
    made from the decoded image -- random resized crop with scale (0.64, 1) of the
    original picture, flip, colour distortion -- not from the already cropped training
    image: NoFrostStar declares `input_views = ("tda",)` and reads
    `ctx.extras["tda_images"]` (`InputOptions(extra_views=recipe.input_views)`;
    `efficientnet_advprop.data.tda.tda_view`). DeepAugment-style runs here, in the step,
    on the training batch."""
    from efficientnet_advprop.data.deepaugment import deep_augment

    images = ops.cast(images, "float32")
    tda_images = ops.cast(tda_images, "float32")
    if not _compatible_shapes(images.shape, tda_images.shape):
        raise ValueError(f"tda_images {tuple(tda_images.shape)} must have the shape of the "
                         f"images {tuple(images.shape)}")
    half = images.shape[0] // 2
    deep = deep_augment(images[:half], seam.fold_in(seed, 0))
    return ops.concatenate([deep, tda_images[half:]], axis=0)


def _compatible_shapes(a, b):
    """Static shapes that may describe the same tensor (None matches any size)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


class NoFrostStar(NoFrost):
    name = "nofrost_star"
    title = "NoFrost*: NoFrost with an augmented view (Wang et al., ICML 2022)"
    input_views = ("tda",)

    def compute(self, model, images, labels, ctx):
        ctx = as_context(ctx)
        tda_images = ctx.extras.get("tda_images")
        if tda_images is None:
            raise ValueError(
                "nofrost_star needs the TDA view of each image from the input pipeline "
                "(StepContext.extras['tda_images'], missing): build the training data "
                "with InputOptions(extra_views=recipe.input_views), i.e. "
                "extra_views=('tda',)")
        adv = attack_model(model, images, labels, self.attack, bn_set=MAIN,
                           num_classes=self.num_classes, seed=ctx.fold(0))
        augmented = augmented_view(images, ctx.fold(1), tda_images)
        metrics = {}
        total = (self._forward(model, images, labels, "clean", metrics)
                 + self._forward(model, ops.cast(augmented, images.dtype), labels,
                                 "augmented", metrics)
                 + self._forward(model, ops.cast(adv, images.dtype), labels, "adversarial",
                                 metrics))
        return RecipeOutput(loss_sum=total / 3.0, metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + 3.0

    def describe(self):
        a = self.attack
        return (f"nofrost_star (mean of clean, DeepAugment/TDA and PGD-{a.iterations} "
                f"eps {a.epsilon:g} views, separate forwards)")
