"""AdvProp (Xie et al., CVPR 2020, Algorithm 1).

For a clean batch x with labels y:
  1. x_adv = attack(x, y) through the *auxiliary* BNs (moving statistics untouched;
     by default in inference mode, as the reference code; AttackConfig.bn_mode).
  2. One forward of [x; x_adv]: the first half normalised by the main BNs, the second
     by the auxiliary BNs, every other weight shared.
  3. loss = CE(clean, main BN) + CE(adv, aux BN); one update of all parameters.
At test time only the main BNs are used (export strips the auxiliary ones).

Settings (the `paper` table): the EfficientNet training recipe, which AdvProp §5.1
follows, with AutoAugment v0 ("our networks are trained with AutoAugment by
default", §5.4; the released checkpoints are "AdvProp + AA") and the [-1, 1] input
scaling of the released AdvProp checkpoints. The attacker is PGD with step 1 and
n = eps + 1 iterations (1 for eps 1); eps 1 (PGD1) suits small models, the paper uses
eps 4 (PGD5) for large ones: set epsilon=4 for B5-B8. The attack is *targeted*, towards
a class drawn uniformly among the wrong ones: the AdvProp paper does not say, but its
authors' follow-up does (Mei et al. 2022, Fast AdvProp §3.2.2: "in order to re-using
gradient, we need to switch the attack mode from targeted attack to untargeted attack
in Fast AdvProp"), and the same group's setup draws the target "uniformly at random"
(Xie & Yuille 2020); targeted_attack=False gives the untargeted variant.
Open choice: the attack runs through the auxiliary BNs in inference mode (moving
statistics); no AdvProp training code was released, so this is a setting
(attack_bn_mode), and the reference implementations of the follow-up papers differ on
it.
"""

from keras import ops

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import Cite, Recipe, RecipeOutput, as_context

OFFICIAL = "tensorflow/tpu efficientnet main.py"
# The EfficientNet recipe, which AdvProp §5.1 trains with; the config defaults are the
# same values, listed here so the paper can be checked against one table.
EFFICIENTNET_RECIPE = {
    "optimizer": Cite("rmsprop", f"{OFFICIAL}: RMSProp (TF1 semantics)"),
    "rmsprop_decay": Cite(0.9, f"{OFFICIAL}: decay 0.9"),
    "momentum": Cite(0.9, f"{OFFICIAL}: momentum 0.9"),
    "rmsprop_epsilon": Cite(1e-3, f"{OFFICIAL}: epsilon 1e-3"),
    "base_learning_rate": Cite(0.016, f"{OFFICIAL}: 0.016 per 256 images"),
    "lr_schedule": Cite("exponential", f"{OFFICIAL}: x0.97 every 2.4 epochs"),
    "lr_decay_epoch": Cite(2.4, f"{OFFICIAL}"),
    "lr_decay_factor": Cite(0.97, f"{OFFICIAL}"),
    "lr_warmup_epochs": Cite(5.0, f"{OFFICIAL}: 5 warm-up epochs"),
    "weight_decay": Cite(1e-5, f"{OFFICIAL}: L2 1e-5, not on BN"),
    "label_smoothing": Cite(0.1, f"{OFFICIAL}: label smoothing 0.1"),
    "moving_average_decay": Cite(0.9999, f"{OFFICIAL}: EMA 0.9999, eval on EMA"),
    "batch_norm_momentum": Cite(0.99, f"{OFFICIAL}: BN momentum 0.99"),
    "batch_norm_epsilon": Cite(1e-3, f"{OFFICIAL}: BN epsilon 1e-3"),
    "survival_prob": Cite(0.8, f"{OFFICIAL}: drop-connect survival 0.8"),
}
ADVPROP = "Xie et al. 2020"
TARGETED = ("Mei et al. 2022 (Fast AdvProp) §3.2.2: AdvProp's attack is targeted (Fast "
            "AdvProp switches 'from targeted attack to untargeted attack'); target uniform "
            "among the wrong classes as in Xie & Yuille 2020")
# AdvProp's attacker when none is given: PGD1 (eps 1, one step), targeted.
DEFAULT_ATTACK = AttackConfig(epsilon=1.0, targeted=True)


class AdvProp(Recipe):
    name = "advprop"
    title = "AdvProp (Xie et al., CVPR 2020)"
    num_aux = 1
    attack_bn_set = AUX
    preferred_preprocessing = "advprop"  # the released AdvProp checkpoints' [-1, 1]
    paper = {
        **EFFICIENTNET_RECIPE,
        "auto_augment": Cite("v0", f"{ADVPROP} §5.4: trained with AutoAugment by default"),
        "attacker": Cite("pgd", f"{ADVPROP} §5.1: PGD"),
        "epsilon": Cite(1.0, f"{ADVPROP} §5.1: PGD1 (eps 1) for small models; eps 4 for "
                             "B5-B8"),
        "attack_step_size": Cite(1.0, f"{ADVPROP} §5.1: step size 1"),
        "attack_iterations": Cite(None, f"{ADVPROP} §5.1: n = eps + 1 (1 for eps 1)"),
        "targeted_attack": Cite(True, TARGETED),
    }

    def __init__(self, num_classes, attack=None, label_smoothing=0.1):
        super().__init__(num_classes, label_smoothing)
        # Default: targeted PGD1 (eps 1, one step), the paper's choice for small models.
        self.attack = attack or DEFAULT_ATTACK

    def compute(self, model, images, labels, ctx):
        """Algorithm 1 on one replica's batch. What a variant changes is a method:
        `joint_bn_route` (which BN set normalises each image of the joint forward)
        and `route_metrics` (metrics of that routing)."""
        ctx = as_context(ctx)
        adv = attack_model(model, images, labels, self.attack, bn_set=self.attack_bn_set,
                           num_classes=self.num_classes, seed=ctx.seed)
        batch = ops.shape(images)[0]
        joint = ops.concatenate([ops.cast(images, adv.dtype), adv], axis=0)
        with self.joint_bn_route(ctx, batch):
            logits = model(joint, training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, batch)
        metrics.update(self.route_metrics(ctx, batch))
        return RecipeOutput(loss_sum=ops.sum(clean_loss) + ops.sum(adv_loss),
                            metrics=metrics)

    def joint_bn_route(self, ctx, batch):
        """The `bn_route` of the forward of [clean; adversarial] (`batch` images
        each): here the clean half through the main BNs, the adversarial half through
        the auxiliary ones (`attack_bn_set`)."""
        del ctx, batch  # two equal halves
        return bn_route([MAIN, self.attack_bn_set])

    def route_metrics(self, ctx, batch):
        """Metrics of `joint_bn_route`'s routing, {name: (sum, count)}: none here."""
        del ctx, batch
        return {}

    def passes_per_image(self):
        return self.attack.cost + 2.0

    def describe(self):
        a = self.attack
        return (f"advprop ({'targeted' if a.targeted else 'untargeted'} {a.attacker}, eps "
                f"{a.epsilon:g}, step {a.step_size:g}, {a.iterations} iter, aux BN in "
                f"{a.bn_mode} mode)")
