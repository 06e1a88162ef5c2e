"""The JAX side of the seam: one replica (a jitted step sees global arrays),
`jax.value_and_grad` through Keras' StatelessScope, and jax.random on raw uint32 keys."""

import jax
import jax.numpy as jnp
from keras import StatelessScope
from keras.src.backend.common.stateless_scope import get_stateless_scope


def replica_position():
    return 1, 0


def grouped_replica_mean(values, group_size):
    del group_size  # one replica: nothing to average over
    return values


def all_gather(x):
    return x


def replica_sum(values):
    return values


class _RecordingScope(StatelessScope):
    """A StatelessScope that starts from the enclosing scope's values and remembers
    which variables were assigned inside it (so the updates can be handed on)."""

    def __init__(self, base):
        super().__init__(initialize_variables=False)
        self.state_mapping = dict(base)
        self.assigned = {}

    def add_update(self, update):
        self.assigned[id(update[0])] = update[0]
        super().add_update(update)


def _current(variable, outer):
    value = outer.get_current_value(variable) if outer is not None else None
    return variable.value if value is None else value


def shifted_depthwise():
    return jax.default_backend() == "cpu"


def value_and_grad(fn, variables, inputs):
    """`fn` runs in a scope where `variables` read the traced values being
    differentiated; every other variable reads the enclosing scope's value. Variables
    assigned inside (BN moving statistics, seed-generator states) come out as aux and
    are assigned again outside, in the enclosing scope (or to the variables)."""
    outer = get_stateless_scope()
    base = dict(outer.state_mapping) if outer is not None else {}
    assigned = {}

    def inner(values, xs):
        scope = _RecordingScope(base)
        for variable, value in zip(variables, values):
            scope.state_mapping[id(variable)] = value
        with scope:
            value, aux = fn(*xs)
        assigned.update(scope.assigned)
        updates = {key: scope.state_mapping[key] for key in scope.assigned}
        return value, (aux, updates)

    start = [_current(v, outer) for v in variables]
    (value, (aux, updates)), (var_grads, input_grads) = jax.value_and_grad(
        inner, argnums=(0, 1), has_aux=True)(start, tuple(inputs))
    for key, new in updates.items():
        assigned[key].assign(new)  # recorded by the enclosing scope, if any
    return value, aux, list(var_grads), list(input_grads)


def _key(seed):
    return jnp.asarray(seed).astype(jnp.uint32)


def make_seed(a, b):
    return jnp.stack([jnp.asarray(a).astype(jnp.uint32), jnp.asarray(b).astype(jnp.uint32)])


def fold_in(seed, tag):
    return jax.random.fold_in(_key(seed), jnp.asarray(tag).astype(jnp.uint32))


def uniform(shape, seed, minval, maxval, dtype):
    dtype = jnp.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(_key(seed), shape, minval, maxval, dtype=dtype)
    return jax.random.uniform(_key(seed), shape, dtype=dtype, minval=minval, maxval=maxval)


def normal(shape, seed, dtype):
    return jax.random.normal(_key(seed), tuple(int(s) for s in shape), dtype=dtype)


def gamma(shape, seed, alpha, dtype):
    return jax.random.gamma(_key(seed), alpha, tuple(int(s) for s in shape), dtype=dtype)


def shuffle(x, seed):
    return jax.random.permutation(_key(seed), x, axis=0)
