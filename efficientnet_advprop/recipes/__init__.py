"""Training recipes: one module per method, each saying how a batch becomes gradients."""

from efficientnet_advprop.recipes.adversarial_training import (
    FriendlyAdversarialTraining, MadryAdversarialTraining, SeparateForwardAdversarialTraining,
    StandardAdversarialTraining)
from efficientnet_advprop.recipes.advprop import AdvProp
from efficientnet_advprop.recipes.base import (SHARED, Cite, Option, Recipe, RecipeGradients,
                                               RecipeOutput, StepContext, cross_entropy,
                                               kl_divergence, recipe_argument)
from efficientnet_advprop.recipes.fast_advprop import FastAdvProp
from efficientnet_advprop.recipes.fine_grained_advprop import FineGrainedAdvProp
from efficientnet_advprop.recipes.mbn_at import (MixtureBNAdversarialTraining, alp_penalty,
                                                 consistent_bn_start_step)
from efficientnet_advprop.recipes.nofrost import NoFrost, NoFrostStar
from efficientnet_advprop.recipes.trades import Trades, TradesFat, trades_loss
from efficientnet_advprop.recipes.vanilla import Vanilla

# In the order of the --recipe help: the method, then the baselines it is compared with.
RECIPES = {cls.name: cls for cls in (
    Vanilla, AdvProp, FineGrainedAdvProp, MadryAdversarialTraining,
    StandardAdversarialTraining, SeparateForwardAdversarialTraining, Trades,
    FriendlyAdversarialTraining, TradesFat, FastAdvProp, MixtureBNAdversarialTraining,
    NoFrost, NoFrostStar)}


def make_recipe(name, num_classes, **options):
    """Builds the recipe `name` (a key of RECIPES) with its options."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name](num_classes, **options)


def recipe_from_config(config):
    """Rebuilds a recipe from `Recipe.get_config()` (the same class and arguments)."""
    name = config["name"]
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    arguments = {k: recipe_argument(v) for k, v in config["arguments"].items()}
    return RECIPES[name](**arguments)


__all__ = ["RECIPES", "SHARED", "AdvProp", "Cite", "Option",
           "SeparateForwardAdversarialTraining", "FastAdvProp", "FineGrainedAdvProp",
           "FriendlyAdversarialTraining", "MadryAdversarialTraining",
           "MixtureBNAdversarialTraining", "NoFrost", "NoFrostStar", "Recipe",
           "RecipeGradients", "RecipeOutput", "StandardAdversarialTraining", "StepContext",
           "Trades", "TradesFat", "Vanilla", "alp_penalty", "consistent_bn_start_step",
           "cross_entropy", "kl_divergence", "make_recipe", "recipe_from_config",
           "trades_loss"]
