"""Weightless layers of normaliser-free networks: scaled activations and constant scales.

An NF residual block computes ``out = shortcut + alpha * f(beta * x)``; the
activations inside ``f`` are multiplied by the ``gamma`` of
`efficientnet_advprop.layers.weight_standardization.GAMMA_TABLE` so each keeps unit
variance for unit-variance Gaussian inputs.
"""

import keras
from keras import ops

from efficientnet_advprop.layers.weight_standardization import activation_gamma

_FUNCTIONS = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": ops.relu,
    "silu": ops.silu,
    "swish": ops.silu,
    "gelu": lambda x: ops.gelu(x, approximate=False),
    "elu": ops.elu,
    "sigmoid": ops.sigmoid,
    "tanh": ops.tanh,
    "softplus": ops.softplus,
}


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class ScaledActivation(keras.layers.Layer):
    """``gamma * act(input_scale * x)``.

    Args:
      activation: a name of `GAMMA_TABLE` (relu, silu/swish, gelu, elu, sigmoid, tanh,
        softplus, identity/linear).
      input_scale: multiplies the input first (the ``beta`` of NF blocks; with ReLU the
        same as scaling the output).
      gamma: None for the table's value.
    """

    def __init__(self, activation="relu", input_scale=1.0, gamma=None, **kwargs):
        super().__init__(**kwargs)
        if activation not in _FUNCTIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from "
                             f"{', '.join(_FUNCTIONS)}")
        self.activation = activation
        self.input_scale = float(input_scale)
        self.gamma = activation_gamma(activation) if gamma is None else float(gamma)
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        x = inputs
        if self.input_scale != 1.0:
            x = x * ops.cast(self.input_scale, x.dtype)
        x = _FUNCTIONS[self.activation](x)
        if self.gamma != 1.0:
            x = x * ops.cast(self.gamma, x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"activation": self.activation, "input_scale": self.input_scale,
                       "gamma": self.gamma})
        return config


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class Scale(keras.layers.Layer):
    """Multiplies by a fixed constant (the ``alpha`` of NF residual branches)."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        return inputs * ops.cast(self.scale, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["scale"] = self.scale
        return config
