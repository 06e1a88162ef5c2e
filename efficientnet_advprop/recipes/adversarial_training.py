"""Adversarial training with one (shared) set of BNs: the baselines of the papers.

sat       AdvProp's shared-BN baseline (Xie et al. 2020, §5.3 and Table 8): loss =
          CE(clean) + CE(adv) -- the paper's Eq. 2, "arg min E[L(theta, x, y) + max
          L(theta, x + eps, y)]", weight 1 each -- with clean and adversarial images in
          ONE joint forward, normalised *together* by the one set of BNs, and AdvProp's
          attacker for that comparison: "We choose the PGD5 (eps=4) as the default
          attacker" (§5.3), targeted like AdvProp's (advprop.py). AdvProp's EfficientNet
          settings otherwise, so that a comparison with advprop isolates the BNs.
          `sat_clean_weight` scales the clean term (Goodfellow et al.'s alpha mix is
          sat_clean_weight=1 at half the learning rate).
bn_sat    NoFrost's "SAT (BN)" baseline: (1 - lambda) CE(clean) + lambda CE(adv),
          lambda = 0.5, with the clean and the adversarial images in SEPARATE forwards
          (separate batch statistics), untargeted PGD-10, NoFrost's settings, and the
          last BN of every residual branch initialised to zero as NoFrost's code builds
          its BN baselines (amazon-science/normalizer-free-robust-training, PGDAT.py:
          zero_init_last_bn=True for the BN ResNets). Compare nofrost with this one.
madry_at  Madry et al. (2018): adversarial images only, loss = CE(adv).
fat       Zhang et al. (2020): madry_at on early-stopped ("friendly") PGD examples, with
          NoFrost's settings (a baseline of its tables).

The attack runs through the shared (main) BNs.
"""

import dataclasses

from keras import ops

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.advprop import ADVPROP, EFFICIENTNET_RECIPE, TARGETED
from efficientnet_advprop.recipes.base import (Cite, Option, Recipe, RecipeOutput, as_context,
                                               batch_metrics)
from efficientnet_advprop.recipes.nofrost import BN_BASELINE_SETTINGS, LAMBDA
from efficientnet_advprop.recipes.nofrost import PAPER as NOFROST

SAT_CLEAN_WEIGHT = Option(
    "sat_clean_weight", Cite(1.0, f"{ADVPROP} Eq. 2: L(clean) + max L(adv), weight 1 each"),
    "Weight of sat's clean loss; the adversarial loss keeps weight 1.", 0.0, None,
    arg="clean_weight")
# AdvProp's shared-BN baseline attacker (§5.3): targeted PGD5, eps 4, step 1.
SAT_ATTACK = AttackConfig(epsilon=4.0, step_size=1.0, targeted=True)


