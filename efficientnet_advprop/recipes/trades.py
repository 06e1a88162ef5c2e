"""TRADES (Zhang et al., ICML 2019) and TRADES-FAT (Zhang et al., ICML 2020).

For a clean batch x with labels y:
  1. x_adv: start at x + 0.001 * N(0, 1) (in [0, 1] units, i.e. 0.255 * N(0, 1) in
     pixel units), then PGD steps that *ascend* KL(p(x) || p(x_adv)) with p(x) held
     fixed, in inference mode (the reference puts the model in eval mode), projected
     onto the eps-ball and the pixel range.
     TRADES-FAT stops an image `early_stop_tau` steps after it is first misclassified.
  2. loss = CE(f(x), y) + beta * KL(p(x) || p(x_adv)), both forwards in training mode
     through the one (main) BN set, separately (as the reference code).
The KL is summed over classes per sample and, like every loss here, summed over the
batch and divided by the global batch size ("batchmean" in the reference).
beta = 1 is NoFrost's setting (§4.1), in whose tables TRADES and TRADES-FAT are
baselines, and the recipes use NoFrost's training settings; the TRADES paper's CIFAR-10
setting is beta 6 (set trades_beta=6).
"""

import dataclasses

from keras import ops

from efficientnet_advprop import seam
from efficientnet_advprop.attacks import AttackConfig, float32_compute, linf_attack, logits_fn_for
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.base import (Cite, Option, Recipe, RecipeOutput, as_context,
                                               batch_metrics, cross_entropy, kl_divergence)
from efficientnet_advprop.recipes.nofrost import BN_BASELINE_SETTINGS
from efficientnet_advprop.recipes.nofrost import PAPER as NOFROST

BETA = Option("trades_beta", Cite(1.0, f"{NOFROST} §4.1: TRADES trade-off 1"),
              "Weight of the KL term (the TRADES paper's CIFAR-10 value: 6).", 0.0, None,
              arg="beta")

START_STDDEV = 0.001 * 255.0  # the reference's 0.001 * N(0, 1) in [0, 1] units


def trades_loss(labels, clean_logits, adv_logits, *, beta, num_classes, label_smoothing=0.0):
    """Per-sample TRADES loss: CE(clean) + beta * KL(p_clean || p_adv)."""
    return (cross_entropy(labels, clean_logits, num_classes, label_smoothing)
            + beta * kl_divergence(clean_logits, adv_logits))


def trades_attack(model, images, labels, config, seed, bn_set=MAIN):
    """The TRADES inner maximisation (see the module docstring) in float32."""
    x0 = ops.cast(images, "float32")
    noise = seam.normal(ops.shape(x0), seed) * START_STDDEV
    with float32_compute(model):
        logits_fn = logits_fn_for(model, bn_set, config.bn_mode)
        clean_logits = ops.stop_gradient(ops.cast(logits_fn(x0), "float32"))

        def kl_objective(logits, _labels):
            return kl_divergence(clean_logits, logits)

        return linf_attack(logits_fn, x0, labels, epsilon=config.epsilon,
                           step_size=config.step_size, num_iter=config.iterations,
                           random_start=False, project=config.attacker != "gd",
                           early_stop_tau=config.early_stop_tau, loss_fn=kl_objective,
                           x_init=x0 + noise)


class Trades(Recipe):
    name = "trades"
    title = "TRADES (Zhang et al., ICML 2019), as NoFrost's baseline"
    paper = BN_BASELINE_SETTINGS
    options = (BETA,)

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, beta=1.0):
        super().__init__(num_classes, label_smoothing)
        if not beta >= 0:
            raise ValueError(f"TRADES beta must be >= 0, got {beta}")
        # TRADES' CIFAR setting: eps 8, step 2 (0.007 * 255 ~ 1.8), 10 steps.
        self.attack = attack or AttackConfig(epsilon=8.0, step_size=2.0, num_iter=10)
        if self.attack.targeted:
            raise ValueError("TRADES maximises a KL divergence; a targeted attack does "
                             "not apply")
        self.beta = float(beta)

    def compute(self, model, images, labels, ctx):
        ctx = as_context(ctx)
        adv = trades_attack(model, images, labels, self.attack, ctx.fold(0))
        with bn_route(MAIN):
            clean_logits = model(images, training=True)
            adv_logits = model(ops.cast(adv, images.dtype), training=True)
        per_sample = trades_loss(labels, clean_logits, adv_logits, beta=self.beta,
                                 num_classes=self.num_classes,
                                 label_smoothing=self.label_smoothing)
        metrics = batch_metrics("clean", labels, clean_logits, self.loss(labels, clean_logits))
        # "loss/adversarial" is the KL term here.
        metrics.update(batch_metrics("adversarial", labels, adv_logits,
                                     kl_divergence(clean_logits, adv_logits)))
        return RecipeOutput(loss_sum=ops.sum(per_sample), metrics=metrics)

    def passes_per_image(self):
        return self.attack.iterations + 1.0 + 2.0  # attack + the fixed clean pass + loss

    def describe(self):
        a = self.attack
        tau = f", early stop tau {a.early_stop_tau}" if a.early_stop_tau is not None else ""
        return (f"{self.name} (beta {self.beta:g}, KL-PGD-{a.iterations}, eps "
                f"{a.epsilon:g}, step {a.step_size:g}{tau})")


class TradesFat(Trades):
    name = "trades_fat"
    title = "TRADES-FAT (Zhang et al., ICML 2020), as NoFrost's baseline"
    options = (BETA, Option("early_stop_tau", Cite(1, f"{NOFROST} tables: early-stopped PGD, "
                                                      "1 step"), "Steps an image may take "
                            "after it is first misclassified.", 0, None))

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, beta=1.0,
                 early_stop_tau=1):
        super().__init__(num_classes, attack, label_smoothing, beta)
        if self.attack.early_stop_tau is None:
            self.attack = dataclasses.replace(self.attack, early_stop_tau=int(early_stop_tau))
