"""Custom Keras layers of efficientnet_advprop."""

from efficientnet_advprop.layers.preprocessing import InputNormalization
from efficientnet_advprop.layers.split_batch_norm import (AUX, MAIN, BNRoute,
                                                          SplitBatchNorm, bn_route,
                                                          current_route,
                                                          is_auxiliary_variable,
                                                          sync_moving_statistics)
from efficientnet_advprop.layers.stochastic_depth import StochasticDepth

__all__ = [
    "AUX", "MAIN", "BNRoute", "InputNormalization", "SplitBatchNorm", "StochasticDepth",
    "bn_route", "current_route", "is_auxiliary_variable", "sync_moving_statistics",
]
