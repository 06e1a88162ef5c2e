"""Learning-rate schedules (keras.ops: the TensorFlow and the JAX engine share them)."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class WarmupExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The official EfficientNet schedule.

    lr(step) = peak * decay_factor ** floor(step / decay_steps), where peak = base_lr *
    global_batch / 256, replaced during the first `warmup_steps` by the linear ramp
    peak * step / warmup_steps. As in the official code the decay counts from step 0,
    not from the end of the warm-up.
    """

    def __init__(self, peak_learning_rate, decay_steps, decay_factor=0.97,
                 warmup_steps=0, staircase=True, warmup_start=0.0):
        self.peak_learning_rate = float(peak_learning_rate)
        self.decay_steps = max(1, int(decay_steps))
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = float(warmup_start)
        self.staircase = staircase

    def __call__(self, step):
        step = ops.cast(step, "float32")
        exponent = step / self.decay_steps
        if self.staircase:
            exponent = ops.floor(exponent)
        lr = self.peak_learning_rate * ops.power(self.decay_factor, exponent)
        return _linear_warmup(lr, step, self.peak_learning_rate, self.warmup_steps,
                              self.warmup_start)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate,
                "decay_steps": self.decay_steps, "decay_factor": self.decay_factor,
                "warmup_steps": self.warmup_steps,
                "warmup_start": self.warmup_start, "staircase": self.staircase}


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak_learning_rate`, then cosine decay to 0 at total_steps."""

    def __init__(self, peak_learning_rate, total_steps, warmup_steps=0, warmup_start=0.0):
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = float(warmup_start)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        span = max(1, self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        lr = 0.5 * self.peak_learning_rate * (1.0 + ops.cos(math.pi * progress))
        return _linear_warmup(lr, step, self.peak_learning_rate, self.warmup_steps,
                              self.warmup_start)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "warmup_start": self.warmup_start}


@keras.saving.register_keras_serializable(package="efficientnet_advprop")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Step decay of the ResNet recipes: peak * factor ** (milestones passed), with an
    optional linear warm-up. `milestones` are step counts (Fast AdvProp: epochs
    30/60/90/100 of 105; Xie & Yuille: 35/70/95 of 110, x0.1)."""

    def __init__(self, peak_learning_rate, milestones, decay_factor=0.1, warmup_steps=0,
                 warmup_start=0.0):
        self.peak_learning_rate = float(peak_learning_rate)
        self.milestones = [int(m) for m in milestones]
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"learning-rate milestones must increase, got {milestones}")
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = float(warmup_start)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        passed = ops.zeros((), "float32")
        for milestone in self.milestones:
            passed += ops.cast(step >= milestone, "float32")
        lr = self.peak_learning_rate * ops.power(self.decay_factor, passed)
        return _linear_warmup(lr, step, self.peak_learning_rate, self.warmup_steps,
                              self.warmup_start)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate,
                "milestones": self.milestones, "decay_factor": self.decay_factor,
                "warmup_steps": self.warmup_steps,
                "warmup_start": self.warmup_start}


def _linear_warmup(lr, step, peak, warmup_steps, start=0.0):
    """`lr`, replaced before warmup_steps by the linear ramp from `start` (at step 0)
    to `peak` (0 -> peak * step / warmup_steps, the official EfficientNet ramp; the
    ResNet references of Goyal et al. start at the unscaled 0.1)."""
    if warmup_steps <= 0:
        return lr
    return ops.where(step < warmup_steps,
                    start + (peak - start) * step / warmup_steps, lr)


def scaled_learning_rate(base_learning_rate, global_batch_size):
    """The linear scaling rule of the official code: base lr is per 256 images."""
    return base_learning_rate * global_batch_size / 256.0
