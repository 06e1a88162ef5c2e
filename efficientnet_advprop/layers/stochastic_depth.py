"""Stochastic depth ("drop connect" in the official EfficientNet code).

During training every sample of the batch keeps its residual branch with probability
``survival_prob``; kept samples are scaled by ``1 / survival_prob`` so the expectation is
unchanged. At inference (or with ``survival_prob == 1``) the layer is the identity.
"""

import keras
from keras import ops

from efficientnet_advprop import seam


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class StochasticDepth(keras.layers.Layer):
    """Per-sample residual-branch dropping: ``inputs / survival_prob * mask``.

    Args:
      survival_prob: probability in (0, 1] that a sample's branch is kept.
      seed: optional integer seed of the layer's `keras.random.SeedGenerator`.
    """

    def __init__(self, survival_prob, seed=None, **kwargs):
        super().__init__(**kwargs)
        survival_prob = float(survival_prob)
        if not 0.0 < survival_prob <= 1.0:
            raise ValueError(f"survival_prob must be in (0, 1], got {survival_prob}")
        self.survival_prob = survival_prob
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self.built = True

    def call(self, inputs, training=None):
        if not training or self.survival_prob == 1.0:
            return inputs
        batch = ops.shape(inputs)[0]
        noise_shape = (batch,) + (1,) * (len(inputs.shape) - 1)
        # Official: floor(survival_prob + U[0, 1)) is 1 with probability survival_prob.
        # The mask is drawn in float32 so low-precision dtypes do not bias it.
        replicas, replica_id = seam.replica_position()
        if replicas > 1:
            # Under tf.distribute every replica holds the same seed state (Keras'
            # Dropout then drops the same samples on every replica); draw one block of
            # noise for all replicas and take this replica's slice instead.
            random = keras.random.uniform((replicas,) + noise_shape, dtype="float32",
                                          seed=self.seed_generator)
            random = ops.take(random, replica_id, axis=0)
        else:
            random = keras.random.uniform(noise_shape, dtype="float32",
                                          seed=self.seed_generator)
        mask = ops.cast(ops.floor(self.survival_prob + random), inputs.dtype)
        return inputs / ops.cast(self.survival_prob, inputs.dtype) * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"survival_prob": self.survival_prob, "seed": self.seed})
        return config
