"""The claims suite on the JAX engine, as on a GPU machine without TensorFlow
(blocked as tests/without_tf.py does): in one call, with KERAS_BACKEND unset as typed
there and in bfloat16 as the GPU tiers train, the smoke tier's advprop_eps4 run,
which needs every evaluation kind but the corruptions (main and adversarial BN, PGD,
BN statistics, the MBN sweep), and nofrost_eps8 (the normalizer-free model); the
compilation cache they leave; the engine and tier flags' errors; the split read
from the tarball; the report of runs whose corruptions were not measured. The slow
tests add vanilla (corruptions: null) and bn_sat_eps8 (the BN side
of the pair) in two calls, the first stopped by its time budget, as the GPU tier's
calls are on the day.

XLA compiles with its cheaper backend settings (conftest.QUICK_XLA): these runs check
the pipeline, not its speed or its numbers, and compilation is most of their time on a
CPU."""

import json
import os
import subprocess
import sys

import pytest

from efficientnet_advprop.claims import report, suite
from efficientnet_advprop.claims.runner_common import corruptions_not_measured
from conftest import QUICK_XLA, SHARED_DATA

# its module fixture runs once: every test of this file on one xdist worker
# (the test command's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("claims_jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "reproduce_claims.py")
SMOKE = suite.TIERS["smoke"]
# tests/without_tf.py's block of TensorFlow, without its KERAS_BACKEND=jax
BLOCK_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")


def environment(**extra):
    # XLA_FLAGS replaced: one host device (conftest asks for two), cheap compilation
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=QUICK_XLA, **extra)


def reproduce(tmp_path, *flags, keras_backend="jax"):
    """The script on the smoke tier with TensorFlow blocked; keras_backend=None leaves
    KERAS_BACKEND unset (the command as typed on a machine without TensorFlow)."""
    env = environment()
    env.pop("KERAS_BACKEND", None)
    if keras_backend:
        env["KERAS_BACKEND"] = keras_backend
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TF, SCRIPT, "--tier=smoke",
         f"--results_dir={tmp_path / 'results'}", f"--work_dir={tmp_path / 'work'}", *flags],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)


