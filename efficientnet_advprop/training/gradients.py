"""The arithmetic between a recipe's gradients and the optimizer, shared by every loop.

Both training loops -- `Trainer` (main.py) and `RecipeModel` (Keras `fit`) -- ask the
recipe for the gradients of its loss *sum* on one replica's batch
(`Recipe.gradients`, see recipes/base.py), then:

1. `mean_gradients`: divide each gradient by the global number of (weighted) samples
   that produced it -- the global batch, or the recipe's per-parameter-group
   `sample_weights` (Fast AdvProp's update-speed synchronisation);
2. `regularize_gradients`: adaptive gradient clipping (optional) and the L2 gradient
   wd * w of every non-normalisation weight (the official 0.5 * wd * ||w||^2 term);
3. hand them to a Keras optimizer in replica context, whose `apply` all-reduces them
   with a SUM over replicas (keras/src/backend/tensorflow/optimizer.py,
   `_all_reduce_sum_gradients`): per-replica gradients over the *global* count sum to
   the global mean, whatever the number of replicas. (The JAX engine has one replica:
   its jitted step sees the global batch.)

keras.ops and the seam only: both engines share this arithmetic.
"""

from keras import ops

from efficientnet_advprop import seam
from efficientnet_advprop.recipes.base import SHARED
from efficientnet_advprop.training.agc import adaptive_clip_gradients


def mean_gradients(grads, sample_weights, groups, global_batch, num_replicas):
    """Replica gradients of a loss sum -> shares of the global mean gradient.

    Args:
      grads: the recipe's gradients (None for a variable it does not touch).
      sample_weights: None (every gradient over `global_batch`) or the recipe's
        {SHARED: n, set_index: n_k, ...} local weighted sample counts; every replica
        is assumed to hold the same counts (equal replica batches), so the global
        count is `num_replicas` times the local one.
      groups: per gradient, the variable's parameter group: its BN set index
        (`bn_sets_of_variables`) or SHARED.
      global_batch: images per step over all replicas (a number or a scalar tensor).
      num_replicas: replicas in sync.
    Returns:
      the gradients, each divided by its global sample count.
    """
    if sample_weights is None:
        divisors = [global_batch] * len(grads)
    else:
        weights = {k: ops.cast(v, "float32") * float(num_replicas)
                   for k, v in sample_weights.items()}
        divisors = [ops.maximum(weights.get(group, weights[SHARED]), 1e-6)
                    for group in groups]
    return [None if g is None else g / ops.cast(d, g.dtype)
            for g, d in zip(grads, divisors)]


def regularize_gradients(grads, variables, *, weight_decay=0.0, decayed=(), agc_clip=0.0,
                         agc_eps=1e-3, agc_excluded=None, num_replicas=1):
    """Adds the L2 gradient (after AGC on the global gradient when it is on) and
    scales for the optimizer's sum over replicas.

    AGC is not linear, so it must see the gradient summed over replicas: the sum is
    all-reduced here (in replica context), clipped, and returned divided by the
    replica count (the optimizer's own all-reduce then restores the global value).
    Without AGC, each replica adds wd * w / replicas (the gradient of the official
    0.5 * wd * ||w||^2 term, shared out over the replicas).

    Args:
      grads, variables: aligned lists (None gradients stay None).
      weight_decay: the L2 coefficient wd (0: none).
      decayed: the variables that get weight decay (the Trainer's: every trainable
        variable outside a normalisation layer).
      agc_clip, agc_eps: adaptive gradient clipping threshold (0: off) and epsilon.
      agc_excluded: predicate variable -> bool of variables AGC leaves alone (the
        classifier, `agc.is_classifier_variable(model)`).
      num_replicas: replicas in sync.
    """
    decayed = {id(v) for v in decayed}
    wd = weight_decay
    if agc_clip:
        if num_replicas > 1:
            grads = seam.replica_sum(grads)
        grads = adaptive_clip_gradients(grads, variables, clip=agc_clip, eps=agc_eps,
                                        exclude=agc_excluded)
        scale = 1.0 / num_replicas
        return [None if g is None else
                (g + wd * ops.cast(v, g.dtype) if wd and id(v) in decayed else g) * scale
                for g, v in zip(grads, variables)]
    return [None if g is None else
            (g + wd / num_replicas * ops.cast(v, g.dtype)
             if wd and id(v) in decayed else g)
            for g, v in zip(grads, variables)]
