"""scripts/device_check.py on the JAX engine, as on a GPU machine without TensorFlow
(tests/without_tf.py blocks it): the dry run at toy sizes on this CPU, so the code the
accelerator day needs cannot rot. The CPU is both the "device" and the reference here,
so the comparisons are trivial; what is checked is that every part runs and reports."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import QUICK_XLA

# its module fixture runs once: every test of this file on one xdist worker
# (the test command's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("device_check_jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT_TF = os.path.join(ROOT, "tests", "without_tf.py")
SCRIPT = os.path.join(ROOT, "scripts", "device_check.py")


def device_check(*flags, cwd):
    # one host device (conftest asks for two), cheap compilation
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=QUICK_XLA)
    return subprocess.run([sys.executable, WITHOUT_TF, SCRIPT, *flags], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("jax")
    out = tmp_path_factory.mktemp("device_check")
    done = device_check(f"--out_dir={out}", "--dry_run", "--precision=bfloat16",
                        "--models=resnet-18-cifar", "--test_recipes=fast_advprop",
                        cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "device_report.json") as f:
        return out, json.load(f), done.stdout


def test_environment_names_jax_its_devices_and_no_tensorflow(dry_run):
    _, report, _ = dry_run
    env = report["environment"]
    assert env["backend"] == "jax" and env["versions"]["keras"]
    assert env["tensorflow_importable"] is False
    assert [d["platform"] for d in env["devices"]] == ["cpu"]
    assert report["meta"]["engine"] == "jax" and report["meta"]["dry_run"]


def test_each_recipes_step_is_compared_with_the_cpu_reference(dry_run):
    out, report, _ = dry_run
    rows = report["tests"]["rows"]
    assert sorted((r["recipe"], r["precision"]) for r in rows) == [
        ("fast_advprop", "bfloat16"), ("fast_advprop", "float32")]
    for row in rows:
        assert row["outcome"] == "passed", row
        assert row["same_initial_weights"]
        assert row["loss_relative_difference"] <= row["bounds"]["loss_relative"]
    reference = np.load(out / "cpu_reference.npz")  # the child's float32 CPU step
    assert reference["fast_advprop/update"].size > 0
    assert np.isfinite(reference["fast_advprop/update"]).all()


def test_benchmark_times_every_configuration_and_prices_fast_advprop(dry_run):
    _, report, markdown = dry_run
    (group,) = report["benchmark"]["groups"]
    assert (group["model"], group["precision"]) == ("resnet-18-cifar", "bfloat16")
    rows = {r["config"]: r for r in group["rows"]}
    assert set(rows) == {"vanilla", "fast_advprop", "advprop_pgd1"}
    assert rows["vanilla"]["ratio_to_vanilla"] == 1.0
    assert rows["fast_advprop"]["batch"] == 20 and rows["vanilla"]["batch"] == 16
    assert rows["fast_advprop"]["cost_model"] == pytest.approx(1.2)
    for row in rows.values():
        assert row["images_per_second"] > 0 and row["compile_seconds"] > 0
        assert len(row["rounds"]) == 2 and row["ratio_to_vanilla"] > 0
        assert row["gflop_per_image"] > 0 and row["tflop_per_second"] > 0
    # XLA's operation counts per drawn image: an attack step and a second training
    # pass for AdvProp; Fast AdvProp's attack on a fifth of its images
    assert rows["vanilla"]["flop_ratio_to_vanilla"] == 1.0
    assert 2.0 < rows["advprop_pgd1"]["flop_ratio_to_vanilla"] < 3.5
    assert 1.0 < rows["fast_advprop"]["flop_ratio_to_vanilla"] < 1.6
    # no torch here: the peer is named as skipped, not silently dropped
    assert "not importable" in group["peer_skipped"]
    assert any("Fast AdvProp costs" in line for line in report["findings"])
    assert any("no PyTorch peer" in line for line in report["findings"])
    assert "| resnet-18-cifar | bfloat16 | fast_advprop | 20 |" in markdown


@pytest.mark.parametrize("flags, message", [
    (["--models=resnet-50"], "--models=resnet-50: not in this plan"),
    (["--input_data_dir=/tmp"], "--input_data_dir is the TensorFlow engine's"),
])
def test_bad_flags_are_one_line(tmp_path, flags, message):
    done = device_check(f"--out_dir={tmp_path / 'out'}", "--dry_run", *flags, cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
