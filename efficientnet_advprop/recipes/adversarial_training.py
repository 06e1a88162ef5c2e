"""Adversarial training with one (shared) set of BNs: the baselines of the papers.

sat       AdvProp's shared-BN baseline: Goodfellow et al. (2015) mix, loss = a * CE(clean)
          + (1 - a) * CE(adv), clean and adversarial images in ONE joint forward,
          normalised *together* by the one set of BNs ("shared BN" of AdvProp Table 4;
          a = 0.5 as in Xie & Yuille), with AdvProp's EfficientNet settings.
bn_sat    NoFrost's "SAT (BN)" baseline: the same loss with lambda = 1 - a = 0.5, but the
          clean and the adversarial images in SEPARATE forwards (separate batch
          statistics), with NoFrost's settings (§4.1). Compare nofrost with this one.
madry_at  Madry et al. (2018): adversarial images only, loss = CE(adv).
fat       Zhang et al. (2020): madry_at on early-stopped ("friendly") PGD examples, with
          NoFrost's settings (a baseline of its tables).

AdvProp sums the two losses with weight 1 each; with a = 0.5 the SAT loss is half of
that. Under RMSProp (invariant to the loss scale) only the relative strength of weight
decay differs; pass clean_weight and adv_weight to match exactly.
The attack runs through the shared (main) BNs.
"""

import dataclasses

import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.advprop import ADVPROP, EFFICIENTNET_RECIPE
from efficientnet_advprop.recipes.base import (Cite, Option, Recipe, RecipeOutput, as_context,
                                               batch_metrics)
from efficientnet_advprop.recipes.nofrost import LAMBDA, NOFROST_SETTINGS
from efficientnet_advprop.recipes.nofrost import PAPER as NOFROST

CLEAN_WEIGHT = Option("clean_loss_weight", Cite(0.5, "Xie & Yuille 2020: alpha 0.5"),
                      "Weight of the clean loss; the adversarial one gets 1 - it.",
                      0.0, 1.0, arg="clean_weight")


class StandardAdversarialTraining(Recipe):
    name = "sat"
    title = "AdvProp's shared-BN adversarial training baseline (one joint forward)"
    # AdvProp's settings, so that a comparison with advprop isolates the BNs.
    preferred_preprocessing = "advprop"
    paper = {
        **EFFICIENTNET_RECIPE,
        "auto_augment": Cite("v0", f"{ADVPROP} §5.4: AutoAugment by default; Table 4 "
                                   "compares under AdvProp's settings"),
        "epsilon": Cite(1.0, f"{ADVPROP} Table 4: the AdvProp attacker (PGD1 for small "
                             "models)"),
        "attack_step_size": Cite(1.0, f"{ADVPROP} §5.1: step size 1"),
    }
    options = (CLEAN_WEIGHT,)

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, clean_weight=0.5,
                 adv_weight=None):
        super().__init__(num_classes, label_smoothing)
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean loss weight must be in [0, 1], got {clean_weight}")
        self.attack = attack or AttackConfig(epsilon=1.0)
        self.clean_weight = float(clean_weight)
        self.adv_weight = 1.0 - self.clean_weight if adv_weight is None else float(adv_weight)

    def compute(self, model, images, labels, ctx):
        adv = attack_model(model, images, labels, self.attack, bn_set=MAIN,
                           num_classes=self.num_classes, seed=as_context(ctx).seed)
        if self.clean_weight == 0.0:
            with bn_route(MAIN):
                adv_logits = model(adv, training=True)
            adv_loss = self.loss(labels, adv_logits)
            return RecipeOutput(
                loss_sum=self.adv_weight * tf.reduce_sum(adv_loss),
                metrics=batch_metrics("adversarial", labels, adv_logits, adv_loss))
        batch = tf.shape(images)[0]
        with bn_route(MAIN):  # one BN set for the mixed batch: the shared-BN baseline
            logits = model(tf.concat([tf.cast(images, adv.dtype), adv], 0), training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, batch)
        return RecipeOutput(
            loss_sum=(self.clean_weight * tf.reduce_sum(clean_loss)
                      + self.adv_weight * tf.reduce_sum(adv_loss)),
            metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + (2.0 if self.clean_weight > 0 else 1.0)

    def bn_batches(self, local_batch, num_replicas=1):
        if self.clean_weight == 0.0:
            return {"adversarial": local_batch}
        return {"clean and adversarial, shared BN": 2 * local_batch}


class SeparateForwardAdversarialTraining(StandardAdversarialTraining):
    """NoFrost's SAT (BN): (1 - lambda) CE(clean) + lambda CE(adv), clean and
    adversarial images in separate forwards through the one BN set."""

    name = "bn_sat"
    title = "NoFrost's SAT (BN) baseline: separate clean and adversarial forwards"
    paper = NOFROST_SETTINGS
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
                logits = model(tf.cast(x, images.dtype), training=True)
            per_sample = self.loss(labels, logits)
            metrics.update(batch_metrics(prefix, labels, logits, per_sample))
            total += weight * tf.reduce_sum(per_sample)
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
    paper = NOFROST_SETTINGS  # a baseline of NoFrost's tables, trained as they say
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
