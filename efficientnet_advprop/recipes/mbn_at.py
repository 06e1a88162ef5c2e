"""Adversarial training at scale (Xie & Yuille, "Intriguing Properties of Adversarial
Training at Scale", ICLR 2020): the strategies the paper compares, in one recipe.

For a batch x of B images with labels y:
  1. x_adv = targeted PGD towards a random class that is never y; each image starts at
     the clean image with probability 0.2 (a uniform coin), else uniformly in the
     eps-cube; eps 16, step max(1, eps / iterations), 30 iterations. The attack runs
     through the adversarial BN set (MBN) or the shared one, in inference mode.
  2. Every image is used adversarially; the first round(clean_fraction * B) images are
     also used clean ("100% adv + x% clean"; clean_fraction = 0 is pure adversarial
     training, the paper's most robust setting).
  3. loss = clean_weight * sum CE(clean) + (1 - clean_weight) * sum CE(adv) when clean
     images are present (clean_weight = 0.5, the paper's alpha), sum CE(adv) otherwise;
     + alp_weight * sum_i mean_c (z_clean - z_adv)^2 with adversarial logit pairing
     (Kannan et al. 2018; the mean over logits follows their reference code, which
     used tf.losses.mean_squared_error; the pairs are the images used both ways).
  4. BN: mixture_bn=True gives MBN, clean images through the main set and adversarial
     ones through the auxiliary set (inference with either; evaluation reports both);
     mixture_bn=False normalises both together (shared BN). Use a GroupNorm model
     (--normalizer=group_norm) for the GN variant: the recipe then routes nothing.
  5. "Consistent BN": from step `consistent_bn_from_step` on, BN normalises with its
     moving statistics (inference behaviour) during training and stops updating them;
     the paper does this for the last 10 epochs (see `consistent_bn_start_step`).
"""

import dataclasses

import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import Recipe, RecipeOutput, as_context, batch_metrics

XIE_YUILLE_ATTACK = AttackConfig(attacker="pgd", epsilon=16.0, step_size=1.0, num_iter=30,
                                 targeted=True, clean_start_prob=0.2)


def consistent_bn_start_step(train_steps, steps_per_epoch, last_epochs):
    """First step that trains with moving statistics when the last `last_epochs`
    epochs use consistent BN (None when last_epochs is 0)."""
    if not last_epochs:
        return None
    return max(0, int(train_steps) - int(round(float(last_epochs) * steps_per_epoch)))


def alp_penalty(clean_logits, adv_logits):
    """Per-sample adversarial logit pairing term: mean over logits of (z - z_adv)^2."""
    diff = tf.cast(clean_logits, tf.float32) - tf.cast(adv_logits, tf.float32)
    return tf.reduce_mean(tf.square(diff), axis=-1)


class MixtureBNAdversarialTraining(Recipe):
    name = "mbn_at"

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, clean_fraction=1.0,
                 clean_weight=0.5, alp_weight=0.0, mixture_bn=True,
                 consistent_bn_from_step=None):
        super().__init__(num_classes, label_smoothing)
        attack = attack or XIE_YUILLE_ATTACK
        # The paper's rule: step = max(step, eps / iterations).
        step = max(attack.step_size, attack.epsilon / attack.iterations)
        self.attack = dataclasses.replace(attack, step_size=step)
        if not 0.0 <= clean_fraction <= 1.0:
            raise ValueError(f"clean fraction must be in [0, 1], got {clean_fraction}")
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean loss weight must be in [0, 1], got {clean_weight}")
        if alp_weight < 0:
            raise ValueError(f"ALP weight must be >= 0, got {alp_weight}")
        if alp_weight and not clean_fraction:
            raise ValueError("adversarial logit pairing needs clean images "
                             "(clean fraction > 0)")
        self.clean_fraction = float(clean_fraction)
        self.clean_weight = float(clean_weight)
        self.alp_weight = float(alp_weight)
        self.mixture_bn = bool(mixture_bn)
        self.num_aux = 1 if self.mixture_bn else 0
        self.attack_bn_set = AUX if self.mixture_bn else MAIN
        self.consistent_bn_from_step = consistent_bn_from_step

    def _moving_stats_flag(self, ctx):
        if self.consistent_bn_from_step is None:
            return False
        return ctx.step >= tf.cast(self.consistent_bn_from_step, ctx.step.dtype)

    def compute(self, model, images, labels, ctx):
        ctx = as_context(ctx)
        adv_set = self.attack_bn_set
        adv = attack_model(model, images, labels, self.attack, bn_set=adv_set,
                           num_classes=self.num_classes, seed=ctx.seed)
        batch = images.shape[0]
        num_clean = int(round(self.clean_fraction * batch))
        moving = self._moving_stats_flag(ctx)
        adv = tf.cast(adv, images.dtype)
        if num_clean == 0:
            with bn_route(adv_set, use_moving_stats=moving):
                adv_logits = model(adv, training=True)
            adv_loss = self.loss(labels, adv_logits)
            return RecipeOutput(loss_sum=tf.reduce_sum(adv_loss),
                                metrics=batch_metrics("adversarial", labels, adv_logits,
                                                      adv_loss))
        joint = tf.concat([images[:num_clean], adv], axis=0)
        route = ([MAIN, AUX], [num_clean, batch]) if self.mixture_bn else (MAIN, None)
        with bn_route(*route, use_moving_stats=moving):
            logits = model(joint, training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, num_clean,
                                                          clean_labels=labels[:num_clean])
        loss_sum = (self.clean_weight * tf.reduce_sum(clean_loss)
                    + (1.0 - self.clean_weight) * tf.reduce_sum(adv_loss))
        if self.alp_weight:
            alp = alp_penalty(logits[:num_clean], logits[num_clean:2 * num_clean])
            loss_sum += self.alp_weight * tf.reduce_sum(alp)
            metrics["loss/alp"] = (tf.reduce_sum(alp), tf.cast(num_clean, tf.float32))
        return RecipeOutput(loss_sum=loss_sum, metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + 1.0 + self.clean_fraction

    def describe(self):
        a = self.attack
        bn = "MBN" if self.mixture_bn else "shared BN"
        extra = f", ALP {self.alp_weight:g}" if self.alp_weight else ""
        if self.consistent_bn_from_step is not None:
            extra += f", consistent BN from step {self.consistent_bn_from_step}"
        return (f"mbn_at ({bn}, {self.clean_fraction:.0%} clean, "
                f"{'targeted ' if a.targeted else ''}PGD-{a.iterations} eps {a.epsilon:g} "
                f"step {a.step_size:g}{extra})")