def record(results, run):
    with open(results / "smoke" / run / "seed0.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def advprop(tmp_path_factory):
    pytest.importorskip("jax")
    tmp_path = tmp_path_factory.mktemp("claims_jax")
    # as typed where TensorFlow is missing: the script sets KERAS_BACKEND=jax itself
    # in bfloat16, as the GPU tiers train
    done = reproduce(tmp_path, "--engine=jax", "--runs=advprop_eps4,nofrost_eps8",
                     "--precision=bfloat16", keras_backend=None)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "results", done.stdout


def test_advprop_run_measures_both_bn_sets_statistics_and_the_mbn_sweep(advprop):
    results, stdout = advprop
    assert "jax engine: 2 run(s) to do: advprop_eps4:0, nofrost_eps8:0" in stdout
    rec = record(results, "advprop_eps4")
    assert rec["engine"] == "jax" and rec["machine"]["engine"] == "jax"
    assert rec["overrides"]["precision"] == "bfloat16"
    # the compiled programs are kept for the next seeds' runs of the same recipe
    assert len(os.listdir(results.parent / "work" / "jax_cache")) > 0
    assert rec["machine"]["jax"] and "cpu:" in rec["machine"]["devices"][0]
    out = rec["results"]
    for key in ("clean_accuracy", "aux_clean_accuracy", "pgd_accuracy", "aux_pgd_accuracy"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["step"] == SMOKE.train_steps
    assert [point["step"] for point in out["curve"]] == [out["step"]]  # the checkpoint
    assert 0.0 <= out["curve"][0]["clean_accuracy"] <= 1.0
    stats = out["bn_statistics"]
    assert stats and all(r["main_var"] > 0 and r["aux_var"] > 0 for r in stats)
    assert out["bn_statistics_summary"]["layers"] == len(stats)
    sweep = out["mbn_sweep"]
    assert [row["gamma"] for row in sweep] == list(SMOKE.mbn_gammas)
    assert all(0.0 <= row[key] <= 1.0 for row in sweep
               for key in ("clean_accuracy", "pgd_accuracy"))
    # gamma 0 is the main BNs alone: on the same images and seeds, the PGD accuracy
    # measured through them
    assert SMOKE.mbn_images == SMOKE.attack_images
    assert sweep[0]["pgd_accuracy"] == pytest.approx(out["pgd_accuracy"])
    assert "corruption_errors" not in out  # not one of this run's evaluations
    for key in ("run", "title", "recipe", "tier", "seed", "command", "git_revision",
                "data", "model_name", "width_multiplier", "train_steps",
                "steps_per_epoch", "train_batch_size", "eval_epsilon",
                "eval_attack_iterations", "overrides", "start_step", "train_seconds",
                "train_images_per_second", "wall_seconds"):
        assert key in rec, key  # runner.run_one's schema
    text = (results / "README.md").read_text()
    assert "engine jax (the JAX engine does not measure the corruption errors)" in text
    assert (results / "smoke" / "bn_statistics.png").exists()


def test_nofrost_run_trains_the_nf_resnet(advprop):
    results, _ = advprop
    rec = record(results, "nofrost_eps8")
    assert rec["model_name"] == SMOKE.nf_model and rec["eval_epsilon"] == 8.0
    out = rec["results"]
    assert 0.0 <= out["clean_accuracy"] <= 1.0 and 0.0 <= out["pgd_accuracy"] <= 1.0
    assert "aux_clean_accuracy" not in out and "bn_statistics" not in out
    text = (results / "README.md").read_text()
    assert f"| nofrost_eps8 | {SMOKE.nf_model} x0.125 | 1 |" in text


def test_report_marks_corruptions_not_measured(advprop, tmp_path):
    """The claims that read corruption errors, from result files of the JAX engine
    (the advprop run's file as vanilla's and advprop_eps1's, with the corruption keys
    as jax_runner writes them)."""
    results, _ = advprop
    rec = record(results, "advprop_eps4")
    for name in ("vanilla", "advprop_eps1"):
        out = dict(rec, run=name, results=dict(rec["results"], **corruptions_not_measured()))
        path = tmp_path / "smoke" / name / "seed0.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(out))
    runs = report.load_results(str(tmp_path), "smoke")
    assert report.values(runs, "vanilla", "mean_corruption_error") == []
    rows = dict((test, verdict) for test, _, verdict in report.check_advprop_vs_vanilla(runs))
    assert rows["AdvProp mean corruption error < vanilla's"] == report.CORRUPTIONS_NOT_MEASURED
    assert rows["AdvProp (PGD-1 eps 1) clean > vanilla clean"].endswith("(1 seed)")
    text = report.write_report(str(tmp_path))
    assert "**not measured (corruptions are TensorFlow-only)**" in text
    assert "| not measured |" in text  # the runs table's corruption column


@pytest.mark.skipif(not os.path.exists(SHARED_DATA), reason="needs ../shared/data")
def test_tarball_split_read_on_jax_is_the_committed_one():
    """What the JAX engine trains and evaluates on (--data_dir=<the tarball>) is the
    suite's 45,000 / 5,000 split: the digests of results/claims/split.json."""
    pytest.importorskip("jax")
    from efficientnet_advprop.claims.jax_runner import split_record

    with open(os.path.join(ROOT, "results", "claims", "split.json")) as f:
        committed = json.load(f)
    split = split_record(SHARED_DATA)
    assert {key: split[key] for key in committed} == committed


def test_engine_flag_errors_are_one_line(tmp_path):
    """--engine=auto picks JAX where TensorFlow is missing (KERAS_BACKEND unset), which
    then wants the tarball, not a directory; an unknown engine is named."""
    pytest.importorskip("jax")
    done = reproduce(tmp_path, "--engine", "auto", "--tier=gpu", f"--data_dir={tmp_path}",
                     keras_backend=None)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"reproduce_claims.py: error: --data_dir={tmp_path}: the JAX engine reads the "
        "CIFAR-10 tar.gz itself; name that file (or pass it as --source)")
    done = reproduce(tmp_path, "--engine=jax", "--tier=gpu_wide", "--runs=sat_eps4")
    assert done.stderr.strip().splitlines()[-1] == (
        "reproduce_claims.py: error: --runs: sat_eps4 not in the gpu_wide tier (its runs: "
        "vanilla, advprop_eps1, fast_advprop)")
    done = reproduce(tmp_path, "--engine=jax", "--tier=gpu_wide", "--claims=nofrost")
    assert done.stderr.strip().splitlines()[-1] == (
        "reproduce_claims.py: error: --claims=nofrost: none of its runs is in the gpu_wide "
        "tier (its runs: vanilla, advprop_eps1, fast_advprop)")
    done = reproduce(tmp_path, "--engine=torch", keras_backend=None)
    assert done.stderr.strip().splitlines()[-1] == (
        "reproduce_claims.py: error: --engine=torch: expected one of auto, tensorflow, jax")
    done = reproduce(tmp_path, "--engine=jax", keras_backend="tensorflow")
    assert done.stderr.strip().splitlines()[-1] == (
        "reproduce_claims.py: error: --engine=jax with KERAS_BACKEND=tensorflow: unset it "
        "or set it to jax")


@pytest.fixture(scope="module")
def two_calls(tmp_path_factory):
    pytest.importorskip("jax")
    tmp_path = tmp_path_factory.mktemp("claims_jax_calls")
    runs = "--runs=vanilla,bn_sat_eps8"
    first = reproduce(tmp_path, "--engine=jax", runs, "--time_budget_s=1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = reproduce(tmp_path, "--engine=jax", runs)
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp_path / "results", first.stdout, second.stdout


@pytest.mark.slow
def test_a_time_budget_leaves_the_rest_for_the_next_call(two_calls):
    _, first, second = two_calls
    assert "not started: bn_sat_eps8:0 (rerun to go on)" in first
    assert "1 run(s) to do: bn_sat_eps8:0" in second


@pytest.mark.slow
def test_vanilla_records_its_corruptions_as_not_measured(two_calls):
    results, _, _ = two_calls
    vanilla = record(results, "vanilla")["results"]
    assert 0.0 <= vanilla["clean_accuracy"] <= 1.0 and 0.0 <= vanilla["pgd_accuracy"] <= 1.0
    assert vanilla["corruption_errors"] is None and vanilla["mean_corruption_error"] is None
    assert "TensorFlow-only" in vanilla["corruptions_not_measured"]
    rec = record(results, "bn_sat_eps8")
    assert rec["model_name"] == SMOKE.bn_model
    assert 0.0 <= rec["results"]["pgd_accuracy"] <= 1.0
    text = (results / "README.md").read_text()
    assert "| vanilla | resnet-18-cifar x0.125 | 1 |" in text
    assert "| not measured |" in text
