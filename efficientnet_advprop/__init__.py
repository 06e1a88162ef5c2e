"""EfficientNet training with AdvProp (auxiliary batch norms for adversarial examples)."""

from efficientnet_advprop.models.registry import build_model

__version__ = "0.1.0"

__all__ = ["__version__", "build_model"]
