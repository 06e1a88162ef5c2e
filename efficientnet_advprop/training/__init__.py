"""The recipe-agnostic training loop and its parts."""

from efficientnet_advprop.training.determinism import (DeterminismError,
                                                       determinism_requested,
                                                       enable_determinism)
from efficientnet_advprop.training.distribute import STRATEGIES, make_strategy
from efficientnet_advprop.training.ema import ExponentialMovingAverage
from efficientnet_advprop.training.gradients import mean_gradients, regularize_gradients
from efficientnet_advprop.training.optimizers import OPTIMIZERS, TF1RMSprop, make_optimizer
from efficientnet_advprop.training.run_lock import RunLock, RunLockedError
from efficientnet_advprop.training.schedules import (WarmupCosineDecay, WarmupExponentialDecay,
                                                     WarmupStepDecay, scaled_learning_rate)
from efficientnet_advprop.training.trainer import (PRECISIONS, InputDataError, TrainConfig,
                                                   Trainer, TrainingError, set_global_seed)
from efficientnet_advprop.training.recipe_model import RecipeMetrics, RecipeModel

__all__ = ["OPTIMIZERS", "PRECISIONS", "STRATEGIES", "DeterminismError",
           "ExponentialMovingAverage", "InputDataError", "RecipeMetrics", "RecipeModel",
           "RunLock", "RunLockedError", "TF1RMSprop",
           "TrainConfig", "Trainer", "TrainingError", "WarmupCosineDecay",
           "WarmupExponentialDecay", "WarmupStepDecay", "determinism_requested",
           "enable_determinism", "make_optimizer", "make_strategy", "mean_gradients",
           "regularize_gradients",
           "scaled_learning_rate", "set_global_seed"]
