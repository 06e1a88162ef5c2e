"""Custom Keras layers of efficientnet_advprop."""

from efficientnet_advprop.layers.preprocessing import InputNormalization
from efficientnet_advprop.layers.split_batch_norm import (AUX, MAIN, BNRoute,
                                                          SplitBatchNorm, bn_route,
                                                          current_route,
                                                          is_auxiliary_variable,
                                                          sync_moving_statistics)
from efficientnet_advprop.layers.nf_layers import Scale, ScaledActivation
from efficientnet_advprop.layers.stochastic_depth import StochasticDepth
from efficientnet_advprop.layers.weight_standardization import (GAMMA_TABLE,
                                                                WeightStandardizedConv2D,
                                                                activation_gamma)

__all__ = [
    "AUX", "GAMMA_TABLE", "MAIN", "BNRoute", "InputNormalization", "Scale",
    "ScaledActivation", "SplitBatchNorm", "StochasticDepth", "WeightStandardizedConv2D",
    "activation_gamma", "bn_route", "current_route", "is_auxiliary_variable",
    "sync_moving_statistics",
]
