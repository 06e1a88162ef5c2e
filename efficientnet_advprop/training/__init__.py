"""The training loops and their parts.

The TensorFlow engine: `Trainer` (main.py's loop, tf.distribute) and `RecipeModel`
(Keras fit()). The JAX engine: `JaxTrainer` (training/jax_engine.py). The arithmetic
between a recipe and an optimizer (gradients, AGC, schedules, optimizers) is
backend-neutral and shared. Names are imported when first used, so that importing a
backend-neutral part does not import TensorFlow.
"""

import importlib

_EXPORTS = {
    "determinism": ("DeterminismError", "determinism_requested", "enable_determinism"),
    "distribute": ("STRATEGIES", "make_strategy"),
    "ema": ("ExponentialMovingAverage",),
    "gradients": ("mean_gradients", "regularize_gradients"),
    "optimizers": ("OPTIMIZERS", "TF1RMSprop", "make_optimizer"),
    "run_lock": ("RunLock", "RunLockedError"),
    "schedules": ("WarmupCosineDecay", "WarmupExponentialDecay", "WarmupStepDecay",
                  "scaled_learning_rate"),
    "loop": ("PRECISIONS", "InputDataError", "TrainConfig", "TrainingError"),
    "trainer": ("Trainer", "set_global_seed"),
    "jax_engine": ("JaxTrainer",),
    "recipe_model": ("RecipeMetrics", "RecipeModel"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name in _MODULE_OF:
        module = importlib.import_module(f"efficientnet_advprop.training.{_MODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_MODULE_OF)
