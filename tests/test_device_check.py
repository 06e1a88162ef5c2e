"""scripts/device_check.py: the dry run end to end, and the report it writes."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from efficientnet_advprop.tools import device_check
from efficientnet_advprop.tools.device_check import dry_run_plan
from efficientnet_advprop.recipes import RECIPES

SCRIPT = os.path.join(REPO_ROOT, "scripts", "device_check.py")
GPUS = tf.config.list_physical_devices("GPU")


def _check_environment(env):
    assert env["tensorflow"] == tf.__version__
    assert env["keras"] and env["cpu_cores"] >= 1
    assert env["devices"]["CPU"]
    assert env["xla"]["available"] is True  # XLA compiles on a CPU too


def _check_benchmark(bench, models):
    assert [m["model"] for m in bench["models"]] == [m.model_name for m in models]
    for model, plan in zip(bench["models"], models):
        assert model["errors"] == [] and model["skipped"] == [], model
        assert [r["config"] for r in model["rows"]] == list(plan.configs)
        for row in model["rows"]:
            assert row["images_per_second"] > 0
            assert row["seconds_per_step"] == pytest.approx(
                row["batch_size"] / row["images_per_second"])
            assert row["ratio_to_vanilla"] > 0
            assert len(row["rounds"]) >= 1 and all(r > 0 for r in row["rounds"])
            if GPUS:
                assert row["memory_peak_bytes"] >= row["memory_resident_bytes"] > 0
            else:
                assert row["memory_peak_bytes"] is None  # not tracked on a CPU
        vanilla = next(r for r in model["rows"] if r["config"] == "vanilla")
        assert vanilla["ratio_to_vanilla"] == 1.0
        fast = next(r for r in model["rows"] if r["config"] == "fast_advprop")
        assert fast["cost_model_passes"] == pytest.approx(1.2)
        pieces = model["fast_advprop_breakdown"]
        for key in ("noisy_pass_s", "shuffle_s", "adversarial_pass_s", "step_s"):
            assert pieces[key] > 0, pieces
        assert pieces["pieces_s"] == pytest.approx(
            pieces["noisy_pass_s"] + pieces["shuffle_s"] + pieces["adversarial_pass_s"])


def _check_input(pipe, plan):
    assert len(pipe["rows"]) == len(plan.input_configs)
    assert [(r["augmentation"], r["auto_augment"]) for r in pipe["rows"]] == list(
        plan.input_configs)
    for row in pipe["rows"]:
        assert row["images_per_second_one_core"] > 0
        assert row["images_per_second_all_cores"] > 0
        assert row["images_per_second_per_core_all"] == pytest.approx(
            row["images_per_second_all_cores"] / pipe["cpu_cores"])
        fastest = pipe["fastest_step"]["images_per_second"]
        assert row["cores_needed_one_core_rate"] == pytest.approx(
            fastest / row["images_per_second_one_core"])


def _row(config, seconds, passes, vanilla=0.1):
    return {"config": config, "model": "resnet-50", "description": config, "image_size": 224,
            "batch_size": 128, "cost_model_passes": passes, "seconds_per_step": seconds,
            "images_per_second": 128 / seconds, "rounds": [seconds] * 3,
            "build_seconds": 30.0, "memory_resident_bytes": 2 ** 30,
            "memory_peak_bytes": 9 * 2 ** 30, "ratio_to_vanilla": seconds / vanilla,
            "ratio_to_reference": None}


def _report():
    """A complete report as device_check.run assembles it (GPU figures made up)."""
    env = {"python": "3.11", "platform": "Linux", "tensorflow": "2.21.0", "keras": "3.15.1",
           "numpy": "2", "cpu_cores": 16, "accelerator": "GPU",
           "devices": {"CPU": ["/physical_device:CPU:0"], "GPU": ["/physical_device:GPU:0"],
                       "TPU": []},
           "gpus": [{"name": "NVIDIA H100", "compute_capability": "9.0"}],
           "cuda_build": True, "cuda_version": "12.5", "cudnn_version": "9",
           "xla": {"available": True, "seconds": 0.5, "error": None}, "variables": {},
           "nvidia_smi": None}
    tests = {"command": "python -m pytest tests/test_accelerator.py -m accelerator",
             "returncode": 0, "timed_out": False, "seconds": 100.0,
             "counts": {"passed": 2}, "log": "x.log", "output_tail": "",
             "tests": [{"id": "tests/test_accelerator.py::a", "outcome": "passed",
                        "message": "", "seconds": 1.0}] * 2}
    model = {"model": "resnet-50", "image_size": 224, "model_kwargs": {},
             "configs": ["vanilla", "fast_advprop", "advprop_pgd1"], "batch_size": 128,
             "rows": [_row("vanilla", 0.1, 1.0), _row("fast_advprop", 0.16, 1.2),
                      _row("advprop_pgd1", 0.28, 3.0)],
             "skipped": [], "errors": [], "out_of_memory": [
                 {"batch_size": 256, "error": "ResourceExhaustedError: OOM"}],
             "fast_advprop_breakdown": {"noisy_pass_s": 0.11, "shuffle_s": 0.002,
                                        "adversarial_pass_s": 0.03, "step_s": 0.16,
                                        "pieces_s": 0.142, "other_s": 0.018}}
    bench = {"precision": "bfloat16", "jit_compile": True, "steps_per_round": 10,
             "repeats": 3, "warmup": 2, "memory_device": "GPU:0", "seconds": 200.0,
             "models": [model], "tensor_float_32": True}
    pipe = {"source": "synthesised JPEGs", "dataset": "folder", "cpu_cores": 16,
            "fastest_step": {"model": "resnet-50", "config": "vanilla",
                             "images_per_second": 1280.0}, "seconds": 30.0,
            "rows": [{"augmentation": "inception", "auto_augment": "v0", "image_size": 224,
                      "batch_size": 64, "images_per_second_one_core": 80.0,
                      "images_per_second_all_cores": 960.0,
                      "images_per_second_per_core_all": 60.0,
                      "cores_needed_one_core_rate": 16.0,
                      "cores_needed_all_cores_rate": 1280.0 / 60.0}]}
    report = {"meta": {"started": "2025-01-01T00:00:00+00:00", "dry_run": False,
                       "out_dir": "x", "time_budget_s": 450.0, "wall_seconds": 400.0,
                       "plan": {}},
              "environment": env, "tests": tests, "benchmark": bench,
              "input_pipeline": pipe}
    report["findings"] = device_check.findings(report)
    return report


def test_report_is_written_as_json_and_markdown_with_every_section(tmp_path):
    report = _report()
    json_path, md_path = device_check.write_report(report, str(tmp_path / "out"))
    with open(json_path) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(report))
    assert set(device_check.SECTIONS) <= set(written)
    md = open(md_path).read()
    for text in ("# Device check\n", "## Environment", "| XLA | available |",
                 "## Accelerator tests", "2 passed", "## Train-step benchmark",
                 "### resnet-50 @224 px, batch 128", "| fast_advprop | 800.0 | 0.1600 | 1.60 |",
                 "| 9.00 | 1.00 |", "Fast AdvProp's pieces", "| noisy pass (+ K-1 PGD steps) | 110.00 | 69% |",
                 "out of memory at batch 256", "## Input pipeline",
                 "| inception | v0 | 224 | 80.0 | 960.0 | 60.0 | 16.0 / 21.3 |",
                 "## Findings", "Fast AdvProp costs 1.60x vanilla, more than 1.3x"):
        assert text in md, text
    findings = written["findings"]
    assert "2 accelerator tests passed." in findings
    assert any("needs 16.0 cores at that rate" in line for line in findings)
    assert any("out of device memory at batch 256; halved" in line for line in findings)


def test_findings_name_where_fast_advprop_time_goes():
    report = {"tests": None, "input_pipeline": None, "benchmark": {"models": [{
        "model": "m", "image_size": 224, "batch_size": 128, "out_of_memory": [],
        "skipped": [{"config": "advprop_pgd5", "reason": "time budget"}], "errors": [],
        "rows": [{"config": "vanilla", "ratio_to_vanilla": 1.0, "cost_model_passes": 1.0,
                  "seconds_per_step": 0.1},
                 {"config": "fast_advprop", "ratio_to_vanilla": 1.5,
                  "cost_model_passes": 1.2, "seconds_per_step": 0.15}],
        "fast_advprop_breakdown": {"noisy_pass_s": 0.09, "shuffle_s": 0.001,
                                   "adversarial_pass_s": 0.03, "step_s": 0.15,
                                   "pieces_s": 0.121, "other_s": 0.029}}]}}
    lines = device_check.findings(report)
    cost = next(line for line in lines if "Fast AdvProp costs 1.50x" in line)
    assert "more than 1.3x" in cost and "the largest is the noisy pass" in cost
    assert "0.90x a vanilla step" in cost  # 90 ms noisy pass / 100 ms vanilla step
    assert len([line for line in lines if "fast_advprop" in line.lower().replace(
        " ", "_")]) == 1  # one line, not a second "missed its target" one
    assert any("advprop_pgd5 skipped (time budget)" in line for line in lines)


def test_pytest_outcomes_are_read_from_junit_and_from_verbose_output(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_accelerator" name="a" '
        'time="1.5"/><testcase classname="tests.test_accelerator" name="b[x]" time="0">'
        '<skipped message="no GPU visible to TensorFlow"/></testcase>'
        '<testcase classname="tests.test_accelerator" name="c" time="2">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '</testsuite></testsuites>')
    tests = device_check.parse_junit(str(xml))
    assert [(t["id"], t["outcome"], t["message"]) for t in tests] == [
        ("tests/test_accelerator.py::a", "passed", ""),
        ("tests/test_accelerator.py::b[x]", "skipped", "no GPU visible to TensorFlow"),
        ("tests/test_accelerator.py::c", "failed", "assert 1 == 2")]
    output = ("tests/test_accelerator.py::a PASSED [ 50%]\n"
              "tests/test_accelerator.py::b[x] SKIPPED (no GPU) [100%]\nnoise\n")
    assert [(t["id"], t["outcome"]) for t in device_check.parse_verbose_output(output)] == [
        ("tests/test_accelerator.py::a", "passed"),
        ("tests/test_accelerator.py::b[x]", "skipped")]


@pytest.mark.slow  # the whole dry run: 11 minutes on this project's loaded 2-core machine
def test_dry_run_end_to_end_writes_every_section(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, SCRIPT, "--dry_run", f"--out_dir={tmp_path}"],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path),
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / device_check.REPORT_JSON) as f:
        report = json.load(f)
    assert set(device_check.SECTIONS) <= set(report)
    plan = dry_run_plan()
    _check_environment(report["environment"])
    tests = report["tests"]
    assert tests["returncode"] == 0 and not tests["timed_out"]
    if not GPUS:  # here: every one skipped, with the reason
        assert tests["counts"] == {"skipped": len(RECIPES) + 5}
        assert all(t["message"] == "no GPU visible to TensorFlow" for t in tests["tests"])
        assert any("accelerator tests skipped" in line for line in report["findings"])
    _check_benchmark(report["benchmark"], plan.models)
    _check_input(report["input_pipeline"], plan)
    assert "## Findings" in (tmp_path / device_check.REPORT_MD).read_text()
    assert "# Device check (dry run)" in result.stdout
