"""AdvProp (Xie et al., CVPR 2020, Algorithm 1).

For a clean batch x with labels y:
  1. x_adv = attack(x, y) through the *auxiliary* BNs (moving statistics untouched;
     by default in inference mode, as the reference code; AttackConfig.bn_mode).
  2. One forward of [x; x_adv]: the first half normalised by the main BNs, the second
     by the auxiliary BNs, every other weight shared.
  3. loss = CE(clean, main BN) + CE(adv, aux BN); one update of all parameters.
At test time only the main BNs are used (export strips the auxiliary ones).
"""

import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig, attack_model
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import Recipe, RecipeOutput, as_context


class AdvProp(Recipe):
    name = "advprop"
    num_aux = 1
    attack_bn_set = AUX

    def __init__(self, num_classes, attack=None, label_smoothing=0.1):
        super().__init__(num_classes, label_smoothing)
        # Default: PGD1 (eps 1, one step), what the paper prefers for small models.
        self.attack = attack or AttackConfig(epsilon=1.0)

    def compute(self, model, images, labels, ctx):
        adv = attack_model(model, images, labels, self.attack, bn_set=AUX,
                           num_classes=self.num_classes, seed=as_context(ctx).seed)
        batch = tf.shape(images)[0]
        joint = tf.concat([tf.cast(images, adv.dtype), adv], axis=0)
        with bn_route([MAIN, AUX]):
            logits = model(joint, training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, batch)
        return RecipeOutput(loss_sum=tf.reduce_sum(clean_loss) + tf.reduce_sum(adv_loss),
                            metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + 2.0

    def describe(self):
        a = self.attack
        return (f"advprop ({a.attacker}, eps {a.epsilon:g}, step {a.step_size:g}, "
                f"{a.iterations} iter, aux BN in {a.bn_mode} mode)")
