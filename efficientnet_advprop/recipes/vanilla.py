"""Vanilla training: clean images through the main BN, cross-entropy (optionally on
Mixup/CutMix batches, the augmentations Fast AdvProp combines with)."""

from keras import ops

from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.base import (Option, Recipe, RecipeOutput, as_context,
                                               batch_metrics)


class Vanilla(Recipe):
    name = "vanilla"
    title = "standard training (the EfficientNet recipe: the config defaults)"
    adversarial = False
    options = (
        Option("mixup_alpha", 0.0, "Mixup alpha (0 = off).", 0.0, None),
        Option("cutmix_alpha", 0.0, "CutMix alpha (0 = off).", 0.0, None),
    )

    def __init__(self, num_classes, label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0):
        super().__init__(num_classes, label_smoothing)
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup and cutmix alphas must be >= 0")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)

    def compute(self, model, images, labels, ctx):
        if self.mixup_alpha or self.cutmix_alpha:
            from efficientnet_advprop.data.mixing import mix_batch

            images, labels = mix_batch(images, labels, self.num_classes,
                                       mixup_alpha=self.mixup_alpha,
                                       cutmix_alpha=self.cutmix_alpha,
                                       seed=as_context(ctx).fold(3))
        with bn_route(MAIN):
            logits = model(images, training=True)
        per_sample = self.loss(labels, logits)
        return RecipeOutput(loss_sum=ops.sum(per_sample),
                            metrics=batch_metrics("clean", labels, logits, per_sample))
