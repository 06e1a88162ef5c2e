"""Exponential moving average of weights, as tf.train.ExponentialMovingAverage.

The official EfficientNet code averages the trainable variables *and* the BN moving
statistics with decay min(decay, (1 + step) / (10 + step)) and evaluates/exports with
the averages. Shadow copies are plain variables updated in cross-replica context, so
under tf.distribute they read the replica-mean of on-read statistics.
"""

import contextlib

import tensorflow as tf


class ExponentialMovingAverage(tf.Module):
    """Shadow copies of `variables`; `swapped()` puts the averages in the model."""

    def __init__(self, variables, decay=0.9999, use_num_updates=True, name="ema"):
        super().__init__(name=name)
        self.decay = float(decay)
        self.use_num_updates = use_num_updates
        self._variables = list(variables)
        # Trackable list: checkpoints keep the shadows by position.
        self.shadows = [tf.Variable(tf.convert_to_tensor(v), trainable=False,
                                    name=_shadow_name(v)) for v in self._variables]

    @property
    def variables_averaged(self):
        return self._variables

    def effective_decay(self, step):
        decay = tf.constant(self.decay, tf.float32)
        if self.use_num_updates:
            step = tf.cast(step, tf.float32)
            decay = tf.minimum(decay, (1.0 + step) / (10.0 + step))
        return decay

    def update(self, step):
        """shadow -= (1 - decay) * (shadow - value); call in cross-replica context."""
        decay = self.effective_decay(step)
        for shadow, var in zip(self.shadows, self._variables):
            shadow.assign_sub((1.0 - decay) * (shadow - tf.cast(var, tf.float32)))

    def reset(self):
        """Shadows := current values (after loading initial weights)."""
        for shadow, var in zip(self.shadows, self._variables):
            shadow.assign(tf.cast(var, tf.float32))

    def copy_to_model(self):
        for shadow, var in zip(self.shadows, self._variables):
            var.assign(shadow)

    @contextlib.contextmanager
    def swapped(self):
        """Model variables hold the averages inside the block, their values after."""
        backup = [tf.identity(tf.convert_to_tensor(v)) for v in self._variables]
        self.copy_to_model()
        try:
            yield
        finally:
            for var, value in zip(self._variables, backup):
                var.assign(value)


def _shadow_name(variable):
    name = getattr(variable, "path", None) or variable.name
    return name.replace(":", "_").replace("/", "__") + "__ema"
