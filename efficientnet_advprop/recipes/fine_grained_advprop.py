"""Fine-grained AdvProp (Xie et al., CVPR 2020, §5.4): one BN set per data source.

Three BN sets: the main set for clean images without AutoAugment (source tag 0), the
first auxiliary set for clean images with AutoAugment/RandAugment (tag 1), and the
second auxiliary set for adversarial images. The input pipeline tags every image
(`InputOptions(source_tags=True)` with an `auto_augment_fraction` below 1); the
attack (AdvProp's: targeted by default, see advprop.py) runs through the adversarial
set, from each image as it was drawn.

  loss = sum CE(clean, its source's BN) + sum CE(adv, adversarial BN), one update.

The step is AdvProp's (`AdvProp.compute`: the attack, the joint forward, the losses and
metrics); this recipe changes only its BN routing (`joint_bn_route`): the clean images
are routed per image by their tag inside the one forward (masked batch statistics per
set, static shapes, so it compiles with XLA), and adds the share of augmented images
to the metrics. At test time only the main set is used; `strip_auxiliary_bn` keeps it
alone.
"""

from keras import ops

from efficientnet_advprop.layers.split_batch_norm import bn_route
from efficientnet_advprop.recipes.advprop import ADVPROP, AdvProp
from efficientnet_advprop.recipes.base import Cite, as_context

AUGMENTED_SET = 1
ADVERSARIAL_SET = 2


class FineGrainedAdvProp(AdvProp):
    name = "fine_grained_advprop"
    title = "fine-grained AdvProp (Xie et al., CVPR 2020, §5.4)"
    num_aux = 2
    paper = {
        **AdvProp.paper,
        "auto_augment_fraction": Cite(0.5, f"{ADVPROP} §5.4 leaves the share open; "
                                           "this project's choice: half"),
    }
    attack_bn_set = ADVERSARIAL_SET
    needs_source_tags = True
    # The share of tagged images bn_batches expects: the table's auto_augment_fraction
    # (a run that sets another value is not passed in here).
    augmented_fraction = paper["auto_augment_fraction"].value

    def bn_batches(self, local_batch, num_replicas=1):
        """Expected sizes: the tags are drawn per image with auto_augment_fraction."""
        augmented = int(local_batch * self.augmented_fraction)
        return {"clean without AutoAugment, main BN": local_batch - augmented,
                "clean with AutoAugment, BN set 1": augmented,
                "adversarial, BN set 2": local_batch}

    def compute(self, model, images, labels, ctx):
        if as_context(ctx).source_tags is None:
            raise ValueError("fine_grained_advprop needs per-image source tags from the "
                             "input pipeline (train with --auto_augment)")
        return super().compute(model, images, labels, ctx)

    @staticmethod
    def _tags(ctx):
        """Each clean image's BN set: its source tag, clipped to the two clean sets."""
        return ops.clip(ops.cast(ctx.source_tags, "int32"), 0, AUGMENTED_SET)

    def joint_bn_route(self, ctx, batch):
        """Each clean image through its source's set, every adversarial one through the
        adversarial set."""
        assignment = ops.concatenate(
            [self._tags(ctx), ops.full([batch], ADVERSARIAL_SET, dtype="int32")], axis=0)
        return bn_route(assignment=assignment)

    def route_metrics(self, ctx, batch):
        """fraction/augmented: the share of the clean images AutoAugment made."""
        augmented = ops.cast(ops.equal(self._tags(ctx), AUGMENTED_SET), "float32")
        return {"fraction/augmented": (ops.sum(augmented),
                                       ops.convert_to_tensor(batch, "float32"))}

    def describe(self):
        a = self.attack
        return (f"fine_grained_advprop (BN sets: clean, AutoAugment, adversarial; "
                f"{'targeted' if a.targeted else 'untargeted'} {a.attacker} eps "
                f"{a.epsilon:g}, {a.iterations} iter)")
