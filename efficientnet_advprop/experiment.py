"""Library entry points: train, evaluate, export and measure robustness of one
resolved experiment (config.ExperimentConfig), without flags.

    from efficientnet_advprop import config, experiment
    cfg = config.resolve({"recipe": "advprop", "model_name": "resnet-18-cifar",
                          "width_multiplier": 0.125, "train_steps": 20})
    results = experiment.train_and_evaluate(cfg)

`prepare` builds the pieces once (strategy, model, recipe, trainer, datasets); the
other functions are short uses of them. Progress lines go to `log` (stderr by
default). Problems with the settings raise config.ConfigError naming the setting.
"""

import contextlib
import dataclasses
import json
import os
import sys

import tensorflow as tf

from efficientnet_advprop import data, training
from efficientnet_advprop.config import ConfigError, check_bn_batches
from efficientnet_advprop.layers.split_batch_norm import MAIN, official_sync_group_size
from efficientnet_advprop.models import build_model
from efficientnet_advprop.experiment_settings import make_train_config, model_kwargs
from efficientnet_advprop.training import Trainer, set_global_seed

# XLA on a CPU, measured with scripts/benchmark.py --image_sizes=32 --batch_size=32
# (efficientnet-b0, 2 cores, img/s without / with XLA): vanilla 98 / 34, AdvProp PGD-1
# 56 / 14, PGD-5 34 / 9 -- about 3-4x slower, so it stays off there.
JIT_ON_CPU = False


def _stderr(message):
    print(message, file=sys.stderr)


@dataclasses.dataclass
class Run:
    """What `prepare` builds for one experiment."""

    config: object
    info: object
    strategy: object
    recipe: object
    trainer: Trainer
    jit_compile: bool
    sync_batch_norm: tuple
    skip_counter: object = None

    def train_dataset(self, ctx, start_step):
        cfg = self.config
        return data.make_dataset(
            self.info, cfg.data.data_dir, "train",
            batch_size=ctx.get_per_replica_batch_size(cfg.data.train_batch_size),
            image_size=cfg.model.image_size, is_training=True, seed=cfg.run.seed,
            start_step=start_step, input_context=ctx, skip_counter=self.skip_counter,
            options=data.InputOptions.from_data_config(cfg.data, self.recipe))

    def eval_dataset(self):
        return eval_dataset(self.config, self.info)

    def step(self):
        """The trainer's step (what the newest checkpoint holds after train)."""
        return int(self.trainer.step.numpy())

    def averaged(self):
        """Context in which the model holds its EMA weights (if the run keeps any)."""
        return self.trainer.ema.swapped() if self.trainer.ema else contextlib.nullcontext()


def eval_dataset(config, info, image_size=None, augmentation=None):
    """The held-out set with eval preprocessing, config.num_eval images at most."""
    batch = config.data.eval_batch_size
    ds = data.make_dataset(info, config.data.data_dir, "eval", batch_size=batch,
                           image_size=image_size or config.model.image_size,
                           is_training=False, seed=config.run.seed,
                           options=data.InputOptions(
                               augmentation=augmentation or config.data.augmentation))
    if config.num_eval < info.num_eval:
        ds = ds.unbatch().take(config.num_eval).batch(batch)
    return ds


def default_jit_compile(on_tpu):
    """jit_compile when unset: on for TPU (XLA is what it runs) and GPU, and on a CPU
    only where it measured faster (JIT_ON_CPU)."""
    return bool(on_tpu or tf.config.list_logical_devices("GPU") or JIT_ON_CPU)


def sync_batch_norm_settings(model_cfg, on_tpu, replicas):
    """-> (synchronized, replicas per group or None for all) of the BN layers: on TPU
    the official TpuBatchNormalization groups, elsewhere per replica unless set."""
    group = model_cfg.sync_batch_norm_group_size
    sync = model_cfg.sync_batch_norm
    if sync is None:
        sync = on_tpu or group is not None
    if not sync or model_cfg.normalizer != "split_batch_norm":
        return False, None
    if group is None and on_tpu:
        group = official_sync_group_size(replicas)
    if group is not None and replicas > 1 and replicas % group:
        raise ConfigError("sync_batch_norm_group_size", group,
                          f"does not divide the {replicas} replicas")
    return True, group


