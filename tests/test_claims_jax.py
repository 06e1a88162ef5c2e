"""The claims suite on the JAX engine, as on a GPU machine without TensorFlow
(tests/without_tf.py blocks it): the smoke tier's runs that need every kind of
evaluation (main and adversarial BN, PGD, BN statistics, the MBN sweep, the
normalizer-free pair), in two calls, the first stopped by its time budget, as the
GPU tier's calls are on the day."""

import json
import os
import subprocess
import sys

import pytest

from efficientnet_advprop.claims import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT_TF = os.path.join(ROOT, "tests", "without_tf.py")
SCRIPT = os.path.join(ROOT, "scripts", "reproduce_claims.py")


def reproduce(tmp_path, *flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, WITHOUT_TF, SCRIPT, "--tier=smoke", "--engine=jax",
         f"--results_dir={tmp_path / 'results'}", f"--work_dir={tmp_path / 'work'}",
         "--runs=advprop_eps4,nofrost_eps8", *flags],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    pytest.importorskip("jax")
    tmp_path = tmp_path_factory.mktemp("claims_jax")
    first = reproduce(tmp_path, "--time_budget_s=1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = reproduce(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp_path / "results", first.stdout, second.stdout


def record(results, run):
    with open(results / "smoke" / run / "seed0.json") as f:
        return json.load(f)


def test_a_time_budget_leaves_the_rest_for_the_next_call(calls):
    _, first, second = calls
    assert "not started: nofrost_eps8:0 (rerun to go on)" in first
    assert "1 run(s) to do: nofrost_eps8:0" in second


def test_advprop_run_measures_both_bn_sets_statistics_and_the_mbn_sweep(calls):
    results, _, _ = calls
    rec = record(results, "advprop_eps4")
    assert rec["engine"] == "jax" and rec["machine"]["engine"] == "jax"
    out = rec["results"]
    for key in ("clean_accuracy", "aux_clean_accuracy", "pgd_accuracy", "aux_pgd_accuracy"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["step"] == suite.TIERS["smoke"].train_steps
    assert [point["step"] for point in out["curve"]] == [out["step"]]  # the checkpoint
    assert 0.0 <= out["curve"][0]["clean_accuracy"] <= 1.0
    stats = out["bn_statistics"]
    assert stats and all(r["main_var"] > 0 and r["aux_var"] > 0 for r in stats)
    assert out["bn_statistics_summary"]["layers"] == len(stats)
    sweep = out["mbn_sweep"]
    assert [row["gamma"] for row in sweep] == list(suite.TIERS["smoke"].mbn_gammas)
    assert all(0.0 <= row[key] <= 1.0 for row in sweep
               for key in ("clean_accuracy", "pgd_accuracy"))
    # gamma 0 is the main BNs alone: on the same images and seeds, the PGD accuracy
    # measured through them
    assert suite.TIERS["smoke"].mbn_images == suite.TIERS["smoke"].attack_images
    assert sweep[0]["pgd_accuracy"] == pytest.approx(out["pgd_accuracy"])
    assert "corruption_errors" not in out


def test_nofrost_run_trains_the_nf_resnet_and_the_report_names_the_engine(calls):
    results, _, second = calls
    rec = record(results, "nofrost_eps8")
    assert rec["model_name"] == suite.TIERS["smoke"].nf_model
    assert 0.0 <= rec["results"]["pgd_accuracy"] <= 1.0
    assert "aux_clean_accuracy" not in rec["results"]
    report = (results / "README.md").read_text()
    assert "engine jax (the JAX engine does not measure the corruption errors)" in report
    assert "| nofrost_eps8 | nf-resnet-26-cifar x0.125 | 1 |" in report
    assert (results / "smoke" / "bn_statistics.png").exists()
