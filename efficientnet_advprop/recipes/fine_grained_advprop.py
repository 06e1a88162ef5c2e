"""Fine-grained AdvProp (Xie et al., CVPR 2020, §5.4): one BN set per data source.

Three BN sets: the main set for clean images without AutoAugment (source tag 0), the
first auxiliary set for clean images with AutoAugment/RandAugment (tag 1), and the
second auxiliary set for adversarial images. The input pipeline tags every image
(make_dataset(..., source_tags=True) with an `auto_augment_fraction` below 1); the
attack (AdvProp's: targeted by default, see advprop.py) runs through the adversarial
set, from each image as it was drawn.

  loss = sum CE(clean, its source's BN) + sum CE(adv, adversarial BN), one update.

The clean images are routed per image by their tag inside one forward (masked batch
statistics per set, static shapes, so it compiles with XLA). At test time only the
main set is used; `strip_auxiliary_bn` keeps it alone.
"""

from keras import ops

from efficientnet_advprop.attacks import attack_model
from efficientnet_advprop.layers.split_batch_norm import bn_route
from efficientnet_advprop.recipes.advprop import ADVPROP, DEFAULT_ATTACK, AdvProp
from efficientnet_advprop.recipes.base import Cite, Recipe, RecipeOutput, as_context

AUGMENTED_SET = 1
ADVERSARIAL_SET = 2


class FineGrainedAdvProp(Recipe):
    name = "fine_grained_advprop"
    title = "fine-grained AdvProp (Xie et al., CVPR 2020, §5.4)"
    num_aux = 2
    preferred_preprocessing = "advprop"
    paper = {
        **AdvProp.paper,
        "auto_augment_fraction": Cite(0.5, f"{ADVPROP} §5.4 leaves the share open; "
                                           "this project's choice: half"),
    }
    attack_bn_set = ADVERSARIAL_SET
    needs_source_tags = True

    def __init__(self, num_classes, attack=None, label_smoothing=0.1):
        super().__init__(num_classes, label_smoothing)
        self.attack = attack or DEFAULT_ATTACK  # AdvProp's targeted PGD1
        self.augmented_fraction = 0.5  # the config's auto_augment_fraction (expected)

    def bn_batches(self, local_batch, num_replicas=1):
        """Expected sizes: the tags are drawn per image with auto_augment_fraction."""
        augmented = int(local_batch * self.augmented_fraction)
        return {"clean without AutoAugment, main BN": local_batch - augmented,
                "clean with AutoAugment, BN set 1": augmented,
                "adversarial, BN set 2": local_batch}

    def compute(self, model, images, labels, ctx):
        ctx = as_context(ctx)
        if ctx.source_tags is None:
            raise ValueError("fine_grained_advprop needs per-image source tags from the "
                             "input pipeline (train with --auto_augment)")
        adv = attack_model(model, images, labels, self.attack, bn_set=ADVERSARIAL_SET,
                           num_classes=self.num_classes, seed=ctx.seed)
        batch = images.shape[0]
        tags = ops.clip(ops.cast(ctx.source_tags, "int32"), 0, AUGMENTED_SET)
        assignment = ops.concatenate(
            [tags, ops.full([batch], ADVERSARIAL_SET, dtype="int32")], axis=0)
        joint = ops.concatenate([images, ops.cast(adv, images.dtype)], axis=0)
        with bn_route(assignment=assignment):
            logits = model(joint, training=True)
        clean_loss, adv_loss, metrics = self.joint_losses(labels, logits, batch)
        augmented = ops.cast(ops.equal(tags, AUGMENTED_SET), "float32")
        metrics["fraction/augmented"] = (ops.sum(augmented),
                                         ops.convert_to_tensor(batch, "float32"))
        return RecipeOutput(loss_sum=ops.sum(clean_loss) + ops.sum(adv_loss),
                            metrics=metrics)

    def passes_per_image(self):
        return self.attack.cost + 2.0

    def describe(self):
        a = self.attack
        return (f"fine_grained_advprop (BN sets: clean, AutoAugment, adversarial; "
                f"{'targeted' if a.targeted else 'untargeted'} {a.attacker} eps "
                f"{a.epsilon:g}, {a.iterations} iter)")
