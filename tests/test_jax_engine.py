"""The JAX engine as users run it: `KERAS_BACKEND=jax python main.py ...`, with and
without TensorFlow importable (tests/jax_main.py blocks it).

Each run is a fresh process (a process has one Keras backend). Runs use the embedded
set and a width-1/8 ResNet-18 so that each takes about half a minute here.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, with_quick_xla
from efficientnet_advprop.recipes import RECIPES

RUNNER = os.path.join(REPO_ROOT, "tests", "jax_main.py")
TINY = ["--model_name=resnet-18-cifar", "--width_multiplier=0.125", "--auto_augment=none",
        "--num_eval_images=250", "--eval_attack_iterations=2"]


def run_jax(*args, block_tf=False, cwd, env=None, timeout=600):
    pytest.importorskip("jax")  # the test extra installs it
    command = [sys.executable, RUNNER] + (["--block_tf"] if block_tf else []) + list(args)
    environ = with_quick_xla(dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
                                  **(env or {})))
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environ,
                          timeout=timeout)


def last_json(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint(model_dir, step):
    with np.load(os.path.join(model_dir, f"ckpt-{step}.npz")) as arrays:
        return dict(arrays)


def test_advprop_trains_and_evaluates_with_tensorflow_blocked(tmp_path):
    """The TF-free machine: the core imports, the embedded set is read without TF,
    an AdvProp step runs jitted, evaluation reports both BN sets, and the embedded
    set's derived export is skipped with a line saying how to export later."""
    done = run_jax("--recipe=advprop", *TINY, "--train_steps=3",
                   f"--model_dir={tmp_path / 'run'}", block_tf=True, cwd=tmp_path)
    results = last_json(done)
    assert "JAX engine" in done.stderr and "input numpy" in done.stderr
    assert results["engine"] == "jax" and results["step"] == 3
    for key in ("clean_accuracy", "pgd2_eps1_accuracy", "aux_bn_clean_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["num_eval_images"] == 250
    assert "not exporting" in done.stderr and "export_checkpoint" in done.stderr
    assert not (tmp_path / "run" / "export").exists()
    arrays = checkpoint(tmp_path / "run", 3)
    assert int(arrays["step"]) == 3
    assert any(k.startswith("ema/") for k in arrays)  # AdvProp keeps the EMA
    assert any(k.startswith("optimizer/") for k in arrays)


@pytest.mark.parametrize("flags, block_tf, names", [
    (["--precision=float16"], True, "--precision=float16"),
    (["--mode=eval_robustness"], True, "--mode=eval_robustness"),
    (["--auto_augment=v0"], True, "--auto_augment=v0"),
    (["--export_dir=exported"], True, "--export_dir=exported"),
    (["--recipe=nofrost_star", "--model_name=nf-resnet-26-cifar"], False,
     "--recipe=nofrost_star"),
])
def test_what_the_jax_engine_cannot_do_is_one_line(tmp_path, flags, block_tf, names):
    """float16 loss scaling, the robustness suite, (without TensorFlow) AutoAugment
    and a named export directory, and NoFrost*'s TDA view (tf.data ops that follow Keras' backend) are refused in
    one line naming the flag, before anything is written."""
    recipe = [] if any(f.startswith("--recipe") for f in flags) else [
        "--recipe=advprop", "--model_name=resnet-18-cifar"]
    done = run_jax(*recipe, "--width_multiplier=0.125", *flags, f"--model_dir={tmp_path / 'run'}",
                   block_tf=block_tf, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"main.py: error: {names}"), last
    assert "Traceback" not in done.stderr
    assert not glob.glob(str(tmp_path / "run" / "ckpt-*"))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Weights, optimizer slots, EMA, seed-generator states and the data position
    come back from the checkpoint: 2 + 2 steps give the 4-step run's state bitwise."""
    common = ["--recipe=advprop", *TINY, "--checkpoint_every_steps=2", "--mode=train"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    last_json(run_jax(*common, "--train_steps=4", f"--model_dir={straight}", block_tf=True,
                      cwd=tmp_path))
    last_json(run_jax(*common, "--train_steps=2", f"--model_dir={resumed}", block_tf=True,
                      cwd=tmp_path))
    done = run_jax(*common, "--train_steps=4", f"--model_dir={resumed}", block_tf=True,
                   cwd=tmp_path)
    last_json(done)
    assert "resumed from" in done.stderr and "at step 2" in done.stderr
    a, b = checkpoint(straight, 4), checkpoint(resumed, 4)
    assert set(a) == set(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]
    # and the run did move: step 2's weights differ from step 4's
    assert any(not np.array_equal(checkpoint(resumed, 2)[k], b[k]) for k in b
               if k.startswith("model/"))


@pytest.mark.slow  # two more runs (one compiling a two-step call): ~2 minutes here
def test_two_steps_per_call_compute_the_same_run(tmp_path):
    """Two steps per call compute the same steps as one per call, to float32 rounding
    (XLA fuses across the two steps of one call, so not bitwise)."""
    common = ["--recipe=advprop", *TINY, "--checkpoint_every_steps=2", "--mode=train"]
    single, paired = tmp_path / "single", tmp_path / "paired"
    last_json(run_jax(*common, "--train_steps=4", f"--model_dir={single}", block_tf=True,
                      cwd=tmp_path))
    last_json(run_jax(*common, "--train_steps=4", "--iterations_per_loop=2",
                      f"--model_dir={paired}", block_tf=True, cwd=tmp_path))
    a, c = checkpoint(single, 4), checkpoint(paired, 4)
    for key in a:
        np.testing.assert_allclose(c[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_a_non_finite_loss_stops_the_run_without_saving(tmp_path):
    done = run_jax("--recipe=vanilla", *TINY, "--train_steps=6", "--base_learning_rate=1e30",
                   "--lr_warmup_epochs=0", "--checkpoint_every_steps=100",
                   f"--model_dir={tmp_path / 'run'}", block_tf=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("main.py: training stopped: loss is")
    assert "stopped without saving" in message
    assert not glob.glob(str(tmp_path / "run" / "ckpt-*.npz"))


def test_scalars_are_tensorboard_events_and_export_loads_in_tensorflow(tmp_path):
    """With TensorFlow installed: the JAX run's event file is read by TensorFlow's
    own reader, and the exported SavedModel (auxiliary BNs stripped) gives the JAX
    checkpoint's EMA logits."""
    import tensorflow as tf

    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    results = last_json(run_jax("--recipe=advprop", *TINY, "--train_steps=3",
                                "--summary_every_steps=1", f"--model_dir={model_dir}",
                                f"--export_dir={export_dir}", cwd=tmp_path))
    assert results["step"] == 3
    events = glob.glob(str(model_dir / "train" / "events.out.tfevents.*"))
    assert len(events) == 1
    tags = {}
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [s for s, _ in tags["loss/clean"]] == [1, 2, 3]
    assert all(np.isfinite(v) for _, v in tags["learning_rate"])
    loaded = tf.saved_model.load(str(export_dir))
    metadata = json.loads(open(export_dir / "efficientnet_advprop.json").read()) if (
        export_dir / "efficientnet_advprop.json").exists() else None
    images = np.random.RandomState(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    logits = loaded.signatures["serving_default"](tf.constant(images))
    out = next(iter(logits.values())).numpy()
    assert out.shape[0] == 4 and np.all(np.isfinite(out))
    del metadata


@pytest.mark.slow  # 13 runs of about a minute each here
@pytest.mark.parametrize("recipe", sorted(r for r in RECIPES if not RECIPES[r].input_views))
def test_every_recipe_runs_through_main_on_jax(tmp_path, recipe):
    """`KERAS_BACKEND=jax python main.py --recipe=R --train_steps=3` with the recipe's
    defaults (its paper's model where it names one; the small ResNet otherwise keeps
    the run short), with TensorFlow's tf.data feeding it. NoFrost* (its TDA view) is
    refused on JAX: see test_what_the_jax_engine_cannot_do_is_one_line."""
    model = [] if RECIPES[recipe].paper.get("model_name") else ["--model=resnet-18-cifar"]
    done = run_jax(f"--recipe={recipe}", *model, "--train_steps=3", "--num_eval_images=250",
                   "--eval_attack_iterations=2", f"--model_dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    results = last_json(done)
    assert results["step"] == 3 and results["engine"] == "jax"
    assert 0.0 <= results["clean_accuracy"] <= 1.0
