"""Depthwise convolution that runs fast on both engines.

Keras' DepthwiseConv2D is a grouped convolution (one group per channel). XLA:CPU runs
grouped convolutions slowly: on this project's 2-core machine a 3x3 depthwise layer's
forward and backward took 2.4x as long as the same arithmetic written as k x k shifted
multiply-adds, which XLA fuses into one elementwise loop. So on the JAX engine on a CPU
(`seam.shifted_depthwise()`), `call` computes that sum; elsewhere -- TensorFlow, and
JAX on GPUs and TPUs, whose convolution libraries handle groups well -- it is Keras'
own layer. Both give the same numbers up to float32 summation order; weights,
variable names and serialised configs are the Keras layer's.
"""

import keras
from keras import ops

from efficientnet_advprop import seam


def _same_padding(size, kernel, stride):
    """(before, after, output size) of TensorFlow's SAME padding along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """keras.layers.DepthwiseConv2D (depth multiplier 1, no dilation on the shifted
    path) computed as shifted multiply-adds where that is faster (module docstring)."""

    def call(self, inputs):
        if (not seam.shifted_depthwise() or self.depth_multiplier != 1
                or tuple(self.dilation_rate) != (1, 1) or self.data_format != "channels_last"):
            return super().call(inputs)
        kh, kw = self.kernel_size
        sh, sw = self.strides
        height, width = inputs.shape[1], inputs.shape[2]
        if self.padding == "same":
            top, bottom, out_h = _same_padding(height, kh, sh)
            left, right, out_w = _same_padding(width, kw, sw)
            x = ops.pad(inputs, ((0, 0), (top, bottom), (left, right), (0, 0)))
        else:
            out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
            x = inputs
        kernel = ops.cast(self.kernel, x.dtype)  # [kh, kw, channels, 1]
        out = None
        for i in range(kh):
            for j in range(kw):
                window = x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
                term = window * kernel[i, j, :, 0]
                out = term if out is None else out + term
        if self.use_bias:
            out = out + ops.cast(self.bias, out.dtype)
        if self.activation is not None:
            out = self.activation(out)
        return out
