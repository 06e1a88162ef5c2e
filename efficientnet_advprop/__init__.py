"""EfficientNet training with AdvProp (auxiliary batch norms for adversarial examples)."""

from efficientnet_advprop.utils import quiet as _quiet

if _quiet.keras_backend() == "tensorflow":
    _quiet.import_tensorflow()  # before Keras imports it: without the start-up noise

from efficientnet_advprop.models.registry import build_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["RecipeModel", "__version__", "build_model"]


def __getattr__(name):
    # RecipeModel trains through tf.distribute: imported on first use, so that the
    # backend-neutral layers and models import where TensorFlow is absent.
    if name == "RecipeModel":
        from efficientnet_advprop.training.recipe_model import RecipeModel

        return RecipeModel
    raise AttributeError(f"module 'efficientnet_advprop' has no attribute {name!r}")
