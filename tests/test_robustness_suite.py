"""The robustness suite end to end: library call, report files, and main.py's
--mode=eval_robustness on a checkpoint and on an exported SavedModel."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO_ROOT, run_main
from efficientnet_advprop.evaluation import RobustnessConfig, evaluate_robustness, write_report

SMALL = dict(epsilon=8.0, pgd_iterations=3, apgd_iterations=4, mi_fgsm_iterations=3,
             cw_iterations=3, square_queries=12, curve_iterations=(1, 2, 4),
             corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
             thickness_points=8, mbn_gammas=(0.0, 1.0))


def _check_invariants(result):
    clean = result["clean_accuracy"]
    accs = {k: v["accuracy"] for k, v in result.get("attacks", {}).items()}
    assert all(a <= clean + 1e-9 for a in accs.values()), (clean, accs)
    if accs:
        assert result["worst_case_accuracy"] <= min(accs.values()) + 1e-9
    curve = result.get("iteration_curve")
    if curve:
        assert all(b <= a + 1e-9 for a, b in zip(curve["accuracy"], curve["accuracy"][1:]))
        assert curve["accuracy"][0] <= clean + 1e-9
    aa = result.get("autoattack")
    if aa:
        ensemble = accs[f"autoattack-{aa['version']}"]
        assert all(ensemble <= m + 1e-9 for m in aa["member_accuracy"].values())


def test_suite_on_a_trained_model_is_reproducible_and_consistent(trained_linear_model,
                                                                 cifar_small, tmp_path):
    _, (x, y) = cifar_small
    # 40 images in batches of 16: the short last batch is padded and the padding dropped.
    ds = tf.data.Dataset.from_tensor_slices((x[:40], y[:40])).batch(16)
    config = RobustnessConfig(attacks=("pgd", "pgd-targeted", "apgd-ce", "mi-fgsm", "cw",
                                       "square", "autoattack"), **SMALL)
    first = evaluate_robustness(trained_linear_model, ds, config, num_classes=10,
                                show_progress=False)
    second = evaluate_robustness(trained_linear_model, ds, config, num_classes=10,
                                 show_progress=False)
    assert first["num_images"] == 40
    direct = np.argmax(trained_linear_model(x[:40].astype("float32")).numpy(), -1) == y[:40]
    assert first["clean_accuracy"] == pytest.approx(direct.mean())
    _check_invariants(first)
    drop = {"seconds"}
    assert {k: v for k, v in first.items() if k not in drop} == {
        k: v for k, v in second.items() if k not in drop}
    assert first["attacks"]["pgd3"]["accuracy"] < first["clean_accuracy"]
    errors = first["corruptions"]["errors"]
    assert set(errors) == {"gaussian_noise", "contrast"}
    assert all(0.0 <= e <= 1.0 for values in errors.values() for e in values)
    assert first["properties"]["boundary_thickness"] >= 0.0
    assert "mbn" not in first and "bn_statistics" not in first  # no auxiliary BNs

    paths = write_report(first, str(tmp_path / "report"))
    names = {os.path.basename(p) for p in paths}
    assert {"robustness.json", "robustness.md", "attack_iterations.png",
            "corruptions.png"} <= names
    assert json.loads((tmp_path / "report" / "robustness.json").read_text())[
        "clean_accuracy"] == first["clean_accuracy"]
    md = (tmp_path / "report" / "robustness.md").read_text()
    assert "| pgd3 |" in md and "![attack_iterations.png]" in md
    with Image.open(tmp_path / "report" / "attack_iterations.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown attack"):
        RobustnessConfig(attacks=("pgd", "fab"))
    with pytest.raises(ValueError, match="severities"):
        RobustnessConfig(severities=(0,))
    with pytest.raises(ValueError, match="epsilon"):
        RobustnessConfig(epsilon=0)


def test_suite_options_defaults_are_main_py_flag_defaults(monkeypatch):
    from efficientnet_advprop.robustness_experiment import SuiteOptions

    monkeypatch.syspath_prepend(REPO_ROOT)
    import main

    def options(*args):
        main.FLAGS.unparse_flags()
        try:
            main.FLAGS(["main.py", *args])
            return main.suite_options()
        finally:
            main.FLAGS.unparse_flags()

    assert options() == SuiteOptions() and SuiteOptions().set_fields == frozenset()
    assert SuiteOptions().corruptions is None  # all of them, as --corruptions=all
    chosen = options("--robustness_attacks=pgd,cw", "--mbn_gammas=0,1",
                     "--corruptions=none", "--corruption_severities=2",
                     "--apgd_iterations=7")
    assert chosen == SuiteOptions(robustness_attacks=("pgd", "cw"), mbn_gammas=(0.0, 1.0),
                                  corruptions=(), corruption_severities=(2,),
                                  apgd_iterations=7)
    assert chosen.set_fields == {"robustness_attacks", "mbn_gammas", "corruptions",
                                 "corruption_severities", "apgd_iterations"}


def test_quick_profile_keeps_the_options_set_and_says_what_it_left_out():
    from efficientnet_advprop.robustness_experiment import (QUICK_PROFILE, SuiteOptions,
                                                            quick_profile_note,
                                                            with_profile)

    options = SuiteOptions(robustness_attacks=("pgd", "cw"), curve_iterations=(1, 2))
    assert with_profile(options, "full") is options
    quick = with_profile(options, "quick")
    assert quick.robustness_attacks == ("pgd", "cw") and quick.curve_iterations == (1, 2)
    assert quick.apgd_iterations == 20 and quick.corruption_severities == (3,)
    assert quick.corruptions == QUICK_PROFILE["corruptions"]
    assert quick.robustness_properties is False
    note = quick_profile_note(options, 250, 2000)
    assert note.startswith("quick robustness profile, --robustness_profile=full for")
    assert "--apgd_iterations 20 (full: 100)" in note
    assert "--mbn_gammas 0,0.5,1 (full: 0,0.25,0.5,0.75,1)" in note
    assert "(full: all)" in note and note.endswith("; 250 of 2000 held-out images")
    assert "--robustness_attacks" not in note and "--curve_iterations" not in note


def test_bad_suite_options_raise_config_error_naming_the_option(tmp_path):
    from efficientnet_advprop.config import ConfigError, resolve
    from efficientnet_advprop.data import DatasetInfo
    from efficientnet_advprop.robustness_experiment import (SuiteOptions, check_names,
                                                            shift_datasets, suite_config)

    def field(make):
        with pytest.raises(ConfigError) as error:
            make()
        return error.value.field, str(error.value)

    assert field(lambda: SuiteOptions(robustness_profile="fast"))[0] == "robustness_profile"
    assert field(lambda: SuiteOptions(autoattack_version="plus"))[0] == "autoattack_version"
    name, text = field(lambda: check_names(SuiteOptions(robustness_attacks=("pgd",
                                                                            "fab"))))
    assert name == "robustness_attacks" and "unknown value(s) fab" in text
    assert field(lambda: check_names(SuiteOptions(mbn_modes=["main", "mix"])))[0] == (
        "mbn_modes")
    assert field(lambda: check_names(SuiteOptions(corruptions=("rain",))))[0] == (
        "corruptions")

    config = resolve({"model_dir": str(tmp_path / "m"), "eval_epsilon": 2.0},
                     DatasetInfo("embedded", 10, 100, 50, 32))
    suite = suite_config(SuiteOptions(), config, 10)
    assert suite.epsilon == 2.0 and len(suite.corruptions) == 15
    assert field(lambda: suite_config(SuiteOptions(mbn_modes=("mix",)), config, 10))[0] == (
        "mbn_modes")
    assert suite.attacks == SuiteOptions().robustness_attacks
    name, text = field(lambda: suite_config(SuiteOptions(mce_baseline="alexnet"), config,
                                            10))
    assert name == "mce_baseline" and "this model has 10 classes" in text
    assert field(lambda: suite_config(SuiteOptions(mce_baseline=str(tmp_path / "no.json")),
                                      config, 10))[0] == "mce_baseline"
    assert field(lambda: suite_config(SuiteOptions(corruption_severities=(0,)), config,
                                      10))[0] == "mode"  # RobustnessConfig's own check
    name, text = field(lambda: shift_datasets(SuiteOptions(shift_datasets=("imagenet_a",)),
                                              config, 32, "cifar", 10))
    assert name == "shift_datasets" and "needs a 1000-class model" in text


@pytest.mark.slow
def test_main_eval_robustness_on_checkpoint_and_saved_model(tmp_path):
    model_dir, export_dir = tmp_path / "model", tmp_path / "export"
    train = run_main("--advprop", "--model=resnet-18-cifar", "--width_multiplier=0.125",
                     f"--model_dir={model_dir}", "--train_steps=3", "--mode=train",
                     f"--export_dir={export_dir}", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    small = ["--num_eval_images=32", "--eval_batch_size=16", "--eval_epsilon=4",
             "--eval_attack_iterations=2", "--apgd_iterations=3", "--square_queries=5",
             "--curve_iterations=1,3", "--corruptions=gaussian_noise,fog",
             "--corruption_severities=1,5", "--mbn_gammas=0,0.5,1",
             "--robustness_profile=full"]  # every MBN mode (auto is quick here)
    common = ["--advprop", "--model=resnet-18-cifar", "--width_multiplier=0.125"]
    ckpt = run_main(*common, f"--model_dir={model_dir}", "--mode=eval_robustness", *small,
                    cwd=tmp_path)
    assert ckpt.returncode == 0, ckpt.stderr[-3000:]
    report = model_dir / "robustness"
    result = json.loads((report / "robustness.json").read_text())
    _check_invariants(result)
    assert result["num_images"] == 32 and result["epsilon"] == 4.0
    assert set(result["mbn"]["modes"]) == {"main", "aux", "logits", "layers",
                                           "random_layers"}
    assert len(result["bn_statistics"]["layers"]) > 5
    for name in ("attack_iterations.png", "mbn_frontier.png", "bn_statistics.png",
                 "corruptions.png", "robustness.md"):
        assert (report / name).exists(), name

    saved = run_main(f"--saved_model_dir={export_dir}", "--mode=eval_robustness", *small,
                     f"--eval_dir={tmp_path / 'sm'}", cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr[-3000:]
    from_export = json.loads((tmp_path / "sm" / "robustness.json").read_text())
    # The export holds the EMA weights of the main BN set: same clean accuracy.
    assert from_export["clean_accuracy"] == pytest.approx(result["clean_accuracy"])
    assert "mbn" not in from_export

    bad = run_main(f"--saved_model_dir={tmp_path / 'nowhere'}", "--mode=eval_robustness",
                   cwd=tmp_path)
    assert bad.returncode == 2 and "--saved_model_dir=" in bad.stderr.strip().splitlines()[-1]
    bad = run_main(*common, f"--model_dir={model_dir}", "--mode=eval_robustness",
                   "--robustness_attacks=pgd,fab", cwd=tmp_path)
    assert bad.returncode == 2 and "fab" in bad.stderr.strip().splitlines()[-1]


def test_main_eval_robustness_on_an_exported_model(tmp_path):
    """The command-line path on a SavedModel exported in this process (fast)."""
    from efficientnet_advprop.export import export_saved_model
    from efficientnet_advprop.models import build_model

    model = build_model("resnet-18-cifar", 10, image_size=32, width_multiplier=0.125,
                        num_aux=1)
    export_saved_model(model, str(tmp_path / "export"), eval_crop="cifar", metadata={
        "model_name": "resnet-18-cifar", "num_classes": 10})
    run = run_main(f"--saved_model_dir={tmp_path / 'export'}", "--mode=eval_robustness",
                   "--num_eval_images=20", "--eval_batch_size=8", "--eval_epsilon=2",
                   "--eval_attack_iterations=2", "--robustness_attacks=pgd,mi-fgsm",
                   "--curve_iterations=1,2", "--corruptions=jpeg_compression",
                   "--corruption_severities=3", "--robustness_properties=false",
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "export_robustness" / "robustness.json").read_text())
    assert result["num_images"] == 20 and result["model"]["saved_model"].endswith("export")
    assert set(result["attacks"]) == {"pgd2", "mi-fgsm2"}
    _check_invariants(result)
    assert "properties" not in result and "mbn" not in result
    assert (tmp_path / "export_robustness" / "attack_iterations.png").exists()
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["clean_accuracy"] == result["clean_accuracy"]
