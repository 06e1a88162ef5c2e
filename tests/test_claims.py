"""The claims suite (efficientnet_advprop/claims, scripts/reproduce_claims.py).

The fast tests run two smoke-tier runs in-process (together they reach every kind of
evaluation: clean, auxiliary BN, PGD, corruptions, BN statistics, the MBN sweep) and
write the report; the slow one runs the whole smoke tier through the script.
"""

import json
import os
import subprocess
import sys

import pytest

from efficientnet_advprop import config as config_lib
from efficientnet_advprop.claims import report, runner, suite
from efficientnet_advprop.data.cifar_tar import names_digest, select

# its module fixture runs once: every test of this file on one xdist worker
# (the test command's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("claims")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TAR = os.path.join(os.path.dirname(REPO), "shared", "data",
                          "cifar10-train-jpeg.tar.gz")


def test_verdicts_follow_the_error_bars():
    assert report.greater([0.80, 0.82], [0.70, 0.71]) == report.HOLDS
    assert report.greater([0.70, 0.71], [0.80, 0.82]) == report.FAILS
    assert report.greater([0.75, 0.80], [0.74, 0.79]) == report.INCONCLUSIVE
    assert report.greater([0.8], [0.7]) == "holds (1 seed)"
    assert report.greater([], [0.7]) == report.MISSING
    assert report.combine(report.HOLDS, report.INCONCLUSIVE) == report.INCONCLUSIVE
    assert report.combine(report.HOLDS, report.FAILS, report.MISSING) == report.MISSING
    assert report.combine(report.HOLDS, "holds (1 seed)") == report.HOLDS


def test_cost_ratio_is_per_epoch_and_leaves_out_resumed_runs():
    def rec(seconds, start_step=0, train_steps=100, steps_per_epoch=25):
        return {"train_seconds": seconds, "start_step": start_step,
                "train_steps": train_steps, "steps_per_epoch": steps_per_epoch,
                "results": {}}

    # Fast AdvProp's calibrated budget: 3 epochs of 25 steps against vanilla's 4.
    runs = {"fast_advprop": [rec(117, train_steps=75), rec(40, start_step=30, train_steps=75)],
            "vanilla": [rec(100), rec(120)]}
    # 40 s timed only the part after a resume: the ratio uses the whole 117 s run.
    assert report.cost_ratio(runs, "fast_advprop", "vanilla",
                             per_epoch=False) == pytest.approx(1.17)
    assert report.cost_ratio(runs, "fast_advprop", "vanilla") == pytest.approx(1.56)
    rows = report.check_fast_advprop_cost(runs)
    assert rows[-1][1] == "1.56x per epoch (1.17x for the whole calibrated run)"
    assert rows[-1][2] == report.FAILS  # above 1.3x per epoch, whatever the whole run
    assert report.cost_ratio({"fast_advprop": [rec(40, start_step=30)],
                              "vanilla": [rec(100)]}, "fast_advprop", "vanilla") is None


def test_mbn_sweep_must_be_monotone_in_every_seed():
    def record(clean, robust):
        sweep = [{"gamma": g, "clean_accuracy": c, "pgd_accuracy": r}
                 for g, c, r in zip((0.0, 0.5, 1.0), clean, robust)]
        return {"results": {"mbn_sweep": sweep}}

    good = record([0.7, 0.6, 0.5], [0.1, 0.2, 0.3])
    # Their mean is monotone (0.65, 0.61, 0.5), but the second seed's clean rises.
    bad = record([0.6, 0.62, 0.5], [0.1, 0.2, 0.3])
    verdict = lambda runs: report.check_bn_statistics(runs)[1][2]  # noqa: E731
    assert verdict({"advprop_eps4": [good, good]}) == report.HOLDS
    assert verdict({"advprop_eps4": [good, bad]}) == report.FAILS


def test_late_gain_says_whether_a_curve_still_climbs():
    def record(accs):
        return {"results": {"curve": [{"epoch": e + 1, "clean_accuracy": a}
                                      for e, a in enumerate(accs)]}}

    # 8 epochs: the gain is from epoch 6 (the last point at or before 3/4) to epoch 8
    climbing = record([0.3, 0.4, 0.5, 0.55, 0.6, 0.62, 0.65, 0.66])
    flat = record([0.3, 0.4, 0.5, 0.55, 0.6, 0.62, 0.625, 0.624])
    assert report.late_gain(climbing) == pytest.approx(0.04)
    assert report.late_gain(flat) == pytest.approx(0.004)
    assert report.late_gain(record([0.5])) is None
    assert "**not** flattened" in report.flattening_note({"nofrost_eps8": [climbing, flat]})
    assert "has flattened" in report.flattening_note({"nofrost_eps8": [flat, flat]})
    assert report.flattening_note({}) is None


