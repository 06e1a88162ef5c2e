"""The resolved experiment config: each paper's ImageNet setting against the papers'
values (written here independently from ../shared/docs/reference.md), the layer order
defaults < recipe < dataset preset < overrides, the BN-batch minimum, and the saved
config that evaluation reuses."""

import dataclasses
import json
import os
import re

import pytest

from conftest import REPO_ROOT, run_main
from efficientnet_advprop import config as cfg
from efficientnet_advprop.data import DatasetInfo
from efficientnet_advprop.recipes import RECIPES
from efficientnet_advprop.recipes.base import Cite

IMAGENET = DatasetInfo("imagenet", 1000, 1281167, 50000, 224)


def imagenet(recipe, model, **overrides):
    model = {"model_name": model} if model else {}
    return cfg.resolve({"recipe": recipe, **model, **overrides}, IMAGENET)


# The papers' values (reference.md), typed here rather than read from the recipe files.
EFFICIENTNET = {"optimizer": "rmsprop", "rmsprop_decay": 0.9, "momentum": 0.9,
                "rmsprop_epsilon": 1e-3, "base_learning_rate": 0.016,
                "lr_schedule": "exponential", "lr_warmup_epochs": 5.0,
                "lr_decay_epoch": 2.4, "lr_decay_factor": 0.97, "weight_decay": 1e-5,
                "label_smoothing": 0.1, "moving_average_decay": 0.9999,
                "batch_norm_momentum": 0.99, "batch_norm_epsilon": 1e-3,
                "survival_prob": 0.8}
NOFROST = {"optimizer": "momentum", "nesterov": True, "momentum": 0.9, "train_batch_size": 256,
           "base_learning_rate": 0.1, "weight_decay": 5e-5, "lr_schedule": "cosine",
           "train_epochs": 90.0, "label_smoothing": 0.1, "moving_average_decay": 0.0,
           "epsilon": 8.0, "attack_step_size": 1.0, "attack_iterations": 10,
           "targeted_attack": False}
PAPERS = {
    ("advprop", "efficientnet-b0"): {
        **EFFICIENTNET, "auto_augment": "v0", "epsilon": 1.0, "attack_step_size": 1.0,
        "attacker": "pgd", "preprocessing": "advprop", "image_size": 224,
        "augmentation": "inception", "targeted_attack": True},
    ("fine_grained_advprop", "efficientnet-b0"): {
        **EFFICIENTNET, "auto_augment": "v0", "preprocessing": "advprop",
        "targeted_attack": True},
    # AdvProp §5.3: the shared-BN baseline's attacker is PGD5 (eps 4), targeted as
    # AdvProp's (Fast AdvProp §3.2.2); the loss is Eq. 2's, weight 1 each.
    ("sat", "efficientnet-b0"): {**EFFICIENTNET, "epsilon": 4.0, "auto_augment": "v0",
                                 "preprocessing": "advprop", "targeted_attack": True,
                                 "sat_clean_weight": 1.0},
    ("fast_advprop", "resnet-50"): {
        "optimizer": "momentum", "momentum": 0.9, "base_learning_rate": 0.1,
        "weight_decay": 1e-4, "lr_schedule": "step", "lr_decay_factor": 0.1,
        "label_smoothing": 0.0, "moving_average_decay": 0.0, "epsilon": 1.0,
        "attack_iterations": 1, "train_batch_size": 320, "p_adv": 0.2,
        "fast_advprop_beta": 0.5, "train_epochs": 105.0},
    ("mbn_at", "resnet-152"): {
        "optimizer": "momentum", "base_learning_rate": 0.1, "lr_warmup_epochs": 5.0,
        "lr_warmup_start": "base", "train_epochs": 110.0, "lr_schedule": "step",
        "lr_decay_factor": 0.1, "train_batch_size": 4096, "moving_average_decay": 0.0,
        "label_smoothing": 0.1, "weight_decay": 1e-4, "batch_norm_momentum": 0.9,
        "batch_norm_epsilon": 1e-5, "epsilon": 16.0, "attack_step_size": 1.0,
        "attack_iterations": 30, "targeted_attack": True, "clean_start_prob": 0.2,
        "clean_loss_weight": 0.5},
    ("nofrost", "nf-resnet-50"): {**NOFROST, "dropout_rate": 0.25, "drop_path_rate": 0.1,
                                  "agc_clip": 0.0, "clean_loss_weight": 0.5},
    ("nofrost_star", "nf-resnet-50"): {**NOFROST, "clean_loss_weight": 0.5},
    ("bn_sat", "resnet-50"): {**NOFROST, "clean_loss_weight": 0.5, "zero_init_last_bn": True},
    ("trades", "resnet-50"): {**NOFROST, "trades_beta": 1.0},
    ("fat", "resnet-50"): {**NOFROST, "early_stop_tau": 1},
    ("trades_fat", "resnet-50"): {**NOFROST, "trades_beta": 1.0, "early_stop_tau": 1},
}


