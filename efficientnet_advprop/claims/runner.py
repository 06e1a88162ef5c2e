"""Trains and evaluates one run of the claims suite and writes its result file.

`run_one` is resumable: the training resumes from the run's model_dir (its checkpoints
and the held-out curve so far, `claims_curve.json`), and a finished run is recognised
by its result file, `results/claims/<tier>/<run>/seed<k>.json`, which holds the
command, git revision, data split, seed, wall time, machine and every number measured.
"""

import json
import os
import time

import numpy as np
import tensorflow as tf

from efficientnet_advprop import config as config_lib
from efficientnet_advprop import experiment
from efficientnet_advprop.attacks import attack as run_attack
from efficientnet_advprop.claims import suite
from efficientnet_advprop.claims.runner_common import (  # noqa: F401 -- re-exported
    CURVE_FILE, add_curve_point, finish_run, git_revision, host, pending, read_curve,
    result_path, write_record)
from efficientnet_advprop.data.cifar_tar import SPLIT_FILE
from efficientnet_advprop.data.corruptions import corrupt
from efficientnet_advprop.evaluation import eval_attack_config
from efficientnet_advprop.evaluation import evaluate as evaluate_model
from efficientnet_advprop.layers.bn_statistics import bn_statistics, summarize_bn_statistics
from efficientnet_advprop.evaluation.mbn import mbn_logits_fn
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route

def machine():
    """What the run ran on."""
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append(details.get("device_name", device.name))
    return dict(host(), gpus=gpus, tensorflow=tf.__version__)


def held_out_arrays(run, count):
    """The first `count` held-out images (eval preprocessing) as numpy arrays."""
    images, labels = [], []
    have = 0
    for x, y in experiment.eval_dataset(run.config, run.info):
        images.append(x.numpy())
        labels.append(y.numpy())
        have += len(labels[-1])
        if have >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def fit_gains_on_training_batch(overrides, seed, count=256):
    """`signal.fit_stage_gains` of the run's NF-ResNet on the first `count` images of
    the *training* split (decoded, no augmentation), initialised with the run's seed."""
    from efficientnet_advprop.data import tfrecord
    from efficientnet_advprop.models.signal import fit_stage_gains

    files = tfrecord.list_files(overrides["data_dir"], "train")
    if not files:
        raise ValueError(f"no train-* files in {overrides['data_dir']}")
    images = [tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
              for encoded, _ in tf.data.TFRecordDataset(
                  files[:1], compression_type=tfrecord.detect_compression(files[0])).map(
                  tfrecord.parse_example).take(count)]
    return fit_stage_gains(overrides["model_name"], np.stack(images).astype(np.float32),
                           seed=seed, width_multiplier=overrides["width_multiplier"])


def _batches(images, labels, batch):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def accuracy(model, images, labels, *, batch, attack=None, bn_set=MAIN, seed=0):
    return evaluate_model(model, _batches(images, labels, batch), attack=attack,
                          bn_set=bn_set, seed=seed)


def corruption_errors(model, images, labels, names, severities, *, batch, seed):
    """{name: {severity: top-1 error}} of the main BNs on generated corruptions."""
    @tf.function
    def predict(x):
        with bn_route(MAIN):
            return tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32)

    errors = {}
    for k, name in enumerate(names):
        errors[name] = {}
        for severity in severities:
            wrong = 0
            for start in range(0, len(labels), batch):
                x = tf.constant(images[start:start + batch], tf.float32)
                x = corrupt(x, name, severity, seed=tf.constant([seed, 1000 * k + start],
                                                                tf.int64))
                wrong += int(np.sum(predict(x).numpy() != labels[start:start + batch]))
            errors[name][str(severity)] = wrong / len(labels)
    return errors


def mbn_sweep(model, images, labels, gammas, attack_config, *, batch, seed):
    """Clean and PGD accuracy of the logit interpolation (1 - g) z_main + g z_aux."""
    gamma = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    logits_fn = mbn_logits_fn(model, "logits", gamma)
    num_classes = model.output_shape[-1]

    @tf.function
    def correct(x, y, step_seed):
        clean = tf.argmax(logits_fn(x), -1, output_type=tf.int32)
        adv = run_attack(logits_fn, x, y, attack_config, num_classes=num_classes,
                         seed=step_seed)
        robust = tf.argmax(logits_fn(adv), -1, output_type=tf.int32)
        y = tf.cast(y, tf.int32)
        return (tf.reduce_sum(tf.cast(clean == y, tf.float32)),
                tf.reduce_sum(tf.cast(robust == y, tf.float32)))

    rows = []
    for g in gammas:
        gamma.assign(float(g))
        clean = robust = 0.0
        for index, start in enumerate(range(0, len(labels), batch)):
            c, r = correct(tf.constant(images[start:start + batch], tf.float32),
                           tf.constant(labels[start:start + batch]),
                           tf.constant([seed, index], tf.int64))
            clean, robust = clean + float(c), robust + float(r)
        rows.append({"gamma": float(g), "clean_accuracy": clean / len(labels),
                     "pgd_accuracy": robust / len(labels)})
    return rows