def test_pending_runs_go_seed_by_seed(tmp_path):
    """A call cut short by its time budget has measured every run of the first seeds."""
    tier = suite.TIERS["gpu"]
    done = runner.result_path(str(tmp_path), tier.name, "vanilla", 0)
    os.makedirs(os.path.dirname(done))
    with open(done, "w") as f:
        f.write("{}")
    order = [(spec.name, seed) for spec, seed in
             runner.pending(tier, str(tmp_path), ["vanilla", "advprop_eps1"])]
    assert order == [("advprop_eps1", 0), ("vanilla", 1), ("advprop_eps1", 1),
                     ("vanilla", 2), ("advprop_eps1", 2)]
    # a tier limited to some runs has only those pending
    wide = suite.TIERS["gpu_wide"]
    assert {spec.name for spec, _ in runner.pending(wide, str(tmp_path))} == set(wide.runs)


def test_every_claim_names_runs_of_the_suite_and_has_a_check():
    for claim in suite.CLAIMS:
        assert set(claim.runs) <= set(suite.RUNS_BY_NAME), claim.key
        assert claim.key in report.CHECKS
    for run in suite.RUNS:
        assert set(run.evals) <= set(suite.EVALS), run.name
    # Every run of the suite is read by a claim; the controls by none, and say so.
    claim_runs = {name for claim in suite.CLAIMS for name in claim.runs}
    assert claim_runs == {run.name for run in suite.RUNS}
    for run in suite.DIAGNOSTICS:
        assert run.name not in claim_runs and set(run.evals) <= set(suite.EVALS)
        assert report.label(run.name) == f"{run.name} (control)"
    assert report.label("vanilla") == "vanilla"


def test_runs_of_a_tier_share_everything_but_the_method():
    tier = suite.TIERS["cpu"]
    shared = ("optimizer", "base_learning_rate", "lr_schedule", "weight_decay",
              "label_smoothing", "moving_average_decay", "augmentation", "auto_augment",
              "width_multiplier", "seed")
    configs = [suite.tier_overrides(tier, run, 1, "/data", "/m") for run in suite.RUNS]
    for key in shared:
        assert len({repr(c[key]) for c in configs}) == 1, key
    # Fast AdvProp draws 1 / (1 - p_adv) as many images so that its clean batch is the
    # others' batch; every other run trains the same batch.
    batches = {run.name: c["train_batch_size"] for run, c in zip(suite.RUNS, configs)}
    assert batches.pop("fast_advprop") == tier.batch_size / 0.8
    assert set(batches.values()) == {tier.batch_size}


@pytest.mark.parametrize("tier_name", ["cpu", "gpu", "gpu_wide"])
def test_every_run_of_the_full_tiers_resolves_to_its_budget(tier_name, tmp_path):
    # The GPU tiers have never run (no device was lent since the JAX engine landed):
    # their configurations must at least pass every check of the config and keep Fast
    # AdvProp's calibrated budget, at the tier's precision.
    # On the embedded data here; the tiers train on the 45,000-image split.
    tier = suite.TIERS[tier_name]
    runs = [r for r in suite.RUNS + suite.DIAGNOSTICS if tier.runs is None or r.name in tier.runs]
    assert tier.runs is None or len(runs) == len(tier.runs)
    for run in runs:
        overrides = suite.tier_overrides(tier, run, 0, None, str(tmp_path))
        if overrides.get("nf_stage_gains") == suite.FIT_ON_TRAINING_BATCH:
            overrides["nf_stage_gains"] = (1.0,) * 5  # the runner fits them on the split
        cfg = config_lib.resolve(overrides)
        epochs = cfg.optim.train_steps / cfg.optim.steps_per_epoch
        calibrated = tier.epochs / 1.2 if run.recipe == "fast_advprop" else tier.epochs
        assert epochs == pytest.approx(calibrated, rel=0.02), run.name
        assert cfg.run.precision == tier.precision


def test_held_out_part_does_not_depend_on_the_train_count():
    images = {c: {f"{i:04d}.jpg": b"" for i in range(30)} for c in ("cat", "dog")}
    _, train_a, held_a = select(images, None, 5, seed=0, eval_first=True)
    _, train_b, held_b = select(images, 10, 5, seed=0, eval_first=True)
    assert names_digest(held_a) == names_digest(held_b)
    assert len(held_a) == 10 and len(train_a) == 50 and len(train_b) == 20
    names = lambda items: {(c, n) for c, n, _ in items}  # noqa: E731
    assert not names(train_a) & names(held_a)
    assert names(train_b) <= names(train_a)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    tier = suite.TIERS["smoke"]
    records = {}
    for name in ("advprop_eps4", "vanilla"):
        records[name] = runner.run_one(
            tier, suite.RUNS_BY_NAME[name], 0, data_dir=None,
            work_dir=str(root / "work"), results_dir=str(root / "results"),
            command="pytest", log=lambda m: None)
    return root, tier, records


