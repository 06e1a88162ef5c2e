"""Model builders and the normaliser factory."""

from efficientnet_advprop.models.normalization import make_normalizer
from efficientnet_advprop.models.registry import (build_model, default_image_size,
                                                  model_names)

__all__ = ["build_model", "default_image_size", "make_normalizer", "model_names"]
