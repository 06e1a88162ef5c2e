"""Scaled weight standardisation and activation gains of normaliser-free networks.

Brock et al. 2021 ("Characterizing signal propagation to close the performance gap in
unnormalized ResNets"; "High-performance large-scale image recognition without
normalization") replace batch norm by two fixed scalings:

* `WeightStandardizedConv2D`: every output channel's kernel is re-parameterised as
  ``w_hat = gain * (w - mean(w)) / sqrt(max(var(w) * fan_in, eps))`` with
  ``fan_in = kh * kw * in_channels / groups``, the biased variance over the kernel's
  (kh, kw, in) axes, and a learnable per-output-channel ``gain``. A unit-variance input
  then gives a roughly unit-variance (pre-bias) output.
* `GAMMA_TABLE`: ``gamma = 1 / sqrt(Var[f(z)])`` for ``z ~ N(0, 1)``, so that
  ``gamma * f(z)`` has unit variance (`ScaledActivation` in
  `efficientnet_advprop.layers.nf_layers` applies it).

Epsilon: the NFNet (DeepMind JAX) convention, a FLOOR on the scaled variance,
``rsqrt(max(var * fan_in, 1e-4))``, not ``1e-5`` added to ``var``. A kernel whose
channel is (almost) constant thus maps to (almost) zero instead of being blown up, and
for ordinary kernels (``var * fan_in`` near 1) the epsilon has no effect at all.
"""

import math

import keras
from keras import ops

WS_EPSILON = 1e-4

# gamma = 1 / sqrt(Var[f(z)]), z ~ N(0, 1), by adaptive quadrature (scipy.integrate.quad,
# rel. error < 1e-12); checked again in tests/test_nf_resnet.py. relu is exactly
# sqrt(2 / (1 - 1 / pi)). (The NFNet code's table holds Monte-Carlo estimates, e.g.
# relu 1.7139588594436646, which is 6e-4 above the exact value; the difference does not
# matter in practice.)
GAMMA_TABLE = {
    "identity": 1.0,
    "linear": 1.0,
    "relu": math.sqrt(2.0 / (1.0 - 1.0 / math.pi)),  # 1.7128585504496627
    "silu": 1.7871872221004417,
    "swish": 1.7871872221004417,
    "gelu": 1.700926243363333,  # exact (erf) gelu
    "elu": 1.2708434178501964,  # alpha = 1
    "sigmoid": 4.801313372039966,
    "tanh": 1.5925374197228312,
    "softplus": 1.9191259801076574,
}


def activation_gamma(activation):
    """The `GAMMA_TABLE` entry of an activation name (ValueError when unknown)."""
    try:
        return GAMMA_TABLE[activation]
    except (KeyError, TypeError):
        raise ValueError(f"no gamma for activation {activation!r}; choose from "
                         f"{', '.join(GAMMA_TABLE)}") from None


def standardize_kernel(kernel, gain=None, epsilon=WS_EPSILON):
    """Scaled weight standardisation of a channels-last kernel ``[..., out]``.

    Statistics are taken over all axes but the last, in float32; the result has the
    kernel's dtype. ``gain`` (shape ``[out]``) multiplies each output channel.
    """
    dtype = kernel.dtype
    w = ops.cast(kernel, "float32")
    axes = tuple(range(len(w.shape) - 1))
    fan_in = 1
    for dim in w.shape[:-1]:
        fan_in *= int(dim)
    mean = ops.mean(w, axis=axes, keepdims=True)
    var = ops.var(w, axis=axes, keepdims=True)  # biased
    scale = ops.rsqrt(ops.maximum(var * float(fan_in), epsilon))
    if gain is not None:
        scale = scale * ops.cast(gain, "float32")
    return ops.cast((w - mean) * scale, dtype)


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class WeightStandardizedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a scaled weight-standardised kernel and a gain.

    The convolution uses ``standardize_kernel(kernel, gain, epsilon)`` (see the module
    docstring); bias and activation are applied as in `Conv2D`. Strides, padding,
    dilation and groups behave as in `Conv2D` (``fan_in = kh * kw * in / groups``).
    The standardisation is computed in float32 and cast to the compute dtype.

    Args:
      filters, kernel_size, ...: as `keras.layers.Conv2D` (channels_last only).
      gain_initializer: initialiser of the per-output-channel gain (default ones;
        "zeros" makes the layer output its bias only, for zero-initialised residual
        branches).
      epsilon: floor on ``var * fan_in``.
      kernel_initializer: default ``VarianceScaling(1, fan_in, normal)``; any
        non-constant initialiser works since the kernel is standardised.
    """

    def __init__(self, filters, kernel_size, gain_initializer="ones",
                 epsilon=WS_EPSILON, kernel_initializer=None, **kwargs):
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.VarianceScaling(
                1.0, mode="fan_in", distribution="untruncated_normal")
        super().__init__(filters, kernel_size, kernel_initializer=kernel_initializer,
                         **kwargs)
        if self.data_format != "channels_last":
            raise ValueError("WeightStandardizedConv2D supports channels_last only")
        self.gain_initializer = keras.initializers.get(gain_initializer)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(name="gain", shape=(self.filters,),
                                    initializer=self.gain_initializer, trainable=True)

    def standardized_kernel(self):
        """The kernel the convolution actually uses (float32 variables -> float32)."""
        return standardize_kernel(self.kernel, self.gain, self.epsilon)

    def convolution_op(self, inputs, kernel):
        kernel = standardize_kernel(kernel, self.gain, self.epsilon)
        return super().convolution_op(inputs, kernel)

    def _saved_variables(self, kernel):
        variables = [kernel]
        if self.use_bias:
            variables.append(self.bias)
        variables.append(self.gain)
        return variables

    # `BaseConv` saves and loads only (kernel, bias): the gain must be added here, or
    # `.keras` files would silently lose it.
    def save_own_variables(self, store):
        if not self.built:
            return
        for i, variable in enumerate(self._saved_variables(self.kernel)):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables(self._kernel)
        if len(store.keys()) != len(variables):
            raise ValueError(f"layer {self.name!r} expects {len(variables)} saved "
                             f"variables, got {len(store.keys())}")
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    def get_config(self):
        config = super().get_config()
        config.update({
            "gain_initializer": keras.initializers.serialize(self.gain_initializer),
            "epsilon": self.epsilon,
        })
        return config
