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
     the paper does this for the last 10 epochs (option consistent_bn_epochs; the
     config turns it into the step once the run's length is known).

Settings (the `paper` table): the reference code's ResNet recipe (momentum SGD, lr
0.1 per 256 with a linear warm-up from 0.1 over 5 epochs when the scaled rate is
higher, 110 epochs, x0.1 at 35/70/95, no weight EMA, BN momentum 0.9 / eps 1e-5).
The step rule max(step, eps / iterations) is the reference code's.
"""

import dataclasses

from keras import ops

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import (Cite, Option, Recipe, RecipeOutput, as_context,
                                               batch_metrics)

PAPER = "Xie & Yuille 2020"
REFERENCE = "facebookresearch/ImageNet-Adversarial-Training main.py"
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
    diff = ops.cast(clean_logits, "float32") - ops.cast(adv_logits, "float32")
    return ops.mean(ops.square(diff), axis=-1)


class MixtureBNAdversarialTraining(Recipe):
    name = "mbn_at"
    title = "adversarial training at scale with mixture BN (Xie & Yuille, ICLR 2020)"
    paper = {
        "optimizer": Cite("momentum", f"{PAPER} / {REFERENCE}: momentum SGD"),
        "momentum": Cite(0.9, f"{REFERENCE}: momentum 0.9"),
        "nesterov": Cite(False, f"{REFERENCE}"),
        "base_learning_rate": Cite(0.1, f"{REFERENCE}: 0.1 x batch / 256"),
        "lr_schedule": Cite("step", f"{REFERENCE}: x0.1 at epochs 35, 70, 95"),
        "lr_milestones": Cite((35 / 110, 70 / 110, 95 / 110), f"{REFERENCE}: epochs "
                                                              "35/70/95 of 110"),
        "lr_decay_factor": Cite(0.1, f"{REFERENCE}"),
        "lr_warmup_epochs": Cite(5.0, f"{REFERENCE}: linear warm-up over 5 epochs"),
        "lr_warmup_start": Cite("base", f"{REFERENCE}: the ramp starts at 0.1"),
        "train_epochs": Cite(110.0, f"{REFERENCE}: 110 epochs"),
        "train_batch_size": Cite(4096, f"{PAPER}, setup: batch 4096"),
        "weight_decay": Cite(1e-4, f"{REFERENCE}: L2 1e-4"),
        "label_smoothing": Cite(0.1, f"{REFERENCE}: label smoothing 0.1"),
        "moving_average_decay": Cite(0.0, f"{REFERENCE}: no weight EMA"),
        "batch_norm_momentum": Cite(0.9, f"{REFERENCE}: BN momentum 0.9"),
        "batch_norm_epsilon": Cite(1e-5, f"{REFERENCE}: BN epsilon 1e-5"),
        "epsilon": Cite(16.0, f"{PAPER}, setup: eps 16"),
        "attack_step_size": Cite(1.0, f"{PAPER}, setup: step 1"),
        "attack_iterations": Cite(30, f"{PAPER}, setup: 30 iterations"),
        "targeted_attack": Cite(True, f"{PAPER}, setup: random target other than the label"),
        "clean_start_prob": Cite(0.2, f"{REFERENCE}: prob_start_from_clean 0.2"),
    }
    options = (
        Option("clean_fraction", Cite(1.0, f"{PAPER}: 100% adv + 100% clean"), "Share "
               "of each batch also used clean (0 = adversarial images only).", 0.0, 1.0),
        Option("clean_loss_weight", Cite(0.5, f"{PAPER}: alpha 0.5"), "Weight of the "
               "clean loss; the adversarial one gets 1 - it.", 0.0, 1.0,
               arg="clean_weight"),
        Option("alp_weight", 0.0, "Adversarial logit pairing weight (0 = off).", 0.0, None),
        Option("mixture_bn", Cite(True, f"{PAPER}: MBN"), "Separate BN sets for clean "
               "and adversarial images (false: shared BN)."),
        Option("consistent_bn_epochs", Cite(0.0, f"{PAPER} propose 10 as an "
                                                  "improvement; off in the main runs"),
               "Train the last N epochs with BN moving statistics (consistent BN).",
               0.0, None),
    )

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, clean_fraction=1.0,
                 clean_weight=0.5, alp_weight=0.0, mixture_bn=True,
                 consistent_bn_from_step=None, consistent_bn_epochs=0.0):
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
        if consistent_bn_epochs < 0:
            raise ValueError(f"consistent BN epochs must be >= 0, got {consistent_bn_epochs}")
        self.consistent_bn_epochs = float(consistent_bn_epochs)

    def configure_schedule(self, train_steps, steps_per_epoch):
        if self.consistent_bn_epochs:
            self.consistent_bn_from_step = consistent_bn_start_step(
                train_steps, steps_per_epoch, self.consistent_bn_epochs)

    def bn_batches(self, local_batch, num_replicas=1):
        clean = int(round(self.clean_fraction * local_batch))
        if not self.mixture_bn:
            return {"clean and adversarial, shared BN": local_batch + clean}
        sizes = {"adversarial, auxiliary BN": local_batch}
        if clean:
            sizes["clean, main BN"] = clean
        return sizes

    def _moving_stats_flag(self, ctx):
        if self.consistent_bn_from_step is None:
            return False
        step = ops.convert_to_tensor(ctx.step)
        return step >= ops.cast(self.consistent_bn_from_step, step.dtype)

    def compute(self, model, images, labels, ctx):
        ctx = as_context(ctx)
        adv_set = self.attack_bn_set
        adv = attack_model(model, images, labels, self.attack, bn_set=adv_set,
                           num_classes=self.num_classes, seed=ctx.seed)
        batch = images.shape[0]
        num_clean = int(round(self.clean_fraction * batch))
        moving = self._moving_stats_flag(ctx)
        adv = ops.cast(adv, images.dtype)
        if num_clean == 0:
            with bn_route(adv_set, use_moving_stats=moving):
                adv_logits = model(adv, training=True)
            adv_loss = self.loss(labels, adv_logits)
            return RecipeOutput(loss_sum=ops.sum(adv_loss),
                                metrics=batch_metrics("adversarial", labels, adv_logits,
                                                      adv_loss))
        joint = ops.concatenate([images[:num_clean], adv], axis=0)
        route = ([MAIN, AUX], [num_clean, batch]) if self.mixture_bn else (MAIN, None)
        with bn_route(*route, use_moving_stats=moving):
            logits = model(joint, training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, num_clean,
                                                          clean_labels=labels[:num_clean])
        loss_sum = (self.clean_weight * ops.sum(clean_loss)
                    + (1.0 - self.clean_weight) * ops.sum(adv_loss))
        if self.alp_weight:
            alp = alp_penalty(logits[:num_clean], logits[num_clean:2 * num_clean])
            loss_sum += self.alp_weight * ops.sum(alp)
            metrics["loss/alp"] = (ops.sum(alp), ops.convert_to_tensor(num_clean, "float32"))
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
