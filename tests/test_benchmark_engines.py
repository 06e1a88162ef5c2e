"""scripts/benchmark_engines.py: the batch rule, the result names, and dry runs end to end
(both engine workers, toy sizes: resnet-18-cifar at width 0.125, 1 round of 1 step).

The dry runs are two commands of under a minute each on a 2-core CPU: vanilla and
advprop in one, fast_advprop in the other -- the three together compile six train steps
(about 70 s under load), so fast_advprop runs apart. Its batch in the dry run is 30
drawn images (--min_bn_batch=2: three shuffle-BN groups of 2 adversarial images, clean
groups of 8); at the config's min_bn_batch of 16 it is 240. The JAX worker compiles
with XLA's cheaper backend settings (XLA_FLAGS) to save time: these runs check the
plumbing, not the speed.
"""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, with_quick_xla

SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark_engines.py")


def _module():
    spec = importlib.util.spec_from_file_location("benchmark_engines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry_run(tmp_path, recipes, min_bn_batch):
    env = with_quick_xla(dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    out = tmp_path / "benchmark"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--models=resnet-18-cifar", f"--recipes={recipes}",
         "--width_multiplier=0.125", "--batch_size=8", f"--min_bn_batch={min_bn_batch}",
         "--rounds=1", "--steps_per_round=1", "--warmup=0", f"--output_dir={out}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = glob.glob(str(out / "engines-*.json"))
    assert len(results) == 1 and os.path.exists(results[0][:-5] + ".md"), results
    with open(results[0]) as f:
        result = json.load(f)
    assert [c["recipe"] for c in result["cases"]] == recipes.split(",")
    for case in result["cases"]:
        for engine in ("tensorflow", "jax"):
            row = case[engine]
            assert not row.get("error"), (case["recipe"], engine, row.get("error"))
            rate = row["images_per_second"]
            assert math.isfinite(rate) and rate > 0, (case["recipe"], engine, rate)
            assert row["compile_s"] >= 0 and len(row["rounds"]) == 1
        assert case["jax_to_tf"] > 0
    assert result["git"]["revision"] and result["machine"]["cpu_cores"] >= 1
    assert result["versions"]["keras"] and result["versions"]["jax"]
    return result


def test_dry_run_vanilla_advprop(tmp_path):
    result = _dry_run(tmp_path, "vanilla,advprop", 1)
    assert [c["drawn_batch"] for c in result["cases"]] == [8, 8]


@pytest.mark.slow  # ~1 minute; test_batch_rule checks the sizing, and the JAX device
# check's dry run (test_device_check_jax.py) times Fast AdvProp's jitted step
def test_dry_run_fast_advprop(tmp_path):
    result = _dry_run(tmp_path, "fast_advprop", 2)
    case = result["cases"][0]
    assert case["drawn_batch"] == 30 and case["clean_batch"] == 24
    assert min(case["bn_batches"].values()) == 2


def test_batch_rule():
    """Recipe.drawn_batch of the clean batch, raised to the BN minimum: Fast AdvProp
    draws 240 at the config's min_bn_batch (16), as config.check_bn_batches asks."""
    module = _module()
    clean, drawn, recipe, sizes, config_rule = module.case_batches("fast_advprop", 64, 16)
    assert (clean, drawn, config_rule) == (192, 240, 240)
    assert recipe.shuffle_bn_group_size == 16 and min(sizes.values()) == 16
    assert module.case_batches("vanilla", 64, 16)[:2] == (64, 64)
    assert module.case_batches("advprop_pgd1", 64, 16)[:2] == (64, 64)
    assert module.case_batches("vanilla", 8, 16)[:2] == (16, 16)


def test_result_names_never_overwrite(tmp_path):
    module = _module()
    first = module.output_paths(str(tmp_path), "2026-12-03")
    assert [os.path.basename(p) for p in first] == ["engines-2026-12-03.json",
                                                    "engines-2026-12-03.md"]
    open(first[1], "w").close()  # an older run's .md alone still blocks the name
    second = module.output_paths(str(tmp_path), "2026-12-03")
    assert os.path.basename(second[0]) == "engines-2026-12-03-2.json"