class StandardAdversarialTraining(Recipe):
    name = "sat"
    title = "AdvProp's shared-BN adversarial training baseline (one joint forward)"
    # AdvProp's settings, so that a comparison with advprop isolates the BNs.
    preferred_preprocessing = "advprop"
    paper = {
        **EFFICIENTNET_RECIPE,
        "auto_augment": Cite("v0", f"{ADVPROP} §5.4: AutoAugment by default; the "
                                   "baseline is trained under AdvProp's settings"),
        "epsilon": Cite(4.0, f"{ADVPROP} §5.3: 'We choose the PGD5 (eps=4) as the default "
                             "attacker'"),
        "attack_iterations": Cite(None, f"{ADVPROP} §5.3: PGD5 (n = eps + 1 = 5)"),
        "attack_step_size": Cite(1.0, f"{ADVPROP} §5.1: step size 1"),
        "targeted_attack": Cite(True, TARGETED),
    }
    options = (SAT_CLEAN_WEIGHT,)

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, clean_weight=1.0,
                 adv_weight=1.0):
        super().__init__(num_classes, label_smoothing)
        if not clean_weight >= 0.0 or not adv_weight >= 0.0:
            raise ValueError(f"loss weights must be >= 0, got clean {clean_weight}, "
                             f"adversarial {adv_weight}")
        self.attack = attack or SAT_ATTACK
        self.clean_weight = float(clean_weight)
        self.adv_weight = float(adv_weight)

    def compute(self, model, images, labels, ctx):
        adv = attack_model(model, images, labels, self.attack, bn_set=MAIN,
                           num_classes=self.num_classes, seed=as_context(ctx).seed)
        if self.clean_weight == 0.0:
            with bn_route(MAIN):
                adv_logits = model(adv, training=True)
            adv_loss = self.loss(labels, adv_logits)
            return RecipeOutput(
                loss_sum=self.adv_weight * ops.sum(adv_loss),
                metrics=batch_metrics("adversarial", labels, adv_logits, adv_loss))
        batch = ops.shape(images)[0]
        with bn_route(MAIN):  # one BN set for the mixed batch: the shared-BN baseline
            logits = model(ops.concatenate([ops.cast(images, adv.dtype), adv], axis=0),
                           training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, batch)
        return RecipeOutput(
            loss_sum=(self.clean_weight * ops.sum(clean_loss)
                      + self.adv_weight * ops.sum(adv_loss)),
            metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + (2.0 if self.clean_weight > 0 else 1.0)

    def bn_batches(self, local_batch, num_replicas=1):
        if self.clean_weight == 0.0:
            return {"adversarial": local_batch}
        return {"clean and adversarial, shared BN": 2 * local_batch}

    def describe(self):
        a = self.attack
        return (f"{self.name} ({self.clean_weight:g} CE(clean) + {self.adv_weight:g} "
                f"CE(adv) in one forward, shared BN; "
                f"{'targeted' if a.targeted else 'untargeted'} PGD-{a.iterations} eps "
                f"{a.epsilon:g} step {a.step_size:g})")


class SeparateForwardAdversarialTraining(StandardAdversarialTraining):
    """NoFrost's SAT (BN): (1 - lambda) CE(clean) + lambda CE(adv), clean and
    adversarial images in separate forwards through the one BN set."""

    name = "bn_sat"
    title = "NoFrost's SAT (BN) baseline: separate clean and adversarial forwards"
    paper = BN_BASELINE_SETTINGS
    options = (LAMBDA,)

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, adv_weight=0.5):
        if not 0.0 <= adv_weight <= 1.0:
            raise ValueError(f"adversarial loss weight (lambda) must be in [0, 1], got "
                             f"{adv_weight}")
        super().__init__(num_classes, attack or AttackConfig(epsilon=8.0, num_iter=10),
                         label_smoothing, clean_weight=1.0 - adv_weight,
                         adv_weight=adv_weight)

    def compute(self, model, images, labels, ctx):
        adv = attack_model(model, images, labels, self.attack, bn_set=MAIN,
                           num_classes=self.num_classes, seed=as_context(ctx).seed)
        metrics, total = {}, 0.0
        for prefix, x, weight in (("clean", images, self.clean_weight),
                                  ("adversarial", adv, self.adv_weight)):
            with bn_route(MAIN):  # one forward each: separate batch statistics
                logits = model(ops.cast(x, images.dtype), training=True)
            per_sample = self.loss(labels, logits)
            metrics.update(batch_metrics(prefix, labels, logits, per_sample))
            total += weight * ops.sum(per_sample)
        return RecipeOutput(loss_sum=total, metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + 2.0

    def bn_batches(self, local_batch, num_replicas=1):
        return {"clean": local_batch, "adversarial": local_batch}

    def describe(self):
        a = self.attack
        return (f"bn_sat (lambda {self.adv_weight:g}, PGD-{a.iterations} eps {a.epsilon:g} "
                f"step {a.step_size:g}, separate clean/adversarial forwards)")


class MadryAdversarialTraining(StandardAdversarialTraining):
    name = "madry_at"
    title = "Madry et al. (2018): adversarial images only"
    paper = {
        "epsilon": Cite(8.0, "Madry et al. 2018 (CIFAR-10): eps 8"),
        "attack_step_size": Cite(2.0, "Madry et al. 2018 (CIFAR-10): step 2"),
        "attack_iterations": Cite(7, "Madry et al. 2018 (CIFAR-10): 7 steps"),
    }
    options = ()

    def __init__(self, num_classes, attack=None, label_smoothing=0.1):
        attack = attack or AttackConfig(epsilon=8.0, step_size=2.0, num_iter=7)
        super().__init__(num_classes, attack, label_smoothing, clean_weight=0.0,
                         adv_weight=1.0)


class FriendlyAdversarialTraining(StandardAdversarialTraining):
    """FAT (Zhang et al., ICML 2020): Madry's loss on "friendly" adversarial examples.

    The PGD attack stops moving an image `early_stop_tau` steps after the model first
    misclassifies it (tau = 1 by default, the "early-stopped PGD, 1 step" of the
    NoFrost tables; the FAT paper studies tau in 0..3). Everything else is madry_at.
    The start is uniform in the eps-ball, as in the FAT reference code's PGD.
    """

    name = "fat"
    title = "FAT, friendly adversarial training (Zhang et al., ICML 2020)"
    paper = BN_BASELINE_SETTINGS  # a baseline of NoFrost's tables, trained as they say
    options = (Option("early_stop_tau", Cite(1, f"{NOFROST} tables: early-stopped PGD, "
                                                "1 step"), "Steps an image may take after "
                      "it is first misclassified.", 0, None),)

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, early_stop_tau=1):
        attack = attack or AttackConfig(epsilon=8.0, step_size=2.0, num_iter=10)
        if attack.early_stop_tau is None:
            attack = dataclasses.replace(attack, early_stop_tau=int(early_stop_tau))
        super().__init__(num_classes, attack, label_smoothing, clean_weight=0.0,
                         adv_weight=1.0)

    def describe(self):
        a = self.attack
        return (f"fat (PGD-{a.iterations}, eps {a.epsilon:g}, step {a.step_size:g}, "
                f"early stop tau {a.early_stop_tau})")