def run_one(tier, spec, seed, *, data_dir, work_dir, results_dir, command, log=print):
    """Trains (or resumes) and evaluates one run; writes and returns its result dict."""
    model_dir = os.path.join(work_dir, tier.name, f"{spec.name}-seed{seed}")
    overrides = suite.tier_overrides(tier, spec, seed, data_dir, model_dir)
    if overrides.get("nf_stage_gains") == suite.FIT_ON_TRAINING_BATCH:
        overrides["nf_stage_gains"] = fit_gains_on_training_batch(overrides, seed)
        log(f"{spec.name} seed {seed}: stage gains {overrides['nf_stage_gains']}")
    cfg = config_lib.resolve(overrides)
    start_wall = time.time()
    info_machine = machine()
    revision = git_revision()  # of the code this process imported (read at its start)
    run = experiment.prepare(cfg, log=log)
    batch = cfg.data.eval_batch_size
    need = max(tier.curve_images, tier.eval_images, tier.attack_images,
               tier.corruption_images, tier.mbn_images)
    images, labels = held_out_arrays(run, need)

    curve = read_curve(model_dir)
    steps_per_epoch = cfg.optim.steps_per_epoch

    def on_checkpoint(trainer):
        step = int(trainer.step.numpy())
        acc = accuracy(trainer.model, images[:tier.curve_images],
                       labels[:tier.curve_images], batch=batch)["clean_accuracy"]
        add_curve_point(model_dir, curve, step, steps_per_epoch, acc)
        log(f"{spec.name} seed {seed}: step {step} held-out clean {acc:.4f}")

    start_train = time.time()
    experiment.train(run, on_checkpoint=on_checkpoint)
    train_seconds = time.time() - start_train
    model = run.trainer.model
    results = {"step": int(run.trainer.step.numpy()), "curve": curve}
    ev = images[:tier.eval_images], labels[:tier.eval_images]
    at = images[:tier.attack_images], labels[:tier.attack_images]
    aux_set = run.recipe.attack_bn_set
    attack = eval_attack_config(spec.eval_epsilon, tier.eval_iterations)
    results["clean_accuracy"] = accuracy(model, *ev, batch=batch)["clean_accuracy"]
    if "aux" in spec.evals:
        results["aux_clean_accuracy"] = accuracy(model, *ev, batch=batch,
                                                 bn_set=aux_set)["clean_accuracy"]
    if "pgd" in spec.evals:
        results["pgd_accuracy"] = accuracy(model, *at, batch=batch, attack=attack,
                                           seed=seed)["adversarial_accuracy"]
        if "aux" in spec.evals:
            results["aux_pgd_accuracy"] = accuracy(
                model, *at, batch=batch, attack=attack, bn_set=aux_set,
                seed=seed)["adversarial_accuracy"]
    if "corruptions" in spec.evals:
        errors = corruption_errors(model, images[:tier.corruption_images],
                                   labels[:tier.corruption_images], tier.corruptions,
                                   tier.severities, batch=batch, seed=seed)
        results["corruption_errors"] = errors
        results["mean_corruption_error"] = float(np.mean(
            [e for per in errors.values() for e in per.values()]))
    if "bn_stats" in spec.evals:
        records = bn_statistics(model, MAIN, aux_set)
        results["bn_statistics"] = records
        results["bn_statistics_summary"] = summarize_bn_statistics(records)
    if "mbn" in spec.evals:
        results["mbn_sweep"] = mbn_sweep(model, images[:tier.mbn_images],
                                         labels[:tier.mbn_images], tier.mbn_gammas,
                                         attack, batch=batch, seed=seed)
    return finish_run(tier, spec, seed, engine="tensorflow", run=run, cfg=cfg,
                      overrides=overrides, data_dir=data_dir,
                      split=read_split(data_dir),
                      machine=info_machine, command=command, revision=revision,
                      train_seconds=train_seconds, start_wall=start_wall, results=results,
                      results_dir=results_dir)


def read_split(data_dir):
    """The split.json of a data directory (None for the embedded data)."""
    if not data_dir or not os.path.exists(os.path.join(data_dir, SPLIT_FILE)):
        return None
    with open(os.path.join(data_dir, SPLIT_FILE)) as f:
        return json.load(f)