@pytest.mark.parametrize("recipe, model", list(PAPERS))
def test_the_paper_setting_resolves_to_the_papers_values(recipe, model):
    config = imagenet(recipe, model)
    for name, expected in PAPERS[recipe, model].items():
        assert config.value(name) == pytest.approx(expected), name
    # ... and every value of the recipe file's table is what the run uses, cited.
    for name, cite in RECIPES[recipe].paper.items():
        assert isinstance(cite, Cite) and cite.source
        if name == "lr_milestones":
            continue  # fractions of the run: checked below
        if name == "model_name":
            assert cite.value == model  # the paper's own network, passed explicitly here
            continue
        assert config.value(name) == cite.value, name
        assert config.sources[name].startswith(f"recipe {recipe}: "), name


def test_fast_advprop_imagenet_run_is_the_papers_calibrated_budget():
    config = imagenet("fast_advprop", "resnet-50")
    steps_per_epoch = 1281167 // 320
    assert config.optim.steps_per_epoch == steps_per_epoch
    assert config.optim.train_steps == pytest.approx(105 / 1.2 * steps_per_epoch, abs=1)
    # 30/60/90/100 of 105 epochs -> 25/50/75/83.3 of the calibrated 87.5
    assert config.optim.lr_milestones == pytest.approx((25, 50, 75, 250 / 3), abs=0.01)
    recipe = config.make_recipe()
    assert recipe.lr_batch_size(320) == 256  # lr 0.1 per 256 *clean* images
    # the reference's 4 GPUs of 64 clean + 16 adversarial images each, as BN groups
    assert recipe.bn_batches(320) == {"clean share, main BN": 64,
                                      "adversarial BN group": 16}
    eps2 = imagenet("fast_advprop", "resnet-50", epsilon=2.0).make_recipe()
    assert eps2.attack.step_size == 2.0  # the reference attacker: max(step, eps / K)


def test_mbn_at_warms_up_from_the_unscaled_rate_as_its_reference():
    config = imagenet("mbn_at", "resnet-152")
    assert config.optim.lr_milestones == pytest.approx((35, 70, 95))
    from efficientnet_advprop.experiment import prepare  # noqa: F401  (import check)
    from efficientnet_advprop.training import TrainConfig

    schedule = TrainConfig(model_dir="unused", train_steps=1000, global_batch_size=4096,
                           steps_per_epoch=10, base_learning_rate=0.1,
                           lr_schedule="step", lr_milestones=(35, 70, 95),
                           lr_decay_factor=0.1, lr_warmup_epochs=5,
                           lr_warmup_start="base").learning_rate_schedule()
    assert float(schedule(0)) == pytest.approx(0.1)  # the ramp starts at 0.1 ...
    assert float(schedule(25)) == pytest.approx(0.1 + 1.5 / 2)  # ... is linear ...
    assert float(schedule(50)) == pytest.approx(1.6)  # ... to 0.1 x 4096 / 256
    small = TrainConfig(model_dir="unused", train_steps=100, global_batch_size=64,
                        steps_per_epoch=10, base_learning_rate=0.1, lr_schedule="cosine",
                        lr_warmup_epochs=5, lr_warmup_start="base").learning_rate_schedule()
    assert float(small(0)) == pytest.approx(0.025)  # peak below 0.1: no warm-up at all


