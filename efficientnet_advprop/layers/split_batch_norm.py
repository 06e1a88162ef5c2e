"""Batch normalisation with one main and N auxiliary parameter sets (AdvProp).

AdvProp (Xie et al., CVPR 2020) keeps every weight of the network shared except the
batch norms: clean images are normalised by the *main* BN, adversarial images by an
*auxiliary* BN with its own gamma, beta and moving statistics. `SplitBatchNorm` holds
all of these sets in one layer, so a model is built once and routed per call.

Routing
-------
Which set a call uses is chosen by a *route*, set for a whole model call with the
`bn_route` context manager (it is read while the function is traced, so it works inside
`tf.function`, under `strategy.run` and with `jit_compile`)::

    with bn_route(MAIN):                     # whole batch through the main BN
        logits = model(x, training=True)
    with bn_route([MAIN, AUX], sizes=[b, b]):  # first b images main, next b auxiliary
        logits = model(tf.concat([clean, adv], 0), training=True)
    with bn_route(AUX, update_stats=False):  # batch statistics, moving stats frozen
        logits = model(x_adv, training=True)
    with bn_route(AUX, groups=8):            # ghost BN: 8 groups, own statistics each
        logits = model(x_adv, training=True)
    with bn_route(assignment=tags):          # per-image sets from an int tensor [B]
        logits = model(x, training=True)
    with bn_route(MAIN, use_moving_stats=flag):  # "consistent BN" when flag is True
        logits = model(x, training=True)
    with bn_route(mix=(MAIN, AUX), mix_weight=g):  # inference: (1-g) main + g aux
        logits = model(x, training=False)      # in every layer (or `mix_layers`)

Set 0 is the main BN, sets 1..N the auxiliary ones. Without a route the main BN is used,
so a model with auxiliary sets behaves like a plain network at inference.

Distribution
------------
Batch statistics are per replica by default (as the official GPU code); pass
``synchronized=True`` to average them over the replicas of the current replica
context, all of them or consecutive groups of ``sync_group_size`` replicas (the
official TPU code syncs in groups; see `official_sync_group_size`). Moving
statistics are ``ON_READ`` variables with ``MEAN`` aggregation: each
replica updates its own copy without any cross-replica traffic (so the update compiles
with XLA), and every read from cross-replica context -- checkpoints, exports, EMA,
`sync_moving_statistics` -- sees the mean over replicas. Keras' own BatchNormalization
uses aggregation ``NONE`` and silently keeps one replica's copy instead.
"""

import contextlib
import math
import numbers
import threading

import keras
from keras import ops

from efficientnet_advprop import seam

MAIN = 0
AUX = 1

_route_state = threading.local()


