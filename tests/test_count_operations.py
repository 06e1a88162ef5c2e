"""scripts/count_operations.py: XLA's operation counts of the claims tiers' runs and of
the device check's steps, from which docs/reproducing.md sizes the GPU tiers."""

import json
import os
import subprocess
import sys

import pytest

from efficientnet_advprop.claims import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "count_operations.py")


def count(*flags, cwd):
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def test_unknown_target_is_one_line(tmp_path):
    done = count("--what=tpu", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "count_operations.py: error: --what=tpu: expected benchmark or a tier ("
        + ", ".join(suite.TIERS) + ")")


@pytest.mark.slow  # every run of the smoke tier lowered once: ~1.5 minutes here
def test_smoke_tier_counts_every_run(tmp_path):
    out = tmp_path / "smoke.json"
    done = count("--what=smoke", f"--out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {r["run"]: r for r in record["rows"]}
    assert set(rows) == {r.name for r in suite.RUNS}
    # an attack step and a second training pass cost more than vanilla's step
    assert rows["advprop_eps1"]["gflop_per_step"] > 2 * rows["vanilla"]["gflop_per_step"]
    assert record["tier_pflop"] == pytest.approx(sum(r["pflop"] for r in rows.values()))
    assert record["command"].startswith("python scripts/count_operations.py")