def test_layers_override_in_order_and_say_where_each_value_came_from():
    embedded = cfg.resolve({"recipe": "nofrost", "model_name": "nf-resnet-26-cifar"})
    assert embedded.sources["weight_decay"].startswith("recipe nofrost:")
    assert embedded.sources["train_epochs"] == "embedded dataset preset"  # data scale
    assert embedded.optim.base_learning_rate == 0.1  # the SGD paper's rate is kept
    assert embedded.optim.moving_average_decay == 0.0  # ... and its choice of no EMA
    user = cfg.resolve({"recipe": "nofrost", "model_name": "nf-resnet-26-cifar",
                        "weight_decay": 1e-3, "train_steps": 7})
    assert user.optim.weight_decay == 1e-3 and user.sources["weight_decay"] == "set"
    assert user.optim.train_steps == 7  # an explicit step count beats every epoch count
    vanilla = cfg.resolve({})
    assert vanilla.optim.base_learning_rate == 0.004  # the embedded RMSProp preset
    assert vanilla.sources["optimizer"] == "default"


def test_embedded_preset_optimisation_yields_only_to_another_optimizers_paper():
    """The embedded preset's optimisation entries were tuned with RMSProp: an RMSProp
    recipe takes them over its paper's, an SGD recipe keeps its paper's. AutoAugment is
    off there, except for a recipe that routes images by their source."""
    preset = cfg.DATASET_PRESETS["embedded"]
    assert preset[cfg.TUNED_FOR] == "rmsprop"
    advprop = cfg.resolve({"recipe": "advprop"})
    assert RECIPES["advprop"].paper["optimizer"].value == "rmsprop"
    assert RECIPES["advprop"].paper["base_learning_rate"].value == 0.016
    for name in cfg.RECIPE_KEEPS:
        if name in RECIPES["advprop"].paper:
            assert advprop.value(name) == preset[name], name
            assert advprop.sources[name] == "embedded dataset preset", name
    assert advprop.optim.base_learning_rate == preset["base_learning_rate"]
    assert advprop.data.auto_augment is None  # the paper's v0 gives way on this set
    assert advprop.sources["auto_augment"] == "embedded dataset preset"

    trades = cfg.resolve({"recipe": "trades"})  # SGD with momentum, 0.1 per 256
    assert trades.optim.optimizer == "momentum"
    assert trades.optim.base_learning_rate == RECIPES["trades"].paper[
        "base_learning_rate"].value == 0.1
    assert trades.sources["base_learning_rate"].startswith("recipe trades:")
    assert trades.optim.moving_average_decay == 0.0  # its paper keeps no EMA
    assert trades.sources["train_epochs"] == "embedded dataset preset"  # data scale
    assert trades.data.auto_augment is None
    # madry_at's paper table sets the attack only: it trains with the defaults
    # (RMSProp), so the preset's rate applies
    assert "optimizer" not in RECIPES["madry_at"].paper
    madry = cfg.resolve({"recipe": "madry_at"})
    assert madry.optim.base_learning_rate == preset["base_learning_rate"]
    assert madry.sources["base_learning_rate"] == "embedded dataset preset"

    fine = cfg.resolve({"recipe": "fine_grained_advprop"})
    assert RECIPES["fine_grained_advprop"].needs_source_tags
    assert fine.data.auto_augment == "v0"  # it refuses to run without AutoAugment
    assert fine.sources["auto_augment"].startswith("recipe fine_grained_advprop:")
    assert fine.optim.base_learning_rate == preset["base_learning_rate"]  # RMSProp
    # on ImageNet nothing of the preset applies
    assert imagenet("advprop", "efficientnet-b0").data.auto_augment == "v0"
    assert imagenet("advprop", "efficientnet-b0").optim.base_learning_rate == 0.016


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_no_bn_batch_below_the_minimum_in_any_recipe_default(recipe):
    model = "nf-resnet-26-cifar" if recipe.startswith("nofrost") else "resnet-26-cifar"
    options = {"auto_augment": "v0"} if recipe == "fine_grained_advprop" else {}
    for info in (None, IMAGENET):
        config = cfg.resolve({"recipe": recipe, "model_name": model, **options}, info)
        local = config.data.train_batch_size
        sizes = config.make_recipe().bn_batches(local)
        assert min(sizes.values()) >= 16, (recipe, info, sizes)
    described = config.describe()
    for line in described.splitlines():
        if line.startswith("--"):
            assert re.match(r"--\w+=.*  # \S", line), line  # every value has a source


