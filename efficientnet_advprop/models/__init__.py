"""Model builders, feature endpoints and the normaliser factory."""

from efficientnet_advprop.models.features import feature_endpoints, feature_model
from efficientnet_advprop.models.normalization import make_normalizer
from efficientnet_advprop.models.nf_resnet import NOFROST_PRESET
from efficientnet_advprop.models.registry import (build_model, default_image_size,
                                                  is_normalizer_free, model_names)
from efficientnet_advprop.models.resnet import count_resnet_params

__all__ = ["NOFROST_PRESET", "build_model", "count_resnet_params", "default_image_size",
           "feature_endpoints", "feature_model", "is_normalizer_free", "make_normalizer",
           "model_names"]