class BNRoute:
    """Where each image of a batch is normalised, and with which statistics.

    Attributes:
      sets: tuple of BN set indices (0 = main, k >= 1 = auxiliary set k), one per
        consecutive segment of the batch.
      sizes: tuple of segment sizes, or None to split the batch in equal parts.
      update_stats: whether training-mode calls update the moving statistics; a bool
        for every segment or a tuple, one per segment.
      groups: ghost batch norm: a segment is cut into that many equal consecutive
        groups, each normalised with its own batch statistics (Fast AdvProp's shuffle
        BN on one device); an int for every segment or a tuple, one per segment. The
        moving statistics move towards the mean over groups.
      assignment: optional int tensor [B] giving each image's set (per-image routing,
        e.g. by data source); replaces `sets`/`sizes`. Statistics are computed per set
        over the images routed to it (masked moments), so shapes stay static.
      use_moving_stats: in training mode, normalise with the moving statistics instead
        of batch statistics and leave them unchanged ("consistent BN", Xie & Yuille
        2020). A Python bool or a scalar bool tensor (switched inside the graph).
      mix: inference only: a pair of sets (a, b); each routed layer outputs
        (1 - mix_weight) * BN_a(x) + mix_weight * BN_b(x), both with moving statistics
        (the per-layer MBN interpolation of mixture-BN adversarial training).
      mix_weight: the weight g of set b, a float or a scalar tensor (so a sweep over g
        needs no retrace).
      mix_layers: None (every SplitBatchNorm mixes) or a collection of layer names that
        mix; the others use set a alone.
    """

    def __init__(self, sets=MAIN, sizes=None, update_stats=True, groups=1,
                 assignment=None, use_moving_stats=False, mix=None, mix_weight=0.0,
                 mix_layers=None):
        if isinstance(sets, int):
            sets = (sets,)
        sets = tuple(int(s) for s in sets)
        if not sets or any(s < 0 for s in sets):
            raise ValueError(f"BN route sets must be non-negative indices, got {sets}")
        if sizes is not None:
            sizes = tuple(sizes)
            if len(sizes) != len(sets):
                raise ValueError(
                    f"BN route has {len(sets)} sets but {len(sizes)} segment sizes")
        groups = (tuple(int(g) for g in groups) if isinstance(groups, (tuple, list))
                  else (int(groups),) * len(sets))
        if len(groups) != len(sets) or any(g < 1 for g in groups):
            raise ValueError(f"BN route groups must be >= 1, one per set (or one for "
                             f"all), got {groups} for sets {sets}")
        if assignment is not None and max(groups) != 1:
            raise ValueError("a BN route takes either a per-image assignment or ghost "
                             "groups, not both")
        self.sets = sets
        self.sizes = sizes
        update_stats = (tuple(bool(u) for u in update_stats)
                        if isinstance(update_stats, (tuple, list))
                        else (bool(update_stats),) * len(sets))
        if len(update_stats) != len(sets):
            raise ValueError(f"BN route has {len(sets)} sets but {len(update_stats)} "
                             "update_stats flags")
        self.update_stats = update_stats
        self.groups = groups
        self.assignment = assignment
        self.use_moving_stats = use_moving_stats
        if mix is not None:
            mix = tuple(int(m) for m in mix)
            if len(mix) != 2 or min(mix) < 0:
                raise ValueError(f"BN route mix must be a pair of set indices, got {mix}")
            if assignment is not None or len(sets) != 1:
                raise ValueError("a BN route mixes two sets for the whole batch; it takes "
                                 "no segments or per-image assignment")
        self.mix = mix
        self.mix_weight = mix_weight
        self.mix_layers = None if mix_layers is None else frozenset(mix_layers)

    def __repr__(self):
        return (f"BNRoute(sets={self.sets}, sizes={self.sizes}, "
                f"update_stats={self.update_stats}, groups={self.groups}, "
                f"assignment={'tensor' if self.assignment is not None else None})")


_DEFAULT_ROUTE = BNRoute()


def current_route():
    """The innermost active `BNRoute` of this thread (main BN when none is active)."""
    stack = getattr(_route_state, "stack", None)
    return stack[-1] if stack else _DEFAULT_ROUTE


@contextlib.contextmanager
def bn_route(sets=MAIN, sizes=None, update_stats=True, *, groups=1, assignment=None,
             use_moving_stats=False, mix=None, mix_weight=0.0, mix_layers=None):
    """Routes every SplitBatchNorm called inside the block; see the module docstring
    and `BNRoute` for the arguments."""
    route = sets if isinstance(sets, BNRoute) else BNRoute(
        sets, sizes, update_stats, groups=groups, assignment=assignment,
        use_moving_stats=use_moving_stats, mix=mix, mix_weight=mix_weight,
        mix_layers=mix_layers)
    stack = getattr(_route_state, "stack", None)
    if stack is None:
        stack = _route_state.stack = []
    stack.append(route)
    try:
        yield route
    finally:
        stack.pop()


def _set_prefix(index):
    return "" if index == MAIN else f"aux{index}_"


