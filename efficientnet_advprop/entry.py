"""One run as main.py makes it, for either engine: `resolve_run` and `run`.

    from efficientnet_advprop import entry

    config, info = entry.resolve_run({"recipe": "advprop", "train_steps": 20})
    results = entry.run(config, info)

`resolve_run` resolves the dataset and the config of a {setting: value} dict (main.py's
set flags), completed by the run already saved in its model_dir. `run` picks the
engine from Keras' backend (experiment.py on TensorFlow, jax_experiment.py on JAX) and
does what `config.run.mode` says: train and/or evaluate, the robustness suite
(robustness_experiment.py, TensorFlow only) or the export to `config.run.export_dir`.
It prints the results as one JSON line on stdout, then `summary_lines` on stderr, and
returns them. A bad setting raises config.ConfigError naming it (main.py turns it into
a one-line flag error), a bad dataset a ValueError.
"""

import json
import os
import shutil
import sys

from efficientnet_advprop.config import ConfigError


def _stderr(message):
    print(message, file=sys.stderr)


def on_jax():
    """KERAS_BACKEND=jax: the JAX engine (efficientnet_advprop/jax_experiment.py)."""
    import keras

    return keras.backend.backend() == "jax"


def engine():
    """The module that runs experiments on Keras' backend: experiment or
    jax_experiment (the same prepare/initialize/train/restore/evaluate/export)."""
    if on_jax():
        from efficientnet_advprop import jax_experiment

        return jax_experiment
    from efficientnet_advprop import experiment

    return experiment


def data_module():
    """The module that resolves datasets: the tf.data package, or on the JAX engine
    without TensorFlow the TF-free input path."""
    if on_jax():
        from efficientnet_advprop.jax_experiment import tensorflow_available

        if not tensorflow_available():
            from efficientnet_advprop.data import numpy_input

            return numpy_input
    from efficientnet_advprop import data

    return data


def resolve_dataset(settings, describe_only=False):
    """The data.DatasetInfo the settings' dataset/data_dir name. describe_only
    (--print_config): ImageNet without a data_dir is described by its standard sizes
    instead of being read. Raises ValueError naming what is wrong with the data."""
    data = data_module()
    if describe_only and settings.get("dataset") == "imagenet" and not settings.get(
            "data_dir"):
        from efficientnet_advprop.data import tfrecord

        return data.DatasetInfo("imagenet", tfrecord.IMAGENET_NUM_CLASSES,
                                tfrecord.IMAGENET_NUM_TRAIN, tfrecord.IMAGENET_NUM_EVAL,
                                224)
    return data.resolve_dataset(settings.get("dataset"), settings.get("data_dir"),
                                holdout_shards=settings.get("holdout_shards"),
                                skip_bad_records=settings.get("skip_bad_records", False))


def resolve_run(settings, info=None, describe_only=False):
    """(ExperimentConfig, DatasetInfo) of `settings` ({setting: value}, what the user
    set). A run already in the model_dir supplies its identity settings
    (config.RUN_IDENTITY): an eval or a resumed run needs them not repeated, a setting
    that contradicts one raises ConfigError, and each reused value's source names the
    directory."""
    from efficientnet_advprop.config import (ModelConfig, load_saved_config, resolve,
                                             reuse_saved)
    from efficientnet_advprop.recipes import RECIPES

    info = info or resolve_dataset(settings, describe_only)
    recipe_name = settings.get("recipe") or "vanilla"
    paper_model = getattr(RECIPES.get(recipe_name), "paper", {}).get("model_name")
    model_name = settings.get("model_name") or (paper_model.value if paper_model
                                                else ModelConfig.model_name)
    model_dir = settings.get("model_dir") or os.path.join(
        "runs", f"{model_name}-{recipe_name}")
    saved, reused = None, ()
    if "://" in str(model_dir) or os.path.isdir(model_dir):
        saved = load_saved_config(model_dir)
    if saved is not None:
        completed = reuse_saved(settings, saved)
        reused = [k for k in completed if k not in settings]
        settings = completed
    config = resolve(settings, info)
    for name in reused:
        config.sources[name] = f"saved run ({model_dir})"
    return config, info


def export_target(config, log=None):
    """Where this run exports, checked before any work (None: no export).

    A directory the user named must be empty or absent, and on the JAX engine
    TensorFlow must be importable (export is the TF engine's): both raise ConfigError
    before training. A derived one (a source starting "derived") is the run's own: it is
    replaced, and skipped with a line to `log` where TensorFlow is missing."""
    export_dir = config.run.export_dir
    if not export_dir:
        return None
    derived = config.sources.get("export_dir", "").startswith("derived")
    if on_jax():
        from efficientnet_advprop.jax_experiment import tensorflow_available

        if not tensorflow_available():
            if not derived:
                raise ConfigError("export_dir", export_dir, "export to SavedModel/TFLite "
                                  "needs TensorFlow, which is not installed here; drop "
                                  "the flag, and export model_dir later with "
                                  "efficientnet_advprop.export_checkpoint where it is")
            if log:
                log(f"not exporting to {export_dir}: TensorFlow is not installed here; "
                    f"export later with python -m efficientnet_advprop.export_checkpoint "
                    f"--model_dir={config.run.model_dir} where it is")
            return None
    if not os.path.isdir(export_dir) or not os.listdir(export_dir):
        return export_dir
    if derived:
        shutil.rmtree(export_dir)
        return export_dir
    raise ConfigError("export_dir", export_dir, "exists and is not empty; choose a new "
                                                "directory")