def test_smoke_runs_write_complete_result_files(smoke_results):
    root, tier, records = smoke_results
    for name, record in records.items():
        path = runner.result_path(str(root / "results"), "smoke", name, 0)
        with open(path) as f:
            saved = json.load(f)
        assert saved == json.loads(json.dumps(record))
        for key in ("command", "git_revision", "seed", "wall_seconds", "machine", "data"):
            assert saved[key] not in (None, ""), key
        assert saved["results"]["step"] == tier.train_steps
        assert saved["start_step"] == 0 and saved["train_seconds"] > 0
        curve = saved["results"]["curve"]
        assert [p["step"] for p in curve] == [tier.train_steps]
        assert 0.0 <= saved["results"]["clean_accuracy"] <= 1.0
        assert 0.0 <= saved["results"]["pgd_accuracy"] <= 1.0
    adv = records["advprop_eps4"]["results"]
    assert 0.0 <= adv["aux_clean_accuracy"] <= 1.0
    assert [row["gamma"] for row in adv["mbn_sweep"]] == list(tier.mbn_gammas)
    summary = adv["bn_statistics_summary"]
    assert summary["layers"] == len(adv["bn_statistics"]) > 0
    errors = records["vanilla"]["results"]["corruption_errors"]
    assert set(errors) == set(tier.corruptions)
    assert all(set(e) == {str(s) for s in tier.severities} for e in errors.values())
    # Both runs are done: nothing of them is pending any more.
    left = runner.pending(tier, str(root / "results"), ["advprop_eps4", "vanilla", "sat_eps4"])
    assert [(spec.name, seed) for spec, seed in left] == [("sat_eps4", 0)]


def test_report_has_every_claim_and_the_plots(smoke_results):
    root, _, _ = smoke_results
    text = report.write_report(str(root / "results"), tiers=("smoke",))
    for claim in suite.CLAIMS:
        assert claim.title in text
    assert "advprop_eps4" in text and "vanilla" in text
    assert report.MISSING in text  # the runs not made here are marked, not invented
    for plot in ("curves.png", "frontier.png", "bn_statistics.png"):
        assert os.path.getsize(root / "results" / "smoke" / plot) > 1000


def test_script_rejects_unknown_claims_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "reproduce_claims.py"),
         "--tier=smoke", "--claims=nope", f"--results_dir={tmp_path}"],
        capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "reproduce_claims.py: error: --claims: unknown nope")


@pytest.mark.slow
def test_whole_smoke_tier_through_the_script(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "reproduce_claims.py"),
         "--tier=smoke", f"--results_dir={tmp_path / 'results'}",
         f"--work_dir={tmp_path / 'work'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = report.load_results(str(tmp_path / "results"), "smoke")
    assert sorted(runs) == sorted(r.name for r in suite.RUNS)
    assert "not run" not in open(tmp_path / "results" / "README.md").read()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHARED_TAR), reason="needs ../shared/data")
def test_split_of_the_shared_images_is_the_committed_one(tmp_path):
    from efficientnet_advprop.claims import ensure_split

    split = ensure_split(SHARED_TAR, str(tmp_path / "split"))
    with open(os.path.join(REPO, "results", "claims", "split.json")) as f:
        committed = json.load(f)
    assert split == committed
    assert (split["num_train"], split["num_held_out"]) == (45000, 5000)


def test_unit_variance_control_fits_its_gains_on_training_images_only():
    from efficientnet_advprop.claims.runner import fit_gains_on_training_batch
    from efficientnet_advprop.data.pipeline import EMBEDDED_DIR

    overrides = {"data_dir": EMBEDDED_DIR, "model_name": "nf-resnet-26-cifar",
                 "width_multiplier": 0.125}
    gains = fit_gains_on_training_batch(overrides, seed=0, count=64)
    assert len(gains) == 5 and all(g > 0 for g in gains)
    # the published model's stages lose variance, so every gain lifts it (> 1)
    assert min(gains) > 1.0, gains
    cfg = config_lib.resolve({"recipe": "nofrost", "model_name": "nf-resnet-26-cifar",
                              "nf_stage_gains": [str(g) for g in gains]})  # as flags give
    assert cfg.model.nf_stage_gains == pytest.approx(gains)
    with pytest.raises(config_lib.ConfigError, match="applies to NF-ResNets"):
        config_lib.resolve({"model_name": "resnet-18-cifar", "nf_stage_gains": gains})


def test_cost_ratio_compares_runs_on_the_same_processor_only():
    def rec(seconds, cpu):
        return {"train_seconds": seconds, "train_steps": 100, "steps_per_epoch": 25,
                "machine": {"cpu": cpu}}

    runs = {"fast_advprop": [rec(60, "AMD EPYC")], "vanilla": [rec(100, "Intel Xeon")]}
    assert report.cost_ratio(runs, "fast_advprop", "vanilla") is None  # not comparable
    runs["vanilla"].append(rec(50, "AMD EPYC"))
    assert report.cost_ratio(runs, "fast_advprop", "vanilla") == pytest.approx(1.2)


def test_readme_block_replaces_only_what_stands_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- CLAIMS_START -->\nold table\n<!-- CLAIMS_END -->\nrest\n")
    report.update_readme(str(readme), "new table")
    assert readme.read_text() == ("intro\n<!-- CLAIMS_START -->\nnew table\n"
                                  "<!-- CLAIMS_END -->\nrest\n")
    (tmp_path / "nomarkers.md").write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- CLAIMS_START -->"):
        report.update_readme(str(tmp_path / "nomarkers.md"), "x")
