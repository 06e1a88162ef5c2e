"""The TensorFlow side of the seam: tf.distribute's replica context, GradientTape and
tf.random's stateless ops (int64 seeds)."""

import tensorflow as tf


def replica_position():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return 1, 0
    return ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def group_scatter(values, replica_id, num_groups, group_size):
    """[num_groups, N]: `values` [N] in the row of `replica_id`'s group, zeros elsewhere.

    Summing these over all replicas gives every group's sum in its row.
    """
    group = tf.cast(replica_id, tf.int32) // group_size
    onehot = tf.one_hot(group, num_groups, dtype=values.dtype)
    return onehot[:, None] * values[None, :]


def group_pick(summed, replica_id, group_size):
    """The mean of `replica_id`'s group from the all-reduced `group_scatter` rows."""
    group = tf.cast(replica_id, tf.int32) // group_size
    return tf.gather(summed, group) / float(group_size)


def grouped_replica_mean(values, group_size):
    """Mean of `values` [N] over the `group_size` consecutive replicas (by replica id)
    that include this one.

    One all-reduce (SUM) of a [replicas / group_size, N] tensor in which each replica
    fills its group's row: it works under every tf.distribute strategy, moves
    replicas / group_size times the data of a global all-reduce (an all-gather of the
    per-replica values would move `replicas` times), and its gradient is again an
    all-reduce. With one group it is the plain all-reduce mean.
    """
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync
    scattered = group_scatter(values, ctx.replica_id_in_sync_group,
                              replicas // group_size, group_size)
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, scattered)
    return group_pick(summed, ctx.replica_id_in_sync_group, group_size)


def all_gather(x):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return x
    return ctx.all_gather(x, axis=0)


def replica_sum(values):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def shifted_depthwise():
    return False


def value_and_grad(fn, variables, inputs):
    with tf.GradientTape() as tape:
        for x in inputs:
            tape.watch(x)
        value, aux = fn(*inputs)
    grads = tape.gradient(value, list(variables) + list(inputs))
    return value, aux, list(grads[:len(variables)]), list(grads[len(variables):])


def make_seed(a, b):
    return tf.stack([tf.cast(a, tf.int64), tf.cast(b, tf.int64)])


def fold_in(seed, tag):
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), tag)


def uniform(shape, seed, minval, maxval, dtype):
    dtype = tf.as_dtype(dtype)
    if dtype.is_integer:
        return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64),
                                           minval=minval, maxval=maxval, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), minval=minval,
                                       maxval=maxval, dtype=dtype)


def normal(shape, seed, dtype):
    return tf.random.stateless_normal(shape, seed=tf.cast(seed, tf.int64), dtype=dtype)


def gamma(shape, seed, alpha, dtype):
    return tf.random.stateless_gamma(shape, seed=tf.cast(seed, tf.int64), alpha=alpha,
                                     dtype=dtype)


def shuffle(x, seed):
    return tf.random.experimental.stateless_shuffle(x, seed=tf.cast(seed, tf.int64))
