"""Adaptive gradient clipping (AGC; Brock et al. 2021, NFNets).

For every output unit ``i`` of a weight ``W`` with gradient ``G``::

    max_norm = clip * max(||W_i||, eps)
    G_i <- G_i * max_norm / ||G_i||   if ||G_i|| > max_norm, else G_i

Norms are unit-wise Frobenius norms over every axis but the last (the output unit of
Keras kernels: ``[kh, kw, in, out]`` convolutions, ``[in, out]`` dense layers); for
vectors (biases, gains) and scalars each element is its own unit. NFNets exclude the
classifier (`is_classifier_variable`) and apply AGC to the raw gradients, before weight
decay is added. keras.ops only: works in `tf.function`, with XLA and under `jax.jit`.
"""

from keras import ops

CLASSIFIER_LAYER = "predictions"


def unitwise_norm(x):
    """Euclidean norm per output unit, broadcastable to ``x``.

    Rank <= 1: ``|x|`` elementwise. Rank >= 2: the norm over all axes but the last,
    with those axes kept (shape ``[1, ..., 1, out]``).
    """
    x = ops.convert_to_tensor(x)
    rank = len(x.shape)
    if rank <= 1:
        return ops.abs(x)
    axes = tuple(range(rank - 1))
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


def _clip_one(grad, variable, clip, eps):
    dtype = grad.dtype
    g = ops.cast(grad, "float32")
    w = ops.cast(ops.convert_to_tensor(variable), "float32")
    max_norm = clip * ops.maximum(unitwise_norm(w), eps)
    g_norm = unitwise_norm(g)
    # max(g_norm, tiny) only guards the division where the branch is not taken.
    scaled = g * (max_norm / ops.maximum(g_norm, 1e-30))
    return ops.cast(ops.where(g_norm > max_norm, scaled, g), dtype)


def adaptive_clip_gradients(grads, variables, clip=0.01, eps=1e-3, exclude=None):
    """AGC of a list of gradients against their variables.

    Args:
      grads: gradients (tensors; TensorFlow's IndexedSlices are densified), or None.
      variables: the matching variables (same order and length).
      clip: the clipping ratio lambda.
      eps: floor on the weight norm (so zero-initialised weights can still move).
      exclude: optional predicate ``exclude(variable) -> bool``; gradients of the
        variables it accepts are returned unchanged (see `is_classifier_variable`).

    Returns:
      A new list of gradients; None gradients pass through as None.
    """
    grads = list(grads)
    variables = list(variables)
    if len(grads) != len(variables):
        raise ValueError(f"{len(grads)} gradients for {len(variables)} variables")
    out = []
    for grad, variable in zip(grads, variables):
        if grad is None or (exclude is not None and exclude(variable)):
            out.append(grad)
            continue
        grad = ops.convert_to_tensor(grad)  # densifies TensorFlow's IndexedSlices
        out.append(_clip_one(grad, variable, clip, eps))
    return out


def is_classifier_variable(model, layer_name=CLASSIFIER_LAYER):
    """A predicate true for the variables of ``model``'s layer ``layer_name``.

    Variables are matched by identity (and by their Keras ``path`` as a fallback), so
    the predicate also works on the variables a tf.distribute strategy hands out.
    Models without a layer of that name (user models) have their last layer with
    weights taken as the classifier.
    """
    names = [layer.name for layer in model.layers]
    if layer_name in names:
        layer = model.get_layer(layer_name)
    else:
        layer = [layer for layer in model.layers if layer.weights][-1]
    ids = {id(v) for v in layer.weights}
    paths = {getattr(v, "path", None) for v in layer.weights} - {None}

    def predicate(variable):
        if id(variable) in ids:
            return True
        return getattr(variable, "path", None) in paths

    return predicate