def embedded_note(config, info):
    """The first line of a run on the embedded set: its size and the preset's values."""
    preset = sorted(k for k, v in config.sources.items() if v.startswith("embedded"))
    values = config.to_dict()
    return (f"Using the embedded CIFAR-10 subset ({info.num_train} train / "
            f"{info.num_eval} held-out images); preset: "
            + ", ".join(f"{k}={values[k]}" for k in preset))


def run(config, info, suite_options=None, log=_stderr):
    """The run main.py makes of `config` on the dataset `info`; returns the results
    (for eval_robustness: the suite's result dict, with `suite_options`, a
    robustness_experiment.SuiteOptions; None: its defaults)."""
    exp = engine()
    mode = config.run.mode
    if mode == "eval_robustness" and on_jax():
        raise ConfigError("mode", mode, "runs on the TensorFlow engine (its attack suite "
                          "is TensorFlow's): run it with KERAS_BACKEND=tensorflow on this "
                          "model_dir, which reads the JAX engine's checkpoints")
    if info.name == "embedded":
        log(embedded_note(config, info))
    export_dir = export_target(config, log)
    if config.recipe.name == "fast_advprop" and config.recipe.values["budget_calibration"]:
        log(f"fast_advprop budget calibration: {config.sources['train_steps']}; "
            f"milestones {config.optim.lr_milestones}")
    if mode == "eval_robustness":
        from efficientnet_advprop import robustness_experiment

        return robustness_experiment.evaluate(config, info, suite_options, log)
    job = exp.prepare(config, info)
    if config.model.init_checkpoint:
        exp.initialize(job, config.model.init_checkpoint)
    if mode in ("train", "train_and_eval"):
        exp.train(job)
    else:
        exp.restore(job)
    results = {"model_name": config.model.model_name, "recipe": config.recipe.name,
               "dataset": info.name, "image_size": config.model.image_size,
               "step": job.step()}
    if mode in ("eval", "train_and_eval"):
        results = exp.evaluate(job)
    if job.trainer.images_per_second:
        results["train_images_per_second"] = round(job.trainer.images_per_second, 2)
    if job.skip_counter is not None:
        results["skipped_records"] = int(job.skip_counter.numpy())
        log(f"--skip_bad_records: dropped {results['skipped_records']} unreadable "
            f"training records (each time one was read)")
    if export_dir:
        bn_set = exp.export(job, export_dir, config.run.export_bn_set,
                            formats=config.run.export_format)
        log(f"exported {', '.join(config.run.export_format)} (BN set {bn_set} only) to "
            f"{export_dir}")
    print(json.dumps(results))
    sys.stdout.flush()
    for line in summary_lines(results, config, export_dir):
        log(line)
    return results


def summary_lines(results, config, export_dir=None):
    """The end of a run for a person: held-out clean and PGD accuracy through the main
    BNs and, when `results` has them, through the adversarial (auxiliary) BN set;
    where the checkpoints (config.run.model_dir) and the export (`export_dir`, None:
    none was made) went; the next commands to try."""
    lines = []
    attack = next((k[:-len("_accuracy")] for k in results
                   if k.startswith("pgd") and k.endswith("_accuracy")), None)
    if "clean_accuracy" in results:
        n = results.get("num_eval_images")
        lines.append(f"Held-out accuracy{f' ({n} images)' if n else ''}:")
        sets = [("main BNs", "")]
        if "aux_bn_clean_accuracy" in results:
            sets.append(("adversarial (auxiliary) BNs", "aux_bn_"))
        for name, prefix in sets:
            text = f"  {name + ':':29s} clean {results[prefix + 'clean_accuracy']:6.1%}"
            if attack and f"{prefix}{attack}_accuracy" in results:
                text += (f"   {attack.replace('_', ' ')} "
                         f"{results[f'{prefix}{attack}_accuracy']:6.1%}")
            lines.append(text)
    model_dir = config.run.model_dir
    lines.append(f"Checkpoints and TensorBoard logs: {model_dir}")
    formats = config.run.export_format
    if export_dir:
        lines.append(f"Exported {', '.join(formats)} ({config.run.export_bn_set} BN set, "
                     f"EMA weights, preprocessing inside): {export_dir}")
    lines.append(f"Next: python main.py --mode=eval_robustness --model_dir={model_dir} "
                 "--robustness_profile=quick   # attacks, corruptions (minutes)")
    if export_dir and "saved_model" in formats:
        lines.append(f"      tf.saved_model.load({str(export_dir)!r}).serving_default("
                     "images)['logits']   # images: float32 RGB in [0, 255]")
    elif export_dir:
        name = "model.tflite" if "tflite" in formats else "model_dynamic_range.tflite"
        lines.append(f"      tf.lite.Interpreter({os.path.join(str(export_dir), name)!r})"
                     "   # float32 RGB in [0, 255]")
    return lines


_BAD_DATA_MARKERS = ("image file format", "decode", "corrupted record", "truncated",
                     "Invalid JPEG", "Premature end")


def bad_input_data_reason(error):
    """The reason, when `error` is an input-pipeline failure caused by the data itself
    (an undecodable image, a corrupt record), else None (a program bug)."""
    if "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None:
        return None  # nothing of TensorFlow ran (the JAX engine without tf.data)
    import tensorflow as tf

    from efficientnet_advprop.training.trainer import op_error_reason

    message = getattr(error, "message", "") or str(error)
    if isinstance(error, tf.errors.DataLossError) or (
            isinstance(error, tf.errors.InvalidArgumentError)
            and any(marker in message for marker in _BAD_DATA_MARKERS)):
        return op_error_reason(error)
    return None
