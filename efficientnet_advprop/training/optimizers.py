"""Optimizers with the semantics of the official EfficientNet recipe."""

import keras

OPTIMIZERS = ("rmsprop", "momentum", "sgd", "adam")


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class TF1RMSprop(keras.optimizers.RMSprop):
    """RMSProp as `tf.compat.v1.train.RMSPropOptimizer`, which trained EfficientNet.

    Keras 3's RMSprop already puts epsilon inside the square root, as TF1 does, but
    starts the mean-square slot at 0; TF1 starts it at 1. With decay 0.9 and a slot at
    0, the first updates are ~3x larger (1/sqrt(0.1)) than TF1's, which matters in the
    warm-up of large-batch runs. This class only changes that initial value.

    update: ms = rho * ms + (1 - rho) * g^2; mom = momentum * mom + lr * g /
    sqrt(ms + eps); w -= mom.
    """

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        for velocity in self._velocities:
            velocity.assign(keras.ops.ones(velocity.shape, velocity.dtype))


def make_optimizer(name, learning_rate, *, rmsprop_decay=0.9, momentum=0.9,
                   rmsprop_epsilon=1e-3, nesterov=False):
    """The optimizers of the official main.py (--optimizer) plus adam.

    rmsprop: TF1 semantics (above). momentum: SGD with momentum (optionally Nesterov).
    sgd: plain SGD. Weight decay is not done here: the training loop adds the L2
    penalty to the loss, as the official code does.
    """
    if name == "rmsprop":
        return TF1RMSprop(learning_rate=learning_rate, rho=rmsprop_decay,
                          momentum=momentum, epsilon=rmsprop_epsilon)
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum,
                                    nesterov=nesterov)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
