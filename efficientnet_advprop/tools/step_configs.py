"""Configurations of the train-step benchmarks, by name: which recipe, attack and batch
each one means. Backend-neutral (nothing here imports TensorFlow), so the TF benchmark
(`benchmarking`) and the JAX device check (`jax_device_check`) share one definition.

Configurations (`parse_config`): "keras_applications" (keras.applications
.EfficientNetB0 with weights=None, vanilla recipe: the reference), "vanilla",
"advprop_pgdK" (AdvProp with PGD-K), and every other recipe name with its paper's own
attack (nofrost: PGD-10, mbn_at: PGD-30, trades/fat: PGD-10, fast_advprop: p_adv 0.2,
K = 1). The batch is the number of images drawn per step for every configuration, so
the step-time ratio to vanilla is the cost per epoch at the same number of images.
"""

import dataclasses

REFERENCE = "keras_applications"
BASE_CONFIGS = ("keras_applications", "vanilla", "advprop_pgd1", "advprop_pgd5")



def all_configs():
    """Every configuration name: the base ones, then every other recipe."""
    from efficientnet_advprop.recipes import RECIPES

    return list(BASE_CONFIGS) + [name for name in RECIPES
                                 if name not in ("vanilla", "advprop")]


def parse_config(name):
    """-> (recipe name, AdvProp attack epsilon or None, uses keras.applications).

    Raises ValueError for an unknown configuration name."""
    from efficientnet_advprop.recipes import RECIPES

    if name == REFERENCE:
        return "vanilla", None, True
    if name == "vanilla":
        return "vanilla", None, False
    if name.startswith("advprop_pgd"):
        try:
            k = int(name[len("advprop_pgd"):])
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"unknown configuration {name!r}: advprop_pgdK needs K >= 1")
        return "advprop", max(1, k - 1), False  # AdvProp: eps 1 -> PGD1, eps k-1 -> PGD-k
    if name in RECIPES:
        return name, None, False
    raise ValueError(f"unknown configuration {name!r}; choose from "
                     f"{', '.join(all_configs())} or advprop_pgdK")


def fast_advprop_group_size(batch_size, adv_fraction=0.2, preferred=16):
    """Fast AdvProp's shuffle-BN group size for one device and `batch_size` drawn images:
    the reference's 16 when it gives at least three whole groups that also split the
    clean share evenly, else the largest size below it that does. ValueError when no
    size does (fewer than 3 adversarial images: no shuffle can change the groups)."""
    num_adv = int(round(adv_fraction * batch_size))
    clean = batch_size - num_adv
    for size in range(min(int(preferred), num_adv // 3), 0, -1):
        if num_adv % size == 0 and clean % (num_adv // size) == 0:
            return size
    raise ValueError(f"fast_advprop: a batch of {batch_size} draws {num_adv} adversarial "
                     f"and {clean} clean images, which no 3 or more equal BN groups split")


def drawn_batch_size(recipe_name, batch_size):
    """Images drawn per step for `batch_size` clean ones (`Recipe.drawn_batch`, as the
    claims suite): Fast AdvProp draws batch / (1 - p_adv), 160 for 128 and the
    reference's 320 for 256; every other recipe draws the batch. Throughputs count
    drawn images."""
    from efficientnet_advprop.recipes import RECIPES

    return RECIPES[recipe_name].from_options(2).drawn_batch(batch_size)


def make_benchmark_recipe(name, num_classes, batch_size, max_attack_iterations=None):
    """The recipe of configuration `name` (see `parse_config`) with its paper's training
    attack (the recipe file's `paper` table) for `batch_size` drawn images per step
    (Fast AdvProp's shuffle-BN groups follow the batch); `max_attack_iterations` cuts
    the attack (the device check's step comparisons use 1)."""
    from efficientnet_advprop.config import AttackSettings
    from efficientnet_advprop.recipes import RECIPES

    recipe_name, eps, _ = parse_config(name)
    cls = RECIPES[recipe_name]
    fields = {f.name for f in dataclasses.fields(AttackSettings)}
    settings = {k: c.value for k, c in cls.paper.items() if k in fields}
    if eps is not None:  # advprop_pgdK: AdvProp's eps = K - 1 (1 for K = 1), n = eps + 1
        settings.update(epsilon=float(eps), attack_iterations=None)
    attack = AttackSettings(**settings).training_attack() if cls.adversarial else None
    if attack is not None and max_attack_iterations is not None:
        attack = dataclasses.replace(
            attack, num_iter=min(attack.iterations, int(max_attack_iterations)))
    options = {}
    if "shuffle_bn_group_size" in {o.name for o in cls.options}:
        options["shuffle_bn_group_size"] = fast_advprop_group_size(batch_size)
    return cls.from_options(num_classes, attack=attack, **options)