def is_auxiliary_variable(variable):
    """True for the gamma, beta and moving statistics of an auxiliary BN set."""
    name = variable.path if hasattr(variable, "path") else variable.name
    return any(part.startswith("aux") and part[3:4].isdigit()
               for part in name.replace(":", "/").split("/"))


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class SplitBatchNorm(keras.layers.Layer):
    """Batch norm over the last axis with a main set and `num_aux` auxiliary sets.

    Args:
      num_aux: number of auxiliary sets (0 gives a plain batch norm with
        replica-consistent moving statistics).
      momentum, epsilon: as in `keras.layers.BatchNormalization` (moving = momentum *
        moving + (1 - momentum) * batch; variance is the biased batch variance).
      center, scale: whether each set has beta / gamma.
      synchronized: average the batch moments over replicas in replica context.
      sync_group_size: with `synchronized`, the replicas are cut into consecutive
        groups of this many (replica ids 0..k-1, k..2k-1, ...) and each image is
        normalised with its group's moments; None: one group of all replicas. It must
        divide the number of replicas in sync (1 = per-replica statistics).
      gamma_initializer, beta_initializer: initialisers of every set's gamma, beta.
    """

    def __init__(self, num_aux=1, momentum=0.99, epsilon=1e-3, center=True,
                 scale=True, synchronized=False, gamma_initializer="ones",
                 beta_initializer="zeros", sync_group_size=None, **kwargs):
        super().__init__(**kwargs)
        if num_aux < 0:
            raise ValueError(f"num_aux must be >= 0, got {num_aux}")
        if sync_group_size is not None:
            if (isinstance(sync_group_size, bool)
                    or not isinstance(sync_group_size, numbers.Integral) or sync_group_size < 1):
                raise ValueError(f"sync_group_size must be an integer >= 1 or None, got "
                                 f"{sync_group_size!r}")
            if not synchronized:
                raise ValueError("sync_group_size needs synchronized=True")
            sync_group_size = int(sync_group_size)
        self.sync_group_size = sync_group_size
        self.num_aux = int(num_aux)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.synchronized = synchronized
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.supports_masking = True

    @property
    def num_sets(self):
        return self.num_aux + 1

    def build(self, input_shape):
        channels = input_shape[-1]
        shape = (channels,)
        self.gammas, self.betas, self.moving_means, self.moving_variances = [], [], [], []
        for index in range(self.num_sets):
            prefix = _set_prefix(index)
            self.gammas.append(self.add_weight(
                shape=shape, name=prefix + "gamma", initializer=self.gamma_initializer,
                trainable=True, autocast=False) if self.scale else None)
            self.betas.append(self.add_weight(
                shape=shape, name=prefix + "beta", initializer=self.beta_initializer,
                trainable=True, autocast=False) if self.center else None)
            for store, stat, init in ((self.moving_means, "moving_mean", "zeros"),
                                      (self.moving_variances, "moving_variance", "ones")):
                store.append(self._add_moving_statistic(prefix + stat, shape, init))

    def _add_moving_statistic(self, name, shape, initializer):
        # `add_weight` cannot set the synchronization; create the variable the way it
        # does (same name scope, same tracking) with ON_READ / MEAN.
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer=keras.initializers.get(initializer), shape=shape,
                dtype="float32", trainable=False, autocast=False, name=name,
                synchronization="on_read", aggregation="mean")
        self._track_variable(variable)
        return variable

    # Main-set aliases so the layer reads like a BatchNormalization.
    @property
    def gamma(self):
        return self.gammas[MAIN]

    @property
    def beta(self):
        return self.betas[MAIN]

    @property
    def moving_mean(self):
        return self.moving_means[MAIN]

    @property
    def moving_variance(self):
        return self.moving_variances[MAIN]

    def _sync_group_size(self, replicas):
        """Replicas per synchronisation group among `replicas` (1: no cross-replica
        sync)."""
        if not self.synchronized or replicas == 1:
            return 1
        group = self.sync_group_size or replicas
        if replicas % group:
            raise ValueError(f"{self.name}: sync_group_size={group} does not divide the "
                             f"{replicas} replicas in sync")
        return group

    def _moments(self, x):
        axes = list(range(len(x.shape) - 1))
        replicas, _ = seam.replica_position()
        group = self._sync_group_size(replicas)
        if group > 1:
            # Equal per-replica batches: the mean of local E[x], E[x^2] over a group is
            # the group's; the variance follows as E[x^2] - E[x]^2 (as the official
            # TpuBatchNormalization).
            channels = x.shape[-1]
            local = ops.concatenate([ops.mean(x, axis=axes),
                                     ops.mean(ops.square(x), axis=axes)], axis=0)
            moments = seam.grouped_replica_mean(local, group)
            mean, mean_sq = moments[:channels], moments[channels:]
            return mean, ops.maximum(mean_sq - ops.square(mean), 0.0)
        return two_pass_moments(x, axes)

    def _normalize(self, x, index, mean, variance):
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * self.gammas[index]
        offset = -mean * inv
        if self.center:
            offset = offset + self.betas[index]
        return x * inv + offset

    def _check_set(self, index):
        if index >= self.num_sets:
            raise ValueError(
                f"{self.name}: BN route asks for set {index}, the layer has sets "
                f"0..{self.num_sets - 1}")

    def _update_moving(self, index, mean, variance, keep=None):
        """moving -= (moving - batch) * (1 - momentum); `keep` (a 0/1 float scalar)
        leaves them unchanged where it is 1."""
        decay = 1.0 - self.momentum
        if keep is not None:
            decay = decay * (1.0 - keep)
        for var, value in ((self.moving_means[index], mean),
                           (self.moving_variances[index], variance)):
            var.assign_sub((var - value) * decay)

    def _consistent(self, index, mean, variance, flag):
        """The batch statistics, or the moving ones where `flag` (consistent BN) is 1."""
        if flag is None:
            return mean, variance
        return (flag * self.moving_means[index] + (1.0 - flag) * mean,
                flag * self.moving_variances[index] + (1.0 - flag) * variance)

    @staticmethod
    def _moving_flag(route):
        """None (batch statistics), True, or a float 0/1 scalar tensor."""
        flag = route.use_moving_stats
        if isinstance(flag, bool) or flag is None:
            return True if flag else None
        return ops.cast(flag, "float32")

    def _apply_set(self, x, index, training, route, groups=1, update=True):
        self._check_set(index)
        moving = (self.moving_means[index], self.moving_variances[index])
        flag = self._moving_flag(route) if training else True
        if flag is True:
            return self._normalize(x, index, *moving)
        if groups > 1:
            return self._apply_ghost(x, index, flag, groups, update)
        mean, variance = self._moments(x)
        if update:
            self._update_moving(index, mean, variance, keep=flag)
        mean, variance = self._consistent(index, mean, variance, flag)
        return self._normalize(x, index, mean, variance)

    def _apply_ghost(self, x, index, flag, groups, update):
        if self.synchronized:
            raise ValueError(f"{self.name}: ghost BN groups and synchronized batch "
                             "statistics do not combine")
        n = x.shape[0]
        if n is None or n % groups:
            raise ValueError(f"{self.name}: a segment of {n} images cannot be cut into "
                             f"{groups} equal ghost BN groups")
        grouped = ops.reshape(x, [groups, n // groups] + list(x.shape[1:]))
        axes = list(range(1, len(grouped.shape) - 1))
        mean, variance = two_pass_moments(grouped, axes, keepdims=True)
        if update:
            flat = [-1, x.shape[-1]]
            self._update_moving(index, ops.mean(ops.reshape(mean, flat), 0),
                                ops.mean(ops.reshape(variance, flat), 0), keep=flag)
        mean, variance = self._consistent(index, mean, variance, flag)
        out = self._normalize(grouped, index, mean, variance)
        return ops.reshape(out, ops.shape(x))

    def _apply_assignment(self, x, training, route):
        """Per-image routing: each image normalised by the set `assignment` names."""
        assignment = ops.cast(route.assignment, "int32")
        used = sorted(set(route.sets)) if route.sets != (MAIN,) else range(self.num_sets)
        flag = self._moving_flag(route) if training else True
        bshape = [-1] + [1] * (len(x.shape) - 1)
        out = ops.zeros_like(x)
        for index in used:
            self._check_set(index)
            mask = ops.reshape(ops.cast(ops.equal(assignment, index), "float32"), bshape)
            moving = (self.moving_means[index], self.moving_variances[index])
            if flag is True:
                mean, variance = moving
            else:
                axes = list(range(len(x.shape) - 1))
                per_image = float(math.prod(x.shape[1:-1]))
                count = ops.sum(mask) * per_image
                safe = ops.maximum(count, 1.0)
                mean = ops.sum(x * mask, axis=axes) / safe
                variance = ops.sum(ops.square(x - mean) * mask, axis=axes) / safe
                empty = ops.cast(ops.equal(count, 0.0), "float32")
                if all(route.update_stats):
                    keep = empty if flag is None else ops.maximum(empty, flag)
                    self._update_moving(index, mean, variance, keep=keep)
                mean, variance = self._consistent(index, mean, variance, flag)
            out += mask * self._normalize(x, index, mean, variance)
        return out

    def _apply_mix(self, x, training, route):
        """(1 - g) BN_a(x) + g BN_b(x) with moving statistics (inference only)."""
        if training:
            raise ValueError(f"{self.name}: a mixing BN route is for inference "
                             "(training=False)")
        first, second = route.mix
        if route.mix_layers is not None and self.name not in route.mix_layers:
            second = first
        for index in (first, second):
            self._check_set(index)
        out = self._normalize(x, first, self.moving_means[first],
                              self.moving_variances[first])
        if second == first:
            return out
        other = self._normalize(x, second, self.moving_means[second],
                                self.moving_variances[second])
        weight = ops.cast(route.mix_weight, "float32")
        return out + weight * (other - out)

    def call(self, inputs, training=None, route=None):
        route = route if route is not None else current_route()
        training = bool(training)
        x = ops.cast(inputs, "float32")
        if route.mix is not None:
            out = self._apply_mix(x, training, route)
        elif route.assignment is not None:
            out = self._apply_assignment(x, training, route)
        elif len(route.sets) == 1:
            out = self._apply_set(x, route.sets[0], training, route, route.groups[0],
                                  route.update_stats[0])
        else:
            if route.sizes is not None:  # split points of the segments
                parts = ops.split(x, [int(i) for i in _cumulative(route.sizes)], axis=0)
            else:
                parts = ops.split(x, len(route.sets), axis=0)
            out = ops.concatenate([
                self._apply_set(part, index, training, route, groups, update)
                for part, index, groups, update in zip(parts, route.sets, route.groups,
                                                       route.update_stats)], axis=0)
        return ops.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_aux": self.num_aux,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "synchronized": self.synchronized,
            "sync_group_size": self.sync_group_size,
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
        })
        return config