def prepare(config, info=None, log=_stderr):
    """Strategy, recipe, model and trainer of `config` (nothing trained yet)."""
    info = info or data.resolve_dataset(config.data.dataset, config.data.data_dir,
                                        holdout_shards=config.data.holdout_shards,
                                        skip_bad_records=config.data.skip_bad_records)
    run_cfg, optim = config.run, config.optim
    strategy = training.make_strategy("tpu" if run_cfg.on_tpu else run_cfg.strategy,
                             tpu=run_cfg.tpu, tpu_zone=run_cfg.tpu_zone,
                             gcp_project=run_cfg.gcp_project)
    replicas = strategy.num_replicas_in_sync
    sync = sync_batch_norm_settings(config.model, run_cfg.on_tpu, replicas)
    check_bn_batches(config, num_replicas=replicas)
    jit = (run_cfg.jit_compile if run_cfg.jit_compile is not None
           else default_jit_compile(run_cfg.on_tpu))
    set_global_seed(run_cfg.seed)
    recipe = config.make_recipe()
    kwargs = model_kwargs(config, recipe, sync)
    name, num_classes = config.model.model_name, config.num_classes

    def model_fn():
        return build_model(name, num_classes, **kwargs)

    batch = config.data.train_batch_size
    train_config = make_train_config(config, recipe, jit)
    tf.io.gfile.makedirs(run_cfg.model_dir)
    trainer = Trainer(strategy, model_fn, recipe, train_config)
    log(f"{name} {recipe.describe()} | {info.name} {config.model.image_size}px | batch "
        f"{batch} x {optim.train_steps} steps ({optim.train_steps / optim.steps_per_epoch:.2f}"
        f" epochs) | {replicas} replica(s) {type(strategy).__name__} | jit {jit} | "
        f"{run_cfg.precision} | {run_cfg.iterations_per_loop} step(s)/call | BN sync "
        f"{(sync[1] or replicas) if sync[0] else 1} replica(s) | model_dir "
        f"{run_cfg.model_dir}")
    skip = data.make_skip_counter() if config.data.skip_bad_records else None
    return Run(config=config, info=info, strategy=strategy, recipe=recipe, trainer=trainer,
               jit_compile=jit, sync_batch_norm=sync, skip_counter=skip)


def initialize(run, checkpoint, log=_stderr):
    """Starts a new run from a .keras file or an official TF1 checkpoint (nothing
    happens when the model_dir already has a checkpoint)."""
    from efficientnet_advprop.models.init_checkpoint import init_from_checkpoint

    try:
        report = run.trainer.initialize_from(lambda model: init_from_checkpoint(
            model, checkpoint, aux_from_main=run.recipe.num_aux > 0))
    except (ValueError, OSError) as e:
        raise ConfigError("init_checkpoint", checkpoint, str(e)) from None
    if report is not None:
        skipped = ", ".join(f"{k} ({v})" for k, v in report["skipped"].items())
        log(f"initialised {len(report['loaded'])} layers from {checkpoint} "
            f"({report['source']}); skipped: {skipped or 'none'}")


def is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0


def train(run, on_checkpoint=None):
    """Trains to config.optim.train_steps (resuming from model_dir's checkpoint), holding
    model_dir's run lock (a second run on the same directory raises RunLockedError).
    `on_checkpoint(trainer)` runs after each checkpoint (every epoch unless
    config.run.checkpoint_every_steps says otherwise)."""
    samples = next(iter(run.eval_dataset().unbatch().batch(4).take(1)))
    lock = (training.RunLock(run.config.run.model_dir) if is_chief(run.strategy)
            else contextlib.nullcontext())  # the other workers of the run hold none
    with lock:
        run.config.save(run.config.run.model_dir)
        return run.trainer.train(run.train_dataset,
                                 sample_images=(samples[0].numpy(), samples[1].numpy()),
                                 on_checkpoint=on_checkpoint)


def restore(run, log=_stderr):
    """Loads the newest checkpoint of model_dir -- the TF engine's, or else the JAX
    engine's (ckpt-<step>.npz: its EMA weights, where it kept them, go into the model
    and the EMA shadows, so evaluation sees the same averages); ConfigError when there
    is none."""
    if run.trainer.restore() > 0:
        return
    from efficientnet_advprop.training.loop import load_jax_checkpoint, newest_jax_checkpoint

    path = newest_jax_checkpoint(run.config.run.model_dir)
    if path is None:
        raise ConfigError("model_dir", run.config.run.model_dir, "no checkpoint to evaluate")
    step, ema = load_jax_checkpoint(run.trainer.model, path)
    if run.trainer.ema is not None:
        run.trainer.ema.reset()
    run.trainer.step.assign(step)
    log(f"restored the JAX engine's {os.path.basename(path)} (step {step}"
        f"{', EMA weights' if ema else ''})")


