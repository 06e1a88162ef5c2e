"""main.py end to end on the embedded data, and its one-line errors."""

import json
import os
import re

import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_main


def test_advprop_run_trains_evaluates_checkpoints_exports_and_resumes(tmp_path):
    model_dir, export_dir = tmp_path / "model", tmp_path / "export"
    # A narrow ResNet keeps the two runs short; the flags are the README command's.
    common = ["--advprop", "--model=resnet-18-cifar", "--width_multiplier=0.125",
              f"--model_dir={model_dir}",
              "--num_eval_images=100", "--eval_attack_iterations=2",
              "--checkpoint_every_steps=2", "--summary_every_steps=1"]
    first = run_main(*common, "--train_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "embedded CIFAR-10 subset" in first.stderr
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and result["num_eval_images"] == 100
    assert 0.0 <= result["clean_accuracy"] <= 1.0
    assert {"pgd2_eps1_accuracy", "aux_bn_clean_accuracy"} <= set(result)
    assert (model_dir / "checkpoint").exists()
    assert any(name.startswith("events") for name in os.listdir(model_dir / "train"))
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert saved["step"] == 2
    # After the JSON line, a summary for a person on stderr.
    err = first.stderr.splitlines()
    assert "Held-out accuracy (100 images):" in err
    assert any(l.startswith("  main BNs:") and "pgd2 eps1" in l for l in err)
    assert any(l.startswith("  adversarial (auxiliary) BNs:") for l in err)
    assert f"Checkpoints and TensorBoard logs: {model_dir}" in err
    assert (f"Next: python main.py --mode=eval_robustness --model_dir={model_dir} "
            "--robustness_profile=quick") in first.stderr

    second = run_main(*common, "--train_steps=3", f"--export_dir={export_dir}",
                      "--export_format=saved_model,tflite", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stderr  # resumed, not restarted
    assert json.loads(second.stdout.strip().splitlines()[-1])["step"] == 3
    assert (export_dir / "saved_model.pb").exists()
    meta = json.loads((export_dir / "efficientnet_advprop.json").read_text())
    assert meta["preprocessing"] == "advprop" and meta["step"] == 3
    assert (export_dir / "model.tflite").stat().st_size > 0
    assert (f"Exported saved_model, tflite (main BN set, EMA weights, preprocessing "
            f"inside): {export_dir}") in second.stderr
    assert f"tf.saved_model.load('{export_dir}')" in second.stderr
    tflite_meta = json.loads((export_dir / "model.tflite.json").read_text())
    assert tflite_meta["step"] == 3 and tflite_meta["quantization"] == "none (float32)"

    # Evaluation needs no training flags: the run's saved config supplies them.
    third = run_main("--mode=eval", f"--model_dir={model_dir}", "--num_eval_images=100",
                     "--eval_attack_iterations=0", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "could not be found in the restored object" not in third.stderr
    evaluated = json.loads(third.stdout.strip().splitlines()[-1])
    assert evaluated["step"] == 3 and evaluated["recipe"] == "advprop"
    assert "aux_bn_clean_accuracy" in evaluated
    wrong = run_main("--mode=eval", f"--model_dir={model_dir}", "--model=resnet-26-cifar",
                     cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        "main.py: error: --model_name=resnet-26-cifar: contradicts the run in --model_dir, "
        "which was trained with --model_name=resnet-18-cifar")


def test_a_diverging_run_stops_in_one_line_with_exit_status_1(tmp_path):
    result = run_main("--model=resnet-18-cifar", "--width_multiplier=0.125",
                      "--train_steps=6", "--mode=train", "--base_learning_rate=1e30",
                      f"--model_dir={tmp_path / 'm'}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"main.py: training stopped: loss is (nan|inf) at step \d+; stopped "
                    r"without saving", last), last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--epsilon=-1"], "--epsilon=-1.0: must be > 0"),
    (["--model=efficientnet-b99"], "--model_name=efficientnet-b99: unknown model"),
    (["--mode=fly"], "flag --mode=fly"),
    (["--train_batch_size=0"], "--train_batch_size=0: must be > 0"),
    (["--data_dir=/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--recipe=fast_advprop", "--p_adv=1.5"], "--p_adv=1.5: must be in (0, 1)"),
    (["--recipe=fast_advprop", "--p_adv=0.1", "--train_batch_size=4"],
     "leaves 0 adversarial"),
    (["--recipe=advprop", "--normalizer=group_norm"], "routes auxiliary batch norms"),
    (["--recipe=mbn_at", "--clean_fraction=0", "--alp_weight=0.5"], "needs clean images"),
    (["--lr_schedule=step"], "needs --lr_milestones"),
    (["--holdout_shards=5"], "--holdout_shards=5: must be less than the 2 train-*"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, message):
    result = run_main(*args, f"--model_dir={tmp_path / 'm'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("main.py: error:"), result.stderr[-2000:]
    assert message in lines[-1]
    assert "Traceback" not in result.stderr


def test_existing_export_dir_is_refused_before_training(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "model.txt").write_text("keep me")
    result = run_main("--advprop", f"--export_dir={export_dir}",
                      f"--model_dir={tmp_path / 'm'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "exists and is not empty" in result.stderr.strip().splitlines()[-1]
    assert (export_dir / "model.txt").read_text() == "keep me"
    assert not (tmp_path / "m" / "checkpoint").exists()


@pytest.mark.slow  # ~30 s; the recipe itself is tested in test_recipes.py
def test_fast_advprop_run_calibrates_the_budget_and_reports_both_bn_sets(tmp_path):
    # 12 adversarial images of 60 in three ghost-BN groups of 4 (the shuffle needs
    # three): below the default minimum of 16, so the test asks for it explicitly.
    result = run_main("--recipe=fast_advprop", "--model=resnet-18-cifar",
                      "--train_epochs=0.024", "--train_batch_size=60", "--min_bn_batch=4",
                      "--shuffle_bn_group_size=4",
                      f"--model_dir={tmp_path / 'm'}", "--num_eval_images=40",
                      "--eval_attack_iterations=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "budget calibration: derived: 0.024 epochs / 1.20" in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # 0.024 epochs of 250 steps = 6 -> / 1.2 = 5 steps (vanilla would take 6)
    assert out["step"] == 5
    assert {"clean_accuracy", "aux_bn_clean_accuracy", "aux_bn_pgd1_eps1_accuracy"} <= set(out)


@pytest.mark.parametrize("kind", ["jpeg", "tfrecord"])
def test_corrupt_input_data_is_one_line_and_exit_status_2(tmp_path, kind):
    data_dir = tmp_path / "data"
    if kind == "jpeg":  # one class of undecodable files next to a good one
        for label in ("cat", "dog"):
            (data_dir / "train" / label).mkdir(parents=True)
        for i in range(8):
            (data_dir / "train" / "cat" / f"{i}.jpg").write_bytes(b"not a jpeg")
            (data_dir / "train" / "dog" / f"{i}.jpg").write_bytes(
                tf.io.encode_jpeg(tf.zeros([32, 32, 3], tf.uint8)).numpy())
    else:  # a TFRecord shard whose bytes are garbage
        data_dir.mkdir()
        (data_dir / "train-00000-of-00001").write_bytes(b"\x00garbage" * 100)
        (data_dir / "validation-00000-of-00001").write_bytes(b"\x00garbage" * 100)
    result = run_main("--data_dir=" + str(data_dir), "--model=resnet-18-cifar",
                      "--width_multiplier=0.125", "--train_steps=2", "--train_batch_size=4",
                      "--min_bn_batch=4",
                      "--image_size=32", "--num_label_classes=2",
                      f"--model_dir={tmp_path / 'm'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("main.py: error:"), result.stderr[-2000:]
    assert str(data_dir) in lines[-1]  # names the data (the directory or the bad file)
    assert "Traceback" not in result.stderr


@pytest.fixture
def main_in_process(monkeypatch, capsys):
    """Runs main.py's main() in this process: -> (exit status, stdout, stderr lines).

    Much cheaper than a subprocess for answers that come before training starts; the
    flags are reset to their defaults before and after each call.
    """
    monkeypatch.syspath_prepend(REPO_ROOT)
    import main as main_module

    def call(*args):
        main_module.FLAGS.unparse_flags()
        capsys.readouterr()
        try:
            main_module.parse_flags(["main.py", *args])
            main_module.main(["main.py"])
            status = 0
        except SystemExit as e:
            status = e.code
        finally:
            main_module.FLAGS.unparse_flags()
        out, err = capsys.readouterr()
        return status, out, [l for l in err.strip().splitlines() if l.strip()]

    return call


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _no_tfrecords(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "README.txt").write_text("no train-* files here")
    return tmp_path / "shards"


@pytest.mark.parametrize("make_args, message", [
    (lambda p: [f"--data_dir={_empty_dir(p)}"], "no train-* TFRecord files or train/"),
    (lambda p: ["--dataset=imagenet", f"--data_dir={_no_tfrecords(p)}"],
     "no train-* or validation-* TFRecord files found"),
    (lambda p: ["--recipe=advprop_plus"], "flag --recipe=advprop_plus"),
    (lambda p: ["--model=resnet-19"], "--model_name=resnet-19: unknown model"),
    (lambda p: ["--recipe=fast_advprop", "--p_adv=0"], "--p_adv=0.0: must be in (0, 1)"),
    (lambda p: ["--epsilon=-8"], "--epsilon=-8.0: must be > 0"),
    (lambda p: ["--iterations_per_loop=0"], "--iterations_per_loop=0: must be >= 1"),
    (lambda p: ["--precision=half"], "flag --precision=half"),
    (lambda p: ["--sync_batch_norm_group_size=0"], "must be >= 1"),
    (lambda p: ["--nosync_batch_norm", "--sync_batch_norm_group_size=2"],
     "--sync_batch_norm_group_size=2: needs --sync_batch_norm"),
    (lambda p: ["--num_label_classes=-3"], "--num_label_classes=-3: must be >= 2"),
    (lambda p: ["--num_label_classes=0"], "--num_label_classes=0: must be >= 2"),
    (lambda p: ["--recipe=fast_advprop", "--train_batch_size=64"],
     "--train_batch_size=64: the 13 adversarial images per replica are not a multiple "
     "of the shuffle-BN group size 16; use --train_batch_size=240"),
    (lambda p: ["--recipe=trades", "--p_adv=0.3"], "--p_adv=0.3: is not an option of "
                                                  "recipe trades"),
    (lambda p: ["--export_format=saved_model,onnx"], "--export_format=saved_model,onnx: "
                                                     "choose one or more of saved_model, "
                                                     "tflite, tflite_dynamic"),
    (lambda p: ["--mode=eval_robustness", "--robustness_attacks=pgd,fab"],
     "--robustness_attacks=pgd,fab: unknown value(s) fab; choose from pgd,"),
    (lambda p: ["--mode=eval_robustness", "--mbn_modes=main,mixed"],
     "--mbn_modes=main,mixed: unknown value(s) mixed"),
    (lambda p: ["--mode=eval_robustness", "--curve_iterations=10,x"],
     "--curve_iterations=10,x: not a list of int values"),
])
def test_bad_input_in_process_is_one_line_and_exit_status_2(tmp_path, main_in_process,
                                                            make_args, message):
    status, out, err = main_in_process(*make_args(tmp_path),
                                       f"--model_dir={tmp_path / 'm'}")
    assert status == 2, err[-5:]
    assert err[-1].startswith("main.py: error:") and message in err[-1], err[-5:]
    assert not out and not (tmp_path / "m").exists()  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--train_batch_size=33"], "--train_batch_size=33: is not divisible by the 2 replicas"),
    (["--train_batch_size=64", "--sync_batch_norm_group_size=3"],
     "--sync_batch_norm_group_size=3: does not divide the 2 replicas"),
    (["--recipe=advprop", "--train_batch_size=16"],
     "--train_batch_size=16: gives BN batches of 8 images (replica batch) per replica, below "
     "--min_bn_batch=16; use --train_batch_size=32"),
])
def test_replica_count_mismatches_are_one_line_and_exit_status_2(
        tmp_path, main_in_process, monkeypatch, two_device_strategy, args, message):
    import efficientnet_advprop.training as training

    monkeypatch.setattr(training, "make_strategy", lambda *a, **k: two_device_strategy)
    status, _, err = main_in_process(*args, f"--model_dir={tmp_path / 'm'}")
    assert status == 2 and err[-1].startswith("main.py: error:") and message in err[-1]


def test_skip_bad_records_trains_past_corrupt_jpegs_and_counts_them(tmp_path,
                                                                    main_in_process):
    data_dir = tmp_path / "data"
    for label in ("cat", "dog"):
        (data_dir / "train" / label).mkdir(parents=True)
        for i in range(8):
            (data_dir / "train" / label / f"{i}.jpg").write_bytes(
                tf.io.encode_jpeg(tf.fill([32, 32, 3], tf.constant(40 * i, tf.uint8)))
                .numpy())
    for i in range(4):
        (data_dir / "train" / "cat" / f"zz_bad_{i}.jpg").write_bytes(b"not a jpeg")
    common = [f"--data_dir={data_dir}", "--model=resnet-18-cifar",
              "--width_multiplier=0.125", "--train_steps=3", "--train_batch_size=4",
              "--min_bn_batch=4",
              "--image_size=32", "--mode=train", f"--model_dir={tmp_path / 'm'}"]
    status, _, err = main_in_process(*common)
    assert status == 2 and str(data_dir) in err[-1]  # without the option: stops
    status, out, err = main_in_process(*common, "--skip_bad_records")
    assert status == 0, err[-5:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 3 and result["skipped_records"] >= 1
    assert any(l.startswith("--skip_bad_records: dropped "
                            f"{result['skipped_records']} unreadable") for l in err)


def test_sync_batch_norm_defaults_follow_the_official_tpu_groups():
    from efficientnet_advprop.config import ModelConfig
    from efficientnet_advprop.experiment import sync_batch_norm_settings

    def settings(options, use_tpu, replicas):
        return sync_batch_norm_settings(ModelConfig(**options), use_tpu, replicas)

    assert settings({}, use_tpu=True, replicas=8) == (True, 1)  # a v3-8: no sync
    assert settings({}, use_tpu=True, replicas=32) == (True, 8)
    assert settings({}, use_tpu=True, replicas=256) == (True, 32)
    assert settings({}, use_tpu=False, replicas=8) == (False, None)  # GPUs: per replica
    assert settings({"sync_batch_norm": True}, use_tpu=False, replicas=8) == (True, None)
    assert settings({"sync_batch_norm_group_size": 4}, use_tpu=False, replicas=8) == (
        True, 4)
    assert settings({"sync_batch_norm": False}, use_tpu=True, replicas=32) == (False, None)


def test_a_second_run_on_a_locked_model_dir_is_refused_in_one_line(tmp_path,
                                                                    main_in_process):
    from efficientnet_advprop.training import RunLock

    model_dir = tmp_path / "m"
    with RunLock(model_dir):  # a live run (this process) holds the directory
        status, out, err = main_in_process(
            "--model=resnet-18-cifar", "--width_multiplier=0.125", "--train_steps=1",
            "--mode=train", f"--model_dir={model_dir}")
    assert status == 2, err[-5:]
    assert err[-1].startswith("main.py: error:") and str(model_dir) in err[-1]
    assert f"pid {os.getpid()}" in err[-1] or str(os.getpid()) in err[-1]
    assert not (model_dir / "checkpoint").exists()  # nothing trained or written


def test_summary_lines_name_both_bn_sets_the_directories_and_the_next_commands(tmp_path):
    from efficientnet_advprop.config import resolve
    from efficientnet_advprop.data import DatasetInfo
    from efficientnet_advprop.entry import summary_lines

    info = DatasetInfo("embedded", 10, 15000, 2000, 32)
    model_dir, export_dir = str(tmp_path / "m"), str(tmp_path / "e")
    config = resolve({"recipe": "advprop", "model_dir": model_dir,
                      "export_dir": export_dir}, info)
    results = {"step": 9, "num_eval_images": 2000, "clean_accuracy": 0.5,
               "pgd10_eps1_accuracy": 0.25, "aux_bn_clean_accuracy": 0.375,
               "aux_bn_pgd10_eps1_accuracy": 0.3125}
    lines = summary_lines(results, config, export_dir)
    assert lines[0] == "Held-out accuracy (2000 images):"
    assert re.fullmatch(r"  main BNs: +clean +50\.0% +pgd10 eps1 +25\.0%", lines[1])
    assert re.fullmatch(r"  adversarial \(auxiliary\) BNs: +clean +37\.5% +pgd10 eps1 "
                        r"+31\.2%", lines[2])
    assert f"Checkpoints and TensorBoard logs: {model_dir}" in lines
    assert any(l.startswith("Exported saved_model (main BN set") and
               l.endswith(export_dir) for l in lines)
    assert any(f"--mode=eval_robustness --model_dir={model_dir}" in l for l in lines)
    assert any(f"tf.saved_model.load({export_dir!r})" in l for l in lines)

    # A vanilla run without an attack or an export: one BN set, no export lines.
    config = resolve({"model_dir": model_dir}, info)
    lines = summary_lines({"clean_accuracy": 0.5, "num_eval_images": 100}, config)
    assert re.fullmatch(r"  main BNs: +clean +50\.0%", lines[1])
    assert not any("BNs" in l for l in lines[2:])
    assert not any("xported" in l or "saved_model" in l for l in lines)
    # A TFLite-only export names the file to load.
    config = resolve({"model_dir": model_dir, "export_dir": export_dir,
                      "export_format": ("tflite_dynamic",)}, info)
    lines = summary_lines({}, config, export_dir)
    assert lines[0] == f"Checkpoints and TensorBoard logs: {model_dir}"
    assert any("model_dynamic_range.tflite" in l for l in lines)
