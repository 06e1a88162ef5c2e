"""The backend seam: the few operations that differ between the TensorFlow and the JAX
engines, behind one interface. Everything else in layers/, models/, attacks/, recipes/
and the training arithmetic is written in `keras.ops` and runs on either backend;
nothing outside this package branches on the backend.

Replicas:
  replica_position() -> (replicas in sync, this replica's id) of the step being traced:
    under a tf.distribute strategy its replica context; on JAX always (1, 0), since a
    jitted step there sees *global* arrays (keras.distribution shards them; XLA adds
    the collectives), so batch statistics over an array are already over all devices.
  grouped_replica_mean(values, group_size) -> the mean of `values` [N] over the
    `group_size` consecutive replicas that include this one (one replica on JAX).
  all_gather(x) -> x of every replica concatenated along axis 0 (JAX: x).
  replica_sum(values) -> a list of tensors summed over replicas (JAX: unchanged).
  shifted_depthwise() -> True on the JAX engine on a CPU (layers/depthwise.py).

Gradients (the one thing Keras 3 leaves to each backend):
  value_and_grad(fn, variables, inputs=()) -> (value, aux, variable_grads, input_grads)
    of `value, aux = fn(*inputs)`, where `fn` may call Keras models statefully
    (`model(x, training=True)`): on TensorFlow under a GradientTape; on JAX with
    `jax.value_and_grad` over the variables' values inside a `keras.StatelessScope`,
    whose updates (BN moving statistics, seed generators) are handed on to the
    enclosing scope, or assigned to the variables when there is none.
  input_gradient(fn, x) -> (grad, aux) of `value, aux = fn(x)` with respect to `x`.

Random numbers (stateless, keyed by a [2]-integer seed tensor: int64 on TensorFlow, as
tf.random's stateless ops take it, so the TF engine's streams are what they always
were; uint32 on JAX, a raw threefry key). The two backends draw different numbers
from the same seed:
  make_seed(a, b), fold_in(seed, tag), uniform(shape, seed, minval, maxval, dtype)
  (an integer dtype draws integers in [minval, maxval)), normal(shape, seed),
  gamma(shape, seed, alpha), shuffle(x, seed) (a permutation of axis 0).
  fixed_draws(): a context in which every one of these draws from NumPy, keyed by
    the seed's value, so that both backends draw the same numbers (eager code only:
    the seeds must be concrete). The engine parity tests run recipes inside it.

The implementation is chosen by `keras.backend.backend()` when first used; importing
this module imports neither TensorFlow nor JAX.
"""

import contextlib

import keras
import numpy as np

_IMPL = {}
_FIXED = {"on": False}


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


def backend():
    """'tensorflow' or 'jax' (raises for any other Keras backend)."""
    _impl()
    return keras.backend.backend()


# ------------------------------------------------------------------------- replicas
def replica_position():
    return _impl().replica_position()


def grouped_replica_mean(values, group_size):
    return _impl().grouped_replica_mean(values, group_size)


def all_gather(x):
    return _impl().all_gather(x)


def shifted_depthwise():
    """Whether depthwise convolutions should run as shifted multiply-adds (the JAX
    engine on a CPU, where XLA's grouped convolution is slow; layers/depthwise.py)."""
    return _impl().shifted_depthwise()


def replica_sum(values):
    return _impl().replica_sum(values)


# ------------------------------------------------------------------------ gradients
def value_and_grad(fn, variables, inputs=()):
    return _impl().value_and_grad(fn, list(variables), tuple(inputs))


def input_gradient(fn, x):
    value, aux, _, (grad,) = value_and_grad(fn, [], (x,))
    del value
    return grad, aux


# --------------------------------------------------------------------------- random
@contextlib.contextmanager
def fixed_draws():
    """Random draws from NumPy keyed by the (concrete) seed, equal on both backends."""
    previous, _FIXED["on"] = _FIXED["on"], True
    try:
        yield
    finally:
        _FIXED["on"] = previous


def _rng(seed, *extra):
    words = [int(w) & 0xFFFFFFFF for w in np.asarray(keras.ops.convert_to_numpy(seed))
             .reshape(-1)]
    return np.random.default_rng(words + [int(e) & 0xFFFFFFFF for e in extra])


def _shape(shape):
    return tuple(int(s) for s in shape)


def make_seed(a, b=0):
    return _impl().make_seed(a, b)


def fold_in(seed, tag):
    if _FIXED["on"]:
        tag = int(keras.ops.convert_to_numpy(tag))
        return _impl().make_seed(*_rng(seed, tag).integers(0, 2**31 - 1, 2).tolist())
    return _impl().fold_in(seed, tag)


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype="float32"):
    if _FIXED["on"]:
        if np.issubdtype(np.dtype(dtype), np.integer):
            values = _rng(seed).integers(minval, maxval, _shape(shape))
        else:
            values = _rng(seed).uniform(minval, maxval, _shape(shape))
        return keras.ops.convert_to_tensor(values.astype(dtype))
    return _impl().uniform(shape, seed, minval, maxval, dtype)


def normal(shape, seed, dtype="float32"):
    if _FIXED["on"]:
        values = _rng(seed).standard_normal(_shape(shape))
        return keras.ops.convert_to_tensor(values.astype(dtype))
    return _impl().normal(shape, seed, dtype)


def gamma(shape, seed, alpha, dtype="float32"):
    if _FIXED["on"]:
        alpha = np.asarray(keras.ops.convert_to_numpy(alpha), np.float64)
        values = _rng(seed).gamma(np.broadcast_to(alpha, _shape(shape)))
        return keras.ops.convert_to_tensor(values.astype(dtype))
    return _impl().gamma(shape, seed, alpha, dtype)


def shuffle(x, seed):
    if _FIXED["on"]:
        order = _rng(seed).permutation(int(x.shape[0]))
        return keras.ops.take(x, keras.ops.convert_to_tensor(order.astype("int32")), axis=0)
    return _impl().shuffle(x, seed)
