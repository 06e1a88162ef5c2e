"""Vanilla training: clean images through the main BN, cross-entropy."""

import tensorflow as tf

from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.base import Recipe, RecipeOutput, batch_metrics


class Vanilla(Recipe):
    name = "vanilla"

    def compute(self, model, images, labels, seed):
        with bn_route(MAIN):
            logits = model(images, training=True)
        per_sample = self.loss(labels, logits)
        return RecipeOutput(loss_sum=tf.reduce_sum(per_sample),
                            metrics=batch_metrics("clean", labels, logits, per_sample))