def test_nofrost_trains_the_nf_resnet_and_refuses_a_bn_network():
    config = imagenet("nofrost", None)  # no model given: NoFrost's NF-ResNet-50
    assert config.model.model_name == "nf-resnet-50"
    assert config.sources["model_name"].startswith("recipe nofrost: Wang et al. 2022 §4.1")
    assert config.data.train_batch_size == 256  # §4.1: "Batch size is 256"
    assert config.optim.base_learning_rate == 0.1
    for recipe in ("nofrost", "nofrost_star"):
        with pytest.raises(cfg.ConfigError, match="model_name=efficientnet-b0: has batch "
                                                  "norm.*recipe bn_sat"):
            cfg.resolve({"recipe": recipe, "model_name": "efficientnet-b0"}, IMAGENET)
    for recipe in ("bn_sat", "trades", "fat", "trades_fat"):  # NoFrost's batch for all
        assert imagenet(recipe, "resnet-50").data.train_batch_size == 256, recipe
    # zero-init of the last BN: NoFrost's BN baselines on BN ResNets only
    assert imagenet("bn_sat", "resnet-50").model.zero_init_last_bn is True
    assert imagenet("trades", "efficientnet-b0").model.zero_init_last_bn is None
    assert imagenet("sat", "resnet-50").model.zero_init_last_bn is None
    with pytest.raises(cfg.ConfigError, match="zero_init_last_bn=True: applies to the BN"):
        imagenet("vanilla", "efficientnet-b0", zero_init_last_bn=True)


def test_a_batch_below_the_minimum_names_the_flag_and_the_value_that_works():
    with pytest.raises(cfg.ConfigError) as e:
        cfg.resolve({"recipe": "fast_advprop", "model_name": "resnet-50",
                     "train_batch_size": 256}, IMAGENET)
    assert e.value.field == "train_batch_size"
    assert "use train_batch_size=320" in str(e.value)
    ok = cfg.resolve({"recipe": "fast_advprop", "model_name": "resnet-50",
                      "train_batch_size": 60, "min_bn_batch": 4,
                      "shuffle_bn_group_size": 4}, IMAGENET)  # asked for explicitly
    assert ok.make_recipe().bn_batches(60)["adversarial BN group"] == 4


def test_saved_config_is_reused_and_contradictions_are_refused(tmp_path):
    trained = cfg.resolve({"recipe": "advprop", "model_name": "resnet-18-cifar",
                           "width_multiplier": 0.125, "model_dir": str(tmp_path)})
    trained.save(str(tmp_path))
    saved = cfg.load_saved_config(str(tmp_path))
    reused = cfg.resolve(cfg.reuse_saved({"mode": "eval"}, saved))
    for name in ("recipe", "model_name", "width_multiplier", "preprocessing",
                 "moving_average_decay", "image_size"):
        assert reused.value(name) == trained.value(name), name
    with pytest.raises(cfg.ConfigError, match="model_name=resnet-26-cifar: contradicts"):
        cfg.reuse_saved({"model_name": "resnet-26-cifar"}, saved)
    assert cfg.reuse_saved({"model_name": "resnet-18-cifar"}, saved)["recipe"] == "advprop"


