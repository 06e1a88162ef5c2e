"""EfficientNet training with AdvProp (auxiliary batch norms for adversarial examples)."""

from efficientnet_advprop.models.registry import build_model
from efficientnet_advprop.training.recipe_model import RecipeModel

__version__ = "0.1.0"

__all__ = ["RecipeModel", "__version__", "build_model"]
