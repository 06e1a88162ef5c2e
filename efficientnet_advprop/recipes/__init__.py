"""Training recipes: one module per method, each saying how a batch becomes a loss."""

from efficientnet_advprop.recipes.adversarial_training import (MadryAdversarialTraining,
                                                               StandardAdversarialTraining)
from efficientnet_advprop.recipes.advprop import AdvProp
from efficientnet_advprop.recipes.base import Recipe, RecipeOutput, cross_entropy
from efficientnet_advprop.recipes.vanilla import Vanilla

RECIPES = {cls.name: cls for cls in
           (Vanilla, AdvProp, StandardAdversarialTraining, MadryAdversarialTraining)}


def make_recipe(name, num_classes, **options):
    """Builds the recipe `name` (a key of RECIPES) with its options."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(sorted(RECIPES))}")
    return RECIPES[name](num_classes, **options)


__all__ = ["RECIPES", "AdvProp", "MadryAdversarialTraining", "Recipe", "RecipeOutput",
           "StandardAdversarialTraining", "Vanilla", "cross_entropy", "make_recipe"]
