"""Clean and adversarial accuracy of a model on a dataset, under any strategy."""

import tensorflow as tf

from efficientnet_advprop.attacks import attack_model
from efficientnet_advprop.attacks.pgd import eval_attack_config  # noqa: F401 (re-exported)
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route
from efficientnet_advprop.recipes.base import count_correct


def main_logits_fn(model, bn_set=MAIN):
    """x in [0, 255] -> float32 logits of `model` in inference mode through `bn_set`.

    Under a mixed-precision policy, call (and trace) it inside
    `attacks.float32_compute(model)` so attacks see float32 gradients.
    """
    def logits_fn(x):
        with bn_route(bn_set):
            return tf.cast(model(x, training=False), tf.float32)

    return logits_fn


def evaluate(model, dataset, *, strategy=None, attack=None, bn_set=MAIN, seed=0,
             num_classes=None):
    """Top-1 accuracy on clean images and, with `attack`, on its adversarial images.

    The model runs in inference mode through BN set `bn_set` (main by default, the
    deployed network); the attack goes through the same set. Randomness is seeded by
    (seed, batch index, replica), so a rerun gives the same numbers.

    Args:
      dataset: finite tf.data.Dataset of (images in [0, 255], labels), batched by the
        global eval batch size.
    Returns:
      {"num_examples", "clean_accuracy"[, "adversarial_accuracy"]}.
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_classes = num_classes or model.output_shape[-1]
    dist = strategy.experimental_distribute_dataset(dataset)
    base_seed = tf.constant(int(seed), tf.int64)

    def replica_fn(images, labels, batch_index):
        images = tf.cast(images, tf.float32)
        with bn_route(bn_set):
            logits = model(images, training=False)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        clean = count_correct(labels, logits)
        if attack is None:
            return count, clean, tf.zeros([])
        ctx = tf.distribute.get_replica_context()
        step_seed = tf.random.experimental.stateless_fold_in(
            tf.stack([base_seed, batch_index]),
            tf.cast(ctx.replica_id_in_sync_group, tf.int64))
        adv = attack_model(model, images, labels, attack, bn_set=bn_set,
                           num_classes=num_classes, seed=step_seed)
        with bn_route(bn_set):
            adv_logits = model(adv, training=False)
        return count, clean, count_correct(labels, adv_logits)

    @tf.function
    def step(images, labels, batch_index):
        outs = strategy.run(replica_fn, args=(images, labels, batch_index))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, o, axis=None) for o in outs]

    totals = [0.0, 0.0, 0.0]
    for index, (images, labels) in enumerate(dist):
        outs = step(images, labels, tf.constant(index, tf.int64))
        totals = [t + float(o) for t, o in zip(totals, outs)]
    n = max(totals[0], 1.0)
    result = {"num_examples": int(totals[0]), "clean_accuracy": totals[1] / n}
    if attack is not None:
        result["adversarial_accuracy"] = totals[2] / n
    return result
