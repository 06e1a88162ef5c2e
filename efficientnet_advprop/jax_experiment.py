"""The JAX engine's experiment: `experiment.py`'s prepare / train / evaluate / export
for `KERAS_BACKEND=jax`, over the same resolved config, model and recipe.

    KERAS_BACKEND=jax python main.py --advprop --model=efficientnet-b0

Input: where TensorFlow is installed, the TF engine's tf.data pipeline feeds the JAX
step on the host (`make_dataset`, the same preprocessing and augmentations, as numpy
batches); where it is not, the TF-free path (`data.numpy_input`: Pillow decoding,
pad-crop-flip inside the compiled step) -- which knows the "cifar" and "none"
augmentations only. `input_path` chooses ("auto": tf.data when importable).

Export to SavedModel/TFLite needs TensorFlow: it runs the TF engine's exporter in a
child process (KERAS_BACKEND=tensorflow) on the saved checkpoint
(`efficientnet_advprop.export_checkpoint`). The robustness suite (APGD, Square, ...)
is TensorFlow's too: `python main.py --mode=eval_robustness --model_dir=<this run>`
under the TF backend evaluates a JAX run's checkpoint.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_advprop import seam
from efficientnet_advprop.config import ConfigError, check_bn_batches
from efficientnet_advprop.experiment_settings import make_train_config, model_kwargs
from efficientnet_advprop.layers.split_batch_norm import MAIN
from efficientnet_advprop.models import build_model
from efficientnet_advprop.training.jax_engine import JaxTrainer, make_eval_fn
from efficientnet_advprop.training.scalar_log import ScalarWriter

INPUT_PATHS = ("auto", "tfdata", "numpy")
_EVAL_TAG = 0x5EED


def _stderr(message):
    print(message, file=sys.stderr)


def enable_compilation_cache(directory):
    """Keeps every compiled program in `directory` (JAX's persistent compilation cache)
    and reads it back when a later program's HLO is the same: the runs of one recipe
    and model that differ only in their seed (the step takes the seed as an
    argument), or a rerun after an interruption, skip XLA's compilation."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tensorflow_available():
    """TensorFlow can be imported here (installed, and not blocked)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
    return importlib.util.find_spec("tensorflow") is not None


class _Step:
    """The TF engine's `trainer.step` (a variable with .numpy()) for main.py."""

    def __init__(self, trainer):
        self._trainer = trainer

    def numpy(self):
        return np.int64(self._trainer.step)


@dataclasses.dataclass
class JaxRun:
    """What `prepare` builds for one experiment on the JAX engine."""

    config: object
    info: object
    recipe: object
    trainer: JaxTrainer
    input_path: str
    skip_counter: object = None
    jit_compile: bool = True

    def step(self):
        return int(self.trainer.step)

    def train_batches(self, start_step):
        cfg = self.config
        if self.input_path == "tfdata":
            from efficientnet_advprop import data

            # This engine neither skips nor counts bad records (yet).
            options = dataclasses.replace(
                data.InputOptions.from_data_config(cfg.data, self.recipe),
                skip_bad_records=False)
            ds = data.make_dataset(
                self.info, cfg.data.data_dir, "train",
                batch_size=cfg.data.train_batch_size, image_size=cfg.model.image_size,
                is_training=True, seed=cfg.run.seed, start_step=start_step,
                options=options)
            return ds.as_numpy_iterator()
        from efficientnet_advprop.data import numpy_input

        return iter(numpy_input.make_numpy_input(
            self.info.name, cfg.data.data_dir, "train",
            batch_size=cfg.data.train_batch_size, image_size=cfg.model.image_size,
            seed=cfg.run.seed, is_training=True, start_step=start_step,
            holdout_shards=cfg.data.holdout_shards or 0)[0])

    def eval_batches(self):
        """(images, labels) numpy batches of the held-out set, config.num_eval at most."""
        cfg = self.config
        if self.input_path == "tfdata":
            from efficientnet_advprop.experiment import eval_dataset

            batches = eval_dataset(cfg, self.info).as_numpy_iterator()
        else:
            from efficientnet_advprop.data import numpy_input

            batches = iter(numpy_input.make_numpy_input(
                self.info.name, cfg.data.data_dir, "eval",
                batch_size=cfg.data.eval_batch_size, image_size=cfg.model.image_size,
                seed=cfg.run.seed, is_training=False,
                holdout_shards=cfg.data.holdout_shards or 0)[0])
        left = cfg.num_eval
        for batch in batches:
            images, labels = batch[0][:left], batch[1][:left]
            left -= len(labels)
            if len(labels):
                yield np.asarray(images, np.float32), np.asarray(labels, np.int32)
            if left <= 0:
                return


def _device_augment(config):
    """The compiled step's augmentation on the TF-free path (None on tf.data)."""
    from efficientnet_advprop.data import numpy_input

    if config.data.auto_augment:
        raise ConfigError("auto_augment", config.data.auto_augment,
                          "AutoAugment/RandAugment need TensorFlow's tf.data pipeline, which "
                          "is not installed here; pass --auto_augment=none (the TF-free "
                          "input path does pad-crop-flip)")
    if config.data.augmentation == "none":
        return None
    if config.data.augmentation not in ("cifar", "cifar_zeros"):
        raise ConfigError("augmentation", config.data.augmentation,
                          "the TF-free input path (no TensorFlow here) does pad-crop-flip "
                          "('cifar', 'cifar_zeros') or 'none'; install TensorFlow for the "
                          "tf.data pipeline's augmentations")
    mode = "reflect" if config.data.augmentation == "cifar" else "constant"
    return lambda images, seed: numpy_input.pad_crop_flip(images, seed, mode=mode)


def prepare(config, info=None, log=_stderr, input_path="auto"):
    """Recipe, model and JAX trainer of `config` (nothing trained yet)."""
    if input_path not in INPUT_PATHS:
        raise ValueError(f"input_path={input_path!r}: choose from {', '.join(INPUT_PATHS)}")
    if input_path == "auto":
        input_path = "tfdata" if tensorflow_available() else "numpy"
    if info is None:
        info = resolve_dataset(config, input_path)
    run_cfg = config.run
    if run_cfg.on_tpu or run_cfg.strategy not in (None, "default", "mirrored", "auto"):
        raise ConfigError("strategy", run_cfg.strategy or "tpu",
                          "the JAX engine runs data parallel over the local devices "
                          "(keras.distribution); tf.distribute strategies are the "
                          "TensorFlow engine's")
    if config.model.sync_batch_norm_group_size is not None:
        raise ConfigError("sync_batch_norm_group_size", config.model.sync_batch_norm_group_size,
                          "the JAX engine's BN statistics are over the step's whole batch")
    if run_cfg.precision == "float16":
        raise ConfigError("precision", "float16", "the JAX engine does no loss scaling; "
                          "use bfloat16 or float32 (or the TensorFlow engine)")
    devices = jax.local_devices()
    if config.data.train_batch_size % len(devices):
        raise ConfigError("train_batch_size", config.data.train_batch_size,
                          f"is not divisible by the {len(devices)} local devices")
    check_bn_batches(config, num_replicas=len(devices))
    recipe = config.make_recipe()
    if recipe.input_views:  # NoFrost*'s TDA view
        raise ConfigError("recipe", config.recipe.name,
                          "its second view (TDA) is made in the tf.data pipeline by ops "
                          "that follow Keras' backend, which is JAX here; train it on "
                          "the TensorFlow engine (KERAS_BACKEND=tensorflow)")
    kwargs = model_kwargs(config, recipe, (False, None))
    name, num_classes = config.model.model_name, config.num_classes
    import keras

    keras.utils.set_random_seed(int(run_cfg.seed))

    def model_fn():
        return build_model(name, num_classes, **kwargs)

    augment = _device_augment(config) if input_path == "numpy" else None
    trainer = JaxTrainer(model_fn, recipe, make_train_config(config, recipe, True),
                         augment=augment, devices=devices)
    optim, batch = config.optim, config.data.train_batch_size
    log(f"{name} {recipe.describe()} | {info.name} {config.model.image_size}px | batch "
        f"{batch} x {optim.train_steps} steps ({optim.train_steps / optim.steps_per_epoch:.2f}"
        f" epochs) | JAX engine on {len(devices)} {devices[0].platform} device(s) | input "
        f"{input_path} | {run_cfg.precision} | {run_cfg.iterations_per_loop} step(s)/call | "
        f"model_dir {run_cfg.model_dir}")
    return JaxRun(config=config, info=info, recipe=recipe, trainer=trainer,
                  input_path=input_path)


def resolve_dataset(config, input_path):
    if input_path == "tfdata":
        from efficientnet_advprop import data

        return data.resolve_dataset(config.data.dataset, config.data.data_dir,
                                    holdout_shards=config.data.holdout_shards)
    from efficientnet_advprop.data import numpy_input

    return numpy_input.resolve_dataset(config.data.dataset, config.data.data_dir,
                                       holdout_shards=config.data.holdout_shards)


def initialize(run, checkpoint, log=_stderr):
    raise ConfigError("init_checkpoint", checkpoint,
                      "the JAX engine does not import checkpoints yet; start the run on "
                      "the TensorFlow engine, or train from scratch")


def train(run, on_checkpoint=None):
    """Trains to config.optim.train_steps (resuming from model_dir), holding the run
    lock, as experiment.train."""
    from efficientnet_advprop.training.run_lock import RunLock

    with RunLock(run.config.run.model_dir):
        run.config.save(run.config.run.model_dir)
        return run.trainer.train(run.train_batches, on_checkpoint=on_checkpoint)


def restore(run):
    if run.trainer.restore() == 0:
        raise ConfigError("model_dir", run.config.run.model_dir, "no checkpoint to evaluate")


def evaluate(run, log=_stderr):
    """Held-out clean (and PGD) accuracy through the main BNs and, for recipes with an
    adversarial set, through that set alone, on the EMA weights; writes
    eval_results.json (the keys of experiment.evaluate)."""
    cfg, trainer = run.config, run.trainer
    results = {"model_name": cfg.model.model_name, "recipe": cfg.recipe.name,
               "dataset": run.info.name, "image_size": cfg.model.image_size,
               "step": run.step(), "engine": "jax"}
    eps = cfg.attack.eval_epsilon or cfg.attack.epsilon
    iterations = cfg.attack.eval_attack_iterations
    attack = _eval_attack(eps, iterations) if iterations else None
    trainer.sync_to_model(averaged=True)
    values = [v.value for v in trainer.model.variables]
    sets = [("", MAIN)]
    if run.recipe.num_aux and run.recipe.attack_bn_set != MAIN:
        sets.append(("aux_bn_", run.recipe.attack_bn_set))
    for prefix, bn_set in sets:
        fn = make_eval_fn(trainer.model, attack, bn_set, cfg.num_classes)
        clean = adversarial = count = 0.0
        for index, (images, labels) in enumerate(run.eval_batches()):
            seed = seam.fold_in(seam.make_seed(cfg.run.seed, index), _EVAL_TAG)
            c, a = fn(values, jnp.asarray(images), jnp.asarray(labels), seed)
            clean, adversarial, count = clean + float(c), adversarial + float(a), count + len(labels)
        if not prefix:
            results["num_eval_images"] = int(count)
        results[f"{prefix}clean_accuracy"] = clean / max(count, 1.0)
        if attack is not None:
            results[f"{prefix}pgd{attack.iterations}_eps{eps:g}_accuracy"] = (
                adversarial / max(count, 1.0))
    trainer.sync_to_model()
    model_dir = cfg.run.model_dir
    writer = ScalarWriter(os.path.join(model_dir, "eval"))
    writer.write(results["step"], {k: v for k, v in results.items() if k.endswith("accuracy")})
    writer.close()
    with open(os.path.join(model_dir, "eval_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log("held-out " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()
                                 if k.endswith("accuracy")))
    return results


def _eval_attack(epsilon, iterations):
    """The TF engine's evaluation attack (PGD, step 2.5 eps / n)."""
    from efficientnet_advprop.attacks.pgd import eval_attack_config

    return eval_attack_config(epsilon, iterations)


def export(run, export_dir, bn_set="main", formats=("saved_model",)):
    """The TF engine's export of this run's newest checkpoint (EMA weights), in a
    child process with KERAS_BACKEND=tensorflow; needs TensorFlow installed."""
    if not tensorflow_available():
        raise ConfigError("export_dir", export_dir, "export to SavedModel/TFLite needs "
                          "TensorFlow, which is not installed here; copy model_dir to a "
                          "machine that has it and run efficientnet_advprop.export_checkpoint")
    command = [sys.executable, "-m", "efficientnet_advprop.export_checkpoint",
               f"--model_dir={run.config.run.model_dir}", f"--export_dir={export_dir}",
               f"--bn_set={bn_set}", f"--formats={','.join(formats)}"]
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=path)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"export of {run.config.run.model_dir} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["bn_set"]