def evaluate(run, log=_stderr):
    """Held-out clean (and PGD) accuracy through the main BN set and, for recipes
    with an adversarial set, through that set alone; writes eval_results.json."""
    from efficientnet_advprop.evaluation import eval_attack_config
    from efficientnet_advprop.evaluation import evaluate as evaluate_model

    cfg = run.config
    results = {"model_name": cfg.model.model_name, "recipe": cfg.recipe.name,
               "dataset": run.info.name, "image_size": cfg.model.image_size,
               "step": int(run.trainer.step.numpy())}
    eps = cfg.attack.eval_epsilon or cfg.attack.epsilon
    iterations = cfg.attack.eval_attack_iterations
    attack = eval_attack_config(eps, iterations) if iterations else None
    with run.averaged():
        main = evaluate_model(run.trainer.model, run.eval_dataset(), strategy=run.strategy,
                              attack=attack, bn_set=MAIN, seed=cfg.run.seed)
        results.update(num_eval_images=main["num_examples"],
                       clean_accuracy=main["clean_accuracy"])
        if attack is not None:
            results[f"pgd{attack.iterations}_eps{eps:g}_accuracy"] = (
                main["adversarial_accuracy"])
        adv_set = run.recipe.attack_bn_set
        if run.recipe.num_aux and adv_set != MAIN:  # the adversarial BN set, alone
            aux = evaluate_model(run.trainer.model, run.eval_dataset(),
                                 strategy=run.strategy, attack=attack, bn_set=adv_set,
                                 seed=cfg.run.seed)
            results["aux_bn_clean_accuracy"] = aux["clean_accuracy"]
            if attack is not None:
                results[f"aux_bn_pgd{attack.iterations}_eps{eps:g}_accuracy"] = (
                    aux["adversarial_accuracy"])
    model_dir = cfg.run.model_dir
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
    with writer.as_default(step=results["step"]):
        for k, v in results.items():
            if k.endswith("accuracy"):
                tf.summary.scalar(k, v)
    with tf.io.gfile.GFile(os.path.join(model_dir, "eval_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log("held-out " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()
                                 if k.endswith("accuracy")))
    return results


# --export_format -> (file name inside --export_dir, export_tflite's quantize).
TFLITE_FILES = {"tflite": ("model.tflite", None),
                "tflite_dynamic": ("model_dynamic_range.tflite", "dynamic_range")}


def export(run, export_dir, bn_set="main", formats=("saved_model",)):
    """Exports one BN set ("main" or "adversarial") with the EMA weights and the
    preprocessing inside, in each of `formats` (config.EXPORT_FORMATS): the
    SavedModel is `export_dir` itself, TFLite models are files in it (TFLITE_FILES)
    with their metadata beside them (<file>.json)."""
    with run.averaged():
        return export_model(run.trainer.model, run.config, run.info, run.recipe,
                            step=int(run.trainer.step.numpy()), ema=bool(run.trainer.ema),
                            export_dir=export_dir, bn_set=bn_set, formats=formats)


def export_model(model, config, info, recipe, *, step, ema, export_dir, bn_set="main",
                 formats=("saved_model",)):
    """`export` of a model holding the weights to deploy (either engine's run)."""
    from efficientnet_advprop import export as exporter

    bn_index = recipe.attack_bn_set if bn_set == "adversarial" else MAIN
    metadata = {
        "model_name": config.model.model_name, "recipe": config.recipe.name,
        "preprocessing": config.model.preprocessing, "num_classes": config.num_classes,
        "class_names": list(info.class_names), "step": int(step), "ema": bool(ema),
        "bn_set": bn_index}
    if "saved_model" in formats:
        exporter.export_saved_model(model, export_dir, metadata=metadata,
                                    eval_crop=config.data.augmentation, bn_set=bn_index)
    for name in formats:
        if name in TFLITE_FILES:
            file_name, quantize = TFLITE_FILES[name]
            exporter.export_tflite(model, f"{export_dir.rstrip('/')}/{file_name}",
                                   quantize=quantize, metadata=metadata, bn_set=bn_index)
    return bn_index


def train_and_evaluate(config, info=None, log=_stderr):
    """The train_and_eval mode as one call: prepare, train, evaluate -> results."""
    run = prepare(config, info, log)
    if config.model.init_checkpoint:
        initialize(run, config.model.init_checkpoint, log)
    train(run)
    results = evaluate(run, log)
    if run.trainer.images_per_second:
        results["train_images_per_second"] = round(run.trainer.images_per_second, 2)
    return results
