"""Adversarial training with shared BN: the baselines AdvProp is compared with.

sat       Goodfellow et al. (2015) mix: loss = a * CE(clean) + (1 - a) * CE(adv), clean
          and adversarial images normalised *together* by the one set of BNs (the
          "shared BN" of AdvProp Table 4; a = 0.5 as in Xie & Yuille).
madry_at  Madry et al. (2018): adversarial images only, loss = CE(adv).
fat       Zhang et al. (2020): madry_at on early-stopped ("friendly") PGD examples.

AdvProp sums the two losses with weight 1 each; with a = 0.5 the SAT loss is half of
that. Under RMSProp (invariant to the loss scale) only the relative strength of weight
decay differs; pass clean_weight and adv_weight to match exactly.
The attack runs through the shared (main) BNs.
"""

import dataclasses

import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.base import Recipe, RecipeOutput, as_context, batch_metrics


class StandardAdversarialTraining(Recipe):
    name = "sat"

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


class MadryAdversarialTraining(StandardAdversarialTraining):
    name = "madry_at"

    def __init__(self, num_classes, attack=None, label_smoothing=0.1):
        super().__init__(num_classes, attack, label_smoothing, clean_weight=0.0,
                         adv_weight=1.0)


class FriendlyAdversarialTraining(StandardAdversarialTraining):
    """FAT (Zhang et al., ICML 2020): Madry's loss on "friendly" adversarial examples.

    The PGD attack stops moving an image `early_stop_tau` steps after the model first
    misclassifies it (tau = 1 by default, the "early-stopped PGD, 1 step" of the
    NoFrost tables; the FAT paper studies tau in 0..3). Everything else is madry_at.
    FAT starts from x + 0.001 * N(0, 1) (in [0, 1] units); this implementation keeps
    the uniform random start of the other recipes.
    """

    name = "fat"

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
