"""RecipeModel: any recipe through Keras fit(), equal to the Trainer's step; Keras
callbacks, saving and resuming under MirroredStrategy."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import RecipeModel, build_model, data
from efficientnet_advprop.evaluation import eval_attack_config
from efficientnet_advprop.layers import AUX, bn_route
from efficientnet_advprop.recipes import make_recipe
from efficientnet_advprop.training import TrainConfig, Trainer, set_global_seed

SEED = 3
# Per recipe: the step's batch and recipe options. Fast AdvProp on one device needs at
# least two ghost-BN groups in its adversarial share: 20 drawn images -> 16 clean and
# 4 adversarial in two groups of 2.
STEP_CASES = {
    "advprop": (16, {}),
    "fast_advprop": (30, {"shuffle_bn_group_size": 2}),  # 3 groups of 2 adversarial
}
# Largest |fit - Trainer| over every weight (trainable and BN statistics) after one
# step: the two loops run the same float32 ops; only the graphs around them differ.
STEP_TOLERANCE = 1e-5


def tiny_model(synchronized=False):
    return build_model("resnet-18-cifar", 10, normalizer="split_batch_norm", num_aux=1,
                       width_multiplier=0.125, image_size=32, synchronized=synchronized)


def _iterations(fit_model):
    return int(keras.ops.convert_to_numpy(fit_model.optimizer.iterations))


def _batch(cifar_small, n):
    (x, y), _ = cifar_small
    return x[:n].astype("float32"), y[:n]


@pytest.mark.parametrize("recipe_name", [
    "advprop",
    pytest.param("fast_advprop", marks=pytest.mark.slow),  # ~25 s: keeps the fast suite short
])
def test_one_fit_step_equals_one_trainer_step(tmp_path, cifar_small, recipe_name):
    batch, options = STEP_CASES[recipe_name]
    x, y = _batch(cifar_small, batch)
    config = TrainConfig(model_dir=str(tmp_path / "trainer"), train_steps=1,
                         global_batch_size=batch, steps_per_epoch=10, optimizer="sgd",
                         base_learning_rate=2.0, lr_warmup_epochs=0, weight_decay=0.0,
                         moving_average_decay=0.0, seed=SEED, checkpoint_every_steps=100)
    set_global_seed(0)
    trainer = Trainer(tf.distribute.get_strategy(), tiny_model,
                      make_recipe(recipe_name, 10, **options), config)
    start = trainer.model.get_weights()

    model = tiny_model()
    model.set_weights(start)
    fit_model = RecipeModel(model, make_recipe(recipe_name, 10, **options), seed=SEED)
    # The Trainer's learning rate (its schedule: base * batch / 256), plain SGD.
    fit_model.compile(optimizer=keras.optimizers.SGD(config.learning_rate_schedule()))
    history = fit_model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)

    trainer.train(lambda ctx, start_step: tf.data.Dataset.from_tensors((x, y)).repeat())
    assert int(trainer.step.numpy()) == 1 and _iterations(fit_model) == 1
    worst, moved = 0.0, 0
    for a, b, w0 in zip(trainer.model.get_weights(), model.get_weights(), start):
        worst = max(worst, float(np.max(np.abs(a - b))))
        moved += not np.allclose(a, w0)
    print(f"{recipe_name}: max |fit - Trainer| = {worst:.3g}")
    assert worst <= STEP_TOLERANCE
    assert moved > len(start) // 2  # the step really trained
    logs = history.history
    assert {"loss", "clean_accuracy", "adversarial_accuracy"} <= set(logs)
    assert all(np.isfinite(v[0]) for v in logs.values())


def test_compile_refuses_a_keras_loss_or_metrics():
    model = RecipeModel(tiny_model(), make_recipe("advprop", 10))
    with pytest.raises(ValueError, match="recipe's loss"):
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="recipe's loss"):
        model.compile(optimizer="sgd", metrics=["accuracy"])


def test_keras_file_round_trip_in_safe_mode_keeps_predictions_and_training_state(
        tmp_path, cifar_small):
    (x, y), (held_x, _) = cifar_small
    set_global_seed(0)
    attack = eval_attack_config(2.0, num_iter=2)
    # Vanilla keeps the step cheap; the model still has its auxiliary BN set.
    fit_model = RecipeModel(tiny_model(), make_recipe("vanilla", 10, mixup_alpha=0.2),
                            eval_attack=attack, weight_decay=1e-4)
    fit_model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    fit_model.fit(x[:64].astype("float32"), y[:64], batch_size=32, epochs=1, verbose=0)
    images = held_x[:32].astype("float32")

    path = str(tmp_path / "model.keras")
    fit_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, RecipeModel)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0),
                                  fit_model.predict(images, verbose=0))
    with bn_route(AUX):  # the auxiliary BNs came back too
        np.testing.assert_array_equal(loaded(images).numpy(), fit_model(images).numpy())
    assert loaded.recipe.get_config() == fit_model.recipe.get_config()
    assert loaded.recipe.mixup_alpha == 0.2
    assert (loaded.eval_attack, loaded.weight_decay) == (attack, 1e-4)
    assert _iterations(loaded) == 2  # the optimizer state came back
    for a, b in zip(loaded.optimizer.variables, fit_model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(loaded.seed_variable.numpy()) == loaded.seed == fit_model.seed


class _Interrupt(keras.callbacks.Callback):
    """Raises at a given batch of a given epoch: the run dies there, as if killed
    (Keras 3's BackupAndRestore has no fault-injection hook of its own)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def _embedded_batches(steps, batch):
    """The first `steps` global batches of the embedded CIFAR-10 training stream:
    the same batches every epoch."""
    info = data.resolve_dataset("embedded")
    return data.make_dataset(info, None, "train", batch_size=batch, image_size=32,
                             is_training=True, seed=0,
                             options=data.InputOptions(augmentation="cifar")).take(
        steps).apply(tf.data.experimental.assert_cardinality(steps))


@pytest.mark.slow  # ~7 min on the shared 2-core CPU: three 2-replica AdvProp runs
def test_fit_on_two_replicas_resumes_from_backup_and_restore_like_an_uninterrupted_run(
        tmp_path, two_device_strategy, cifar_small):
    steps, epochs = 2, 3
    train = _embedded_batches(steps, 32)  # 16 per replica
    _, (held_x, held_y) = cifar_small
    val = tf.data.Dataset.from_tensor_slices((held_x[:32].astype("float32"),
                                              held_y[:32])).batch(16)
    set_global_seed(0)
    with two_device_strategy.scope():
        start = tiny_model(synchronized=True).get_weights()

    def fresh():
        with two_device_strategy.scope():
            model = tiny_model(synchronized=True)
            model.set_weights(start)
            fit_model = RecipeModel(model, make_recipe("advprop", 10), seed=SEED,
                                    weight_decay=1e-4,
                                    eval_attack=eval_attack_config(2.0, num_iter=1))
            fit_model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return fit_model

    reference = fresh()
    history = reference.fit(train, epochs=epochs, verbose=0)
    assert _iterations(reference) == steps * epochs
    logs = history.history
    assert 0.0 <= logs["adversarial_accuracy"][-1] <= 1.0 and np.isfinite(logs["loss"]).all()

    backup = str(tmp_path / "backup")
    interrupted = fresh()
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(train, epochs=epochs, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(backup), _Interrupt(epoch=1, batch=1)])
    assert _iterations(interrupted) == steps + 1  # died inside epoch 2
    with open(os.path.join(backup, "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 1  # the backup of the end of epoch 1

    resumed = fresh()  # a new process would build the model again
    checkpoint = str(tmp_path / "epoch{epoch}.keras")
    logdir = str(tmp_path / "tensorboard")
    history = resumed.fit(train, epochs=epochs, verbose=0, validation_data=val,
                          callbacks=[keras.callbacks.BackupAndRestore(backup),
                                     keras.callbacks.ModelCheckpoint(checkpoint),
                                     keras.callbacks.TensorBoard(logdir)])
    assert history.epoch == [1, 2]  # continued from the backup's epoch
    assert _iterations(resumed) == steps * epochs
    worst = max(float(np.max(np.abs(a - b)))
                for a, b in zip(resumed.get_weights(), reference.get_weights()))
    print(f"resumed vs uninterrupted: max |difference| = {worst:.3g}")
    assert worst <= 1e-4
    assert not os.path.exists(backup)  # deleted once training finished
    assert {"val_loss", "val_clean_accuracy", "val_adversarial_accuracy"} <= set(
        history.history)
    assert 0.0 <= history.history["val_adversarial_accuracy"][-1] <= 1.0

    assert sorted(os.listdir(tmp_path)) == sorted(
        ["epoch2.keras", "epoch3.keras", "tensorboard"])
    saved = keras.saving.load_model(str(tmp_path / "epoch3.keras"), safe_mode=True)
    images = held_x[:8].astype("float32")
    np.testing.assert_allclose(saved.predict(images, verbose=0),
                               resumed.predict(images, verbose=0), atol=1e-5)
    tags = set()
    for name in os.listdir(os.path.join(logdir, "train")):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, "train", name)):
            tags.update(v.tag for v in event.summary.value)
    assert {"epoch_loss", "epoch_adversarial_accuracy"} <= tags
