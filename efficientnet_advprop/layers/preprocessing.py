"""Input normalisation as a weightless layer, so a saved model records its preprocessing.

Models take float RGB images with values in [0, 255].
"""

import keras
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("imagenet", "advprop", "none")


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class InputNormalization(keras.layers.Layer):
    """Maps [0, 255] RGB to the range a network was trained on.

    modes:
      imagenet: ``(x - 255 * mean) / (255 * std)`` with the ImageNet channel statistics.
      advprop: ``x * 2 / 255 - 1`` (range [-1, 1], what the released AdvProp checkpoints
        expect).
      none: identity (only cast).

    The arithmetic is done in float32 and the result cast to the layer's compute dtype.
    """

    def __init__(self, mode="imagenet", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown input normalization mode {mode!r}; choose from "
                             f"{', '.join(MODES)}")
        self.mode = mode
        # Do the arithmetic in float32 even under a mixed-precision policy.
        # (`call` converts the input itself, so NumPy arrays may be passed too.)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.mode == "imagenet":
            mean = ops.convert_to_tensor([m * 255.0 for m in IMAGENET_MEAN], "float32")
            std = ops.convert_to_tensor([s * 255.0 for s in IMAGENET_STD], "float32")
            x = (x - mean) / std
        elif self.mode == "advprop":
            x = x * (2.0 / 255.0) - 1.0
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        return config
