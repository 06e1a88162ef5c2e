"""What every recipe shares: the loss, the metric convention and the recipe contract.

A recipe says how one replica's batch becomes a loss. It returns the *sum* of weighted
per-sample losses over its local batch (the loop divides by the global batch size, so
gradients are the same under any number of replicas) and metrics as (sum, count) pairs
that the loop sums over replicas before dividing.
"""

import dataclasses

import tensorflow as tf

from efficientnet_advprop.layers.split_batch_norm import MAIN


@dataclasses.dataclass
class RecipeOutput:
    loss_sum: tf.Tensor
    metrics: dict  # name -> (sum, count)


def cross_entropy(labels, logits, num_classes, label_smoothing=0.0):
    """Per-sample softmax cross-entropy with the official label smoothing.

    Smoothed target = onehot * (1 - s) + s / num_classes (tf.compat.v1.losses
    .softmax_cross_entropy semantics), computed in float32.
    """
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.nn.softmax_cross_entropy_with_logits(labels=onehot,
                                                   logits=tf.cast(logits, tf.float32))


def count_correct(labels, logits):
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_sum(tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)),
                                 tf.float32))


def batch_metrics(prefix, labels, logits, per_sample_loss):
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return {f"loss/{prefix}": (tf.reduce_sum(per_sample_loss), count),
            f"accuracy/{prefix}": (count_correct(labels, logits), count)}


class Recipe:
    """Base class. Subclasses set `name` and `num_aux` and implement `compute`.

    Attributes:
      name: the --recipe name.
      num_aux: auxiliary BN sets the model must have.
      attack: the AttackConfig used to make training examples, or None.
      attack_bn_set: the BN set the attack runs through.
    """

    name = "recipe"
    num_aux = 0
    attack = None
    attack_bn_set = MAIN

    def __init__(self, num_classes, label_smoothing=0.1):
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)

    def loss(self, labels, logits):
        return cross_entropy(labels, logits, self.num_classes, self.label_smoothing)

    def compute(self, model, images, labels, seed):
        """-> RecipeOutput for one replica's batch; `seed` is an int64 [2] tensor."""
        raise NotImplementedError

    def passes_per_image(self):
        """Forward+backward passes per clean image, the cost model of Fast AdvProp."""
        return 1.0

    def describe(self):
        return self.name