def two_pass_moments(x, axes, keepdims=False):
    """Mean and (biased) variance over `axes`, the variance from the centred values
    (no E[x^2] - E[x]^2 cancellation in float32), as tf.nn.moments computes them."""
    mean = ops.mean(x, axis=axes, keepdims=True)
    variance = ops.mean(ops.square(x - ops.stop_gradient(mean)), axis=axes,
                        keepdims=True)
    if not keepdims:
        mean, variance = ops.squeeze(mean, axis=axes), ops.squeeze(variance, axis=axes)
    return mean, variance


def _cumulative(sizes):
    """Split points of consecutive segments of `sizes` (all but the last end)."""
    points, total = [], 0
    for size in list(sizes)[:-1]:
        total += int(size)
        points.append(total)
    return points


def official_sync_group_size(num_replicas):
    """Replicas per cross-replica BN group in the official EfficientNet TPU code.

    `TpuBatchNormalization` (tensorflow/tpu models/official/efficientnet/utils.py) does
    not synchronise at all on 8 replicas or fewer (a v2-8/v3-8: 1 is returned here),
    and beyond that averages the moments over groups of max(8, replicas // 8)
    consecutive replicas, so a large pod has at most 8 groups.
    """
    if num_replicas <= 8:
        return 1
    return max(8, num_replicas // 8)


def bn_sets_of_variables(model):
    """{id(variable): set index} for the gamma and beta of every SplitBatchNorm set;
    variables outside a SplitBatchNorm are not in the map."""
    out = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNorm):
            for index in range(layer.num_sets):
                for var in (layer.gammas[index], layer.betas[index]):
                    if var is not None:
                        out[id(var)] = index
    return out


def sync_moving_statistics(model):
    """Makes every replica's copy of the moving statistics equal to their mean.

    Call it in cross-replica context (outside `strategy.run`) before evaluating inside
    `strategy.run`; reads from cross-replica context already see the mean.
    """
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNorm):
            for var in layer.moving_means + layer.moving_variances:
                var.assign(var.value)