def test_recipe_files_declare_everything_the_loop_reads():
    """No recipe_name == branches outside the registry, no getattr on recipes."""
    sources = [os.path.join(REPO_ROOT, "main.py")]
    for root, _, files in os.walk(os.path.join(REPO_ROOT, "efficientnet_advprop")):
        sources += [os.path.join(root, f) for f in files if f.endswith(".py")]
    for path in sources:
        text = open(path, encoding="utf-8").read()
        assert not re.search(r"recipe_name\s*(==|in)\s", text), path
        assert not re.search(r"getattr\((self\.)?recipe\b", text), path
    for recipe in RECIPES.values():
        for option in recipe.options:
            assert option.help and option.source, (recipe.name, option.name)


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    result = run_main("--print_config", "--recipe=fast_advprop",
                      f"--model_dir={tmp_path / 'm'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "--train_batch_size=240  # embedded dataset preset (64), raised" in out
    assert "--shuffle_bn_group_size=16  # recipe fast_advprop: meijieru/fast_advprop" in out
    assert "--moving_average_decay=0.0  # recipe fast_advprop" in out
    assert os.listdir(tmp_path) == []  # nothing written: no model_dir, no runs/


def test_auto_augment_none_turns_off_the_papers_autoaugment(tmp_path):
    on = run_main("--print_config", "--recipe=advprop", "--dataset=imagenet", cwd=tmp_path)
    off = run_main("--print_config", "--recipe=advprop", "--dataset=imagenet",
                   "--auto_augment=none", cwd=tmp_path)
    assert on.returncode == 0 and off.returncode == 0, off.stderr[-2000:]
    assert "--auto_augment=v0  # recipe advprop" in on.stdout
    assert "--auto_augment=none  # set" in off.stdout
    # on the embedded set the preset has it off; the flag turns it back on
    embedded = run_main("--print_config", "--recipe=advprop", "--auto_augment=v0",
                        cwd=tmp_path)
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    assert "--auto_augment=v0  # set" in embedded.stdout


def test_config_round_trips_through_json(tmp_path):
    config = imagenet("mbn_at", "resnet-152")
    config.save(str(tmp_path))
    saved = json.loads((tmp_path / cfg.CONFIG_FILE).read_text())["config"]
    assert saved["recipe"] == "mbn_at" and saved["epsilon"] == 16.0
    assert saved["lr_milestones"] == pytest.approx([35, 70, 95])
    assert dataclasses.asdict(config.optim)["train_steps"] == saved["train_steps"]


def test_bn_sat_builds_its_resnet_with_each_branchs_last_bn_at_zero():
    """NoFrost's code zero-initialises the last BN of every residual branch of its BN
    baselines (PGDAT.py); the config carries it to the builder, vanilla does not."""
    from efficientnet_advprop.experiment import model_kwargs
    from efficientnet_advprop.models import build_model

    gammas = {}
    for recipe in ("bn_sat", "vanilla"):
        config = cfg.resolve({"recipe": recipe, "model_name": "resnet-26-cifar",
                              "width_multiplier": 0.125})
        model = build_model(config.model.model_name, config.num_classes,
                            **model_kwargs(config, config.make_recipe(), (False, None)))
        gammas[recipe] = {layer.name: layer.gammas[0].numpy() for layer in model.layers
                          if layer.name.endswith(("_bn3", "_bn1"))}
    last = [n for n in gammas["bn_sat"] if n.endswith("_bn3")]
    assert len(last) == 8  # ResNet-26: 8 bottleneck blocks
    assert all((gammas["bn_sat"][n] == 0).all() for n in last)
    assert all((gammas["vanilla"][n] == 1).all() for n in last)
    assert all((g == 1).all() for n, g in gammas["bn_sat"].items() if n.endswith("_bn1"))


def test_print_config_at_imagenet_scale_needs_no_data(tmp_path):
    result = run_main("--print_config", "--recipe=nofrost", "--dataset=imagenet",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "# dataset imagenet: 1281167 train / 50000 held-out images" in out
    assert "--model_name=nf-resnet-50  # recipe nofrost: Wang et al. 2022 §4.1" in out
    assert "--train_batch_size=256  # recipe nofrost: Wang et al. 2022 §4.1" in out
    assert "--nesterov=True  # recipe nofrost: amazon-science/" in out  # the code's value
    assert not os.listdir(tmp_path)  # wrote nothing
