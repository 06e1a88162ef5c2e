"""The backend seam: the few operations that differ between the TensorFlow and the JAX
engines, behind one interface. Everything else in layers/ and models/ is written in
`keras.ops` / `keras.random` and runs on either backend.

So far (the layers):
  replica_position() -> (replicas in sync, this replica's id) of the step being traced:
    under a tf.distribute strategy its replica context; on JAX always (1, 0), since a
    jitted step there sees *global* arrays (keras.distribution shards them; XLA adds
    the collectives), so batch statistics over an array are already over all devices.
  grouped_replica_mean(values, group_size) -> the mean of `values` [N] over the
    `group_size` consecutive replicas that include this one (TensorFlow only: on JAX
    there is one replica, and it returns `values`).

The implementation is chosen by `keras.backend.backend()` when first used; importing
this module imports neither TensorFlow nor JAX.
"""

import keras

_IMPL = {}


def _impl():
    name = keras.backend.backend()
    if name not in _IMPL:
        if name == "tensorflow":
            from efficientnet_advprop.seam import _tensorflow as impl
        elif name == "jax":
            from efficientnet_advprop.seam import _jax as impl
        else:
            raise NotImplementedError(f"efficientnet_advprop runs on the tensorflow and "
                                      f"jax Keras backends, not {name!r}")
        _IMPL[name] = impl
    return _IMPL[name]


def replica_position():
    return _impl().replica_position()


def grouped_replica_mean(values, group_size):
    return _impl().grouped_replica_mean(values, group_size)
