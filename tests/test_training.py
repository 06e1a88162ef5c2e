"""The training loop: optimizer/schedule/EMA semantics, tf.distribute, XLA, resume."""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import build_model
from efficientnet_advprop.attacks import AttackConfig
from efficientnet_advprop.layers import SplitBatchNorm
from efficientnet_advprop.recipes import make_recipe
from efficientnet_advprop.training import (ExponentialMovingAverage, TF1RMSprop, TrainConfig,
                                           Trainer, TrainingError, WarmupExponentialDecay,
                                           set_global_seed)
from efficientnet_advprop.training.trainer import is_normalization_variable

TINY = dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25)


def tiny_model(num_aux=1, dropout_rate=0.0, survival_prob=1.0, synchronized=False):
    return build_model("efficientnet-b0", 10, normalizer="split_batch_norm",
                       num_aux=num_aux, synchronized=synchronized,
                       dropout_rate=dropout_rate, survival_prob=survival_prob, **TINY)


def test_tf1_rmsprop_first_step_matches_tf1_formula():
    var = tf.Variable([1.0, -2.0])
    opt = TF1RMSprop(learning_rate=0.1, rho=0.9, momentum=0.9, epsilon=1e-3)
    grad = tf.constant([0.5, 3.0])
    opt.apply([grad], [var])
    ms = 0.9 * 1.0 + 0.1 * grad.numpy() ** 2  # TF1: slot starts at 1
    mom = 0.1 * grad.numpy() / np.sqrt(ms + 1e-3)
    np.testing.assert_allclose(var.numpy(), np.array([1.0, -2.0]) - mom, rtol=1e-6)
    opt.apply([grad], [var])
    ms2 = 0.9 * ms + 0.1 * grad.numpy() ** 2
    mom2 = 0.9 * mom + 0.1 * grad.numpy() / np.sqrt(ms2 + 1e-3)
    np.testing.assert_allclose(var.numpy(), np.array([1.0, -2.0]) - mom - mom2, rtol=1e-6)


def test_official_learning_rate_schedule():
    # batch 4096 -> peak 0.256; 100 steps/epoch; 5 warm-up epochs; x0.97 per 2.4 epochs.
    schedule = WarmupExponentialDecay(0.016 * 4096 / 256, decay_steps=240, decay_factor=0.97,
                                      warmup_steps=500)
    assert float(schedule(0)) == 0.0
    assert float(schedule(250)) == pytest.approx(0.256 * 250 / 500)
    # After warm-up the decay counts from step 0: at 500 two decays have happened.
    assert float(schedule(500)) == pytest.approx(0.256 * 0.97 ** 2)
    assert float(schedule(719)) == pytest.approx(0.256 * 0.97 ** 2)
    assert float(schedule(720)) == pytest.approx(0.256 * 0.97 ** 3)


def test_ema_uses_num_updates_and_swaps():
    var = tf.Variable(0.0)
    ema = ExponentialMovingAverage([var], decay=0.9999)
    var.assign(10.0)
    ema.update(step=tf.constant(0))  # decay = min(0.9999, 1/10) = 0.1
    assert float(ema.shadows[0]) == pytest.approx(9.0)
    with ema.swapped():
        assert float(var) == pytest.approx(9.0)
    assert float(var) == 10.0


def test_weight_decay_skips_every_normalization_variable():
    model = tiny_model()
    is_norm = is_normalization_variable(model)
    bn_vars = [v for layer in model._flatten_layers() if isinstance(layer, SplitBatchNorm)
               for v in layer.trainable_variables]
    assert bn_vars and all(is_norm(v) for v in bn_vars)
    decayed = [v for v in model.trainable_variables if not is_norm(v)]
    assert any("aux" in v.path for v in bn_vars)
    assert not any("aux" in v.path or "bn" in v.path.split("/")[0] for v in decayed)
    assert any(v.path.endswith("kernel") for v in decayed)


def _arrays(cifar_small, n=64):
    (x, y), _ = cifar_small
    return x[:n].astype("float32"), y[:n]


def _config(tmp_path, **kw):
    base = dict(model_dir=str(tmp_path), train_steps=1, global_batch_size=8,
                steps_per_epoch=10, optimizer="momentum", base_learning_rate=0.5,
                lr_warmup_epochs=0, weight_decay=1e-4, moving_average_decay=0.99,
                seed=3, summary_every_steps=1, checkpoint_every_steps=100)
    base.update(kw)
    return TrainConfig(**base)


def _dataset_fn(x, y):
    def fn(ctx, start_step):
        per_replica = ctx.get_per_replica_batch_size(8)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.batch(per_replica, drop_remainder=True).skip(start_step)
    return fn


def _advprop_recipe():
    # I-FGSM: no random start, so single- and multi-device attacks are identical.
    return make_recipe("advprop", 10, attack=AttackConfig(attacker="ifgsm", epsilon=2.0))


@pytest.mark.slow  # 5 minutes on 2 CPU cores: tracing synchronised BN over CPU collectives;
# the fast suite keeps every recipe's two-replica step (test_recipes) and the synchronised
# BN numerics (test_split_batch_norm)
def test_advprop_step_two_replicas_agrees_with_single_device(tmp_path, cifar_small,
                                                             two_device_strategy):
    x, y = _arrays(cifar_small, 8)
    set_global_seed(0)
    single = Trainer(tf.distribute.get_strategy(),
                     lambda: tiny_model(synchronized=True), _advprop_recipe(),
                     _config(tmp_path / "single"))
    weights = single.model.get_weights()
    set_global_seed(0)  # same initial weights, and so the same EMA shadows
    multi = Trainer(two_device_strategy, lambda: tiny_model(synchronized=True),
                    _advprop_recipe(), _config(tmp_path / "multi"))
    for a, b in zip(weights, multi.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    single.train(_dataset_fn(x, y))
    multi.train(_dataset_fn(x, y))
    assert int(multi.step.numpy()) == 1
    changed = 0
    for a, b, w0, var in zip(single.model.get_weights(), multi.model.get_weights(), weights,
                             single.model.weights):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3, err_msg=var.path)
        changed += not np.allclose(a, w0)
    assert changed > len(weights) // 2  # the step really updated the model
    for a, b in zip(single.ema.shadows, multi.ema.shadows):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4, rtol=1e-3)


@pytest.mark.slow  # ~40 s of XLA compilation; test_recipes compiles every recipe on a
# micro model in the fast suite
def test_advprop_train_step_compiles_with_xla(tmp_path, cifar_small):
    x, y = _arrays(cifar_small, 8)
    set_global_seed(0)
    eager = Trainer(tf.distribute.get_strategy(), tiny_model, _advprop_recipe(),
                    _config(tmp_path / "plain"))
    set_global_seed(0)
    jit = Trainer(tf.distribute.get_strategy(), tiny_model, _advprop_recipe(),
                  _config(tmp_path / "jit", jit_compile=True))
    eager.train(_dataset_fn(x, y))
    jit.train(_dataset_fn(x, y))
    assert jit._grad_fn.experimental_get_tracing_count() == 1
    for a, b in zip(eager.model.get_weights(), jit.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)


def test_resumed_run_continues_at_the_right_step_with_the_same_state(tmp_path, cifar_small):
    x, y = _arrays(cifar_small, 64)
    recipe = lambda: make_recipe("advprop", 10, attack=AttackConfig(epsilon=2.0))  # noqa
    model_fn = lambda: tiny_model(dropout_rate=0.3, survival_prob=0.8)  # noqa: E731

    set_global_seed(0)
    straight = Trainer(tf.distribute.get_strategy(), model_fn, recipe(),
                       _config(tmp_path / "straight", train_steps=4))
    straight.train(_dataset_fn(x, y))

    set_global_seed(0)
    first = Trainer(tf.distribute.get_strategy(), model_fn, recipe(),
                    _config(tmp_path / "resumed", train_steps=2))
    first.train(_dataset_fn(x, y))
    assert first.manager.latest_checkpoint.endswith("-2")

    set_global_seed(123)  # a different process state: everything must come from the checkpoint
    second = Trainer(tf.distribute.get_strategy(), model_fn, recipe(),
                     _config(tmp_path / "resumed", train_steps=4))
    assert second.restore() == 2
    assert int(second.optimizer.iterations.numpy()) == 2
    second.train(_dataset_fn(x, y))
    assert int(second.step.numpy()) == 4
    for a, b, var in zip(straight.model.get_weights(), second.model.get_weights(),
                         straight.model.weights):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=var.path)
    for a, b in zip(straight.ema.shadows, second.ema.shadows):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


@pytest.mark.parametrize("iterations_per_loop", [1, 3])
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, cifar_small, iterations_per_loop):
    x, y = _arrays(cifar_small, 16)
    x[8:] = np.nan  # the second batch
    trainer = Trainer(tf.distribute.get_strategy(), lambda: tiny_model(num_aux=0),
                      make_recipe("vanilla", 10),
                      _config(tmp_path, train_steps=3, summary_every_steps=100,
                              iterations_per_loop=iterations_per_loop))
    with pytest.raises(TrainingError, match="loss is nan at step 2;"):
        trainer.train(_dataset_fn(x, y))
    assert trainer.manager.latest_checkpoint is None  # nothing saved


def test_several_steps_per_call_give_the_same_run(tmp_path, cifar_small):
    x, y = _arrays(cifar_small, 64)
    # PGD's random start and dropout draw from the step: a loop must advance it per step.
    recipe = lambda: make_recipe("advprop", 10, attack=AttackConfig(epsilon=2.0))  # noqa
    model_fn = lambda: build_model(  # noqa: E731  (a narrow ResNet traces quickly)
        "resnet-18-cifar", 10, width_multiplier=0.125, normalizer="split_batch_norm",
        num_aux=1, dropout_rate=0.3)
    runs = {}
    for per_loop in (1, 3):
        set_global_seed(0)
        trainer = Trainer(tf.distribute.get_strategy(), model_fn, recipe(), _config(
            tmp_path / str(per_loop), train_steps=6, iterations_per_loop=per_loop,
            checkpoint_every_steps=4, summary_every_steps=100))
        trainer.train(_dataset_fn(x, y))
        runs[per_loop] = trainer
    looped = runs[3]
    # Loops of 3, 1 (cut at the checkpoint at 4) and 2 steps, one trace for all.
    assert looped._train_loop.experimental_get_tracing_count() == 1
    assert [c.rsplit("-", 1)[1] for c in looped.manager.checkpoints] == ["4", "6"]
    assert int(looped.step.numpy()) == 6 and int(looped.optimizer.iterations.numpy()) == 6
    for a, b, var in zip(runs[1].model.get_weights(), looped.model.get_weights(),
                         looped.model.weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=var.path)
    for a, b in zip(runs[1].ema.shadows, looped.ema.shadows):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_batch_not_divisible_by_replicas(tmp_path, two_device_strategy):
    with pytest.raises(ValueError, match="not divisible by the 2 replicas"):
        Trainer(two_device_strategy, tiny_model, make_recipe("vanilla", 10),
                _config(tmp_path, global_batch_size=7))


def test_agc_clips_the_global_gradient_identically_on_two_replicas(tmp_path, cifar_small,
                                                                  two_device_strategy):
    x, y = _arrays(cifar_small, 8)
    vanilla = lambda: make_recipe("vanilla", 10)  # noqa: E731
    # A normalizer-free model (AGC's use): no BN whose statistics the replicas would
    # have to synchronise, which on CPU collectives costs minutes to trace.
    model_fn = lambda: build_model("nf-resnet-26-cifar", 10, width_multiplier=0.125)  # noqa: E731
    runs = {}
    for name, strategy, agc in (("single", tf.distribute.get_strategy(), 0.01),
                                ("multi", two_device_strategy, 0.01),
                                ("no_agc", tf.distribute.get_strategy(), 0.0)):
        set_global_seed(0)
        trainer = Trainer(strategy, model_fn, vanilla(),
                          _config(tmp_path / name, optimizer="sgd", agc_clip=agc))
        initial = trainer.model.get_weights()
        trainer.train(_dataset_fn(x, y))
        runs[name] = (initial, trainer.model.get_weights())
    for a, b in zip(runs["single"][1], runs["multi"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # AGC really bounds the update: per output unit of a conv kernel (plain SGD, so the
    # update is lr * clipped gradient + lr * wd * w), ||dW|| <= lr * (0.01 max(||W||,
    # 1e-3) + wd ||W||), while the unclipped step is far larger somewhere.
    initial, clipped = runs["single"]
    _, unclipped = runs["no_agc"]
    kernel = next(i for i, w in enumerate(model_fn().weights) if w.path == "stem_conv/kernel")
    w0 = initial[kernel].reshape(-1, initial[kernel].shape[-1])
    norm_w = np.linalg.norm(w0, axis=0)
    lr = 0.5 * 8 / 256
    step = np.linalg.norm((clipped[kernel] - initial[kernel]).reshape(w0.shape), axis=0)
    assert np.all(step <= lr * (0.01 * np.maximum(norm_w, 1e-3) + 1e-4 * norm_w) * 1.001)
    free = np.linalg.norm((unclipped[kernel] - initial[kernel]).reshape(w0.shape), axis=0)
    assert np.max(free / step) > 2.0


def test_initialize_from_loads_weights_and_restarts_the_ema(tmp_path):
    from efficientnet_advprop.models.init_checkpoint import init_from_checkpoint

    set_global_seed(5)
    source = tiny_model(num_aux=0)
    path = str(tmp_path / "source.keras")
    source.save(path)
    set_global_seed(6)
    trainer = Trainer(tf.distribute.get_strategy(), lambda: tiny_model(num_aux=1),
                      make_recipe("advprop", 10), _config(tmp_path / "run"))
    report = trainer.initialize_from(lambda m: init_from_checkpoint(m, path,
                                                                    aux_from_main=True))
    assert report["source"] == "keras" and not report["skipped"]
    np.testing.assert_array_equal(trainer.model.get_layer("stem_conv").kernel.numpy(),
                                  source.get_layer("stem_conv").kernel.numpy())
    bn = trainer.model.get_layer("stem_bn")
    np.testing.assert_array_equal(bn.gammas[1].numpy(), bn.gammas[0].numpy())
    for var, shadow in zip(trainer.ema.variables_averaged, trainer.ema.shadows):
        np.testing.assert_array_equal(np.asarray(var), shadow.numpy())
    trainer.save()
    assert trainer.initialize_from(lambda m: 1 / 0) is None  # a checkpoint exists: resume


def test_undecodable_input_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    from efficientnet_advprop.training import InputDataError

    good = tf.io.encode_jpeg(tf.zeros([32, 32, 3], tf.uint8)).numpy()
    blobs = [good] * 16 + [b"not a jpeg"] * 8  # batches 1-2 decode, batch 3 does not

    def dataset_fn(ctx, start_step):
        ds = tf.data.Dataset.from_tensor_slices((blobs, [0] * 24)).skip(8 * start_step)
        ds = ds.map(lambda b, y: (tf.cast(tf.io.decode_jpeg(b, channels=3), tf.float32), y))
        return ds.batch(8, drop_remainder=True)

    trainer = Trainer(tf.distribute.get_strategy(), lambda: tiny_model(num_aux=0),
                      make_recipe("vanilla", 10),
                      _config(tmp_path, train_steps=5, checkpoint_every_steps=1))
    with pytest.raises(InputDataError, match=r"before step 3 \(.*ckpt-2"):
        trainer.train(dataset_fn)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_checkpoints_keep_the_latest_n_and_partial_writes_do_not_break_resume(
        tmp_path, cifar_small):
    import os

    x, y = _arrays(cifar_small, 64)
    model_dir = tmp_path / "run"

    def trainer(steps):
        return Trainer(tf.distribute.get_strategy(), lambda: tiny_model(num_aux=0),
                       make_recipe("vanilla", 10),
                       _config(model_dir, train_steps=steps, checkpoint_every_steps=1,
                               keep_checkpoints=2, summary_every_steps=100))

    first = trainer(4)
    first.train(_dataset_fn(x, y))
    on_disk = sorted(f for f in os.listdir(model_dir) if f.startswith("ckpt-"))
    assert [f.split(".")[0] for f in on_disk if f.endswith(".index")] == ["ckpt-3", "ckpt-4"]
    assert all(f.split(".")[0] in ("ckpt-3", "ckpt-4") for f in on_disk)
    state = tf.train.get_checkpoint_state(str(model_dir))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "ckpt-3", "ckpt-4"]
    # What a kill in the middle of writing checkpoint 5 (or 6) could leave behind: the
    # shard directory that TF writes first, a half-written data file and an index
    # without data. None of them is in the `checkpoint` state file, written last.
    (model_dir / "ckpt-5_temp").mkdir()
    (model_dir / "ckpt-5_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(
        b"\x00" * 100)
    (model_dir / "ckpt-5.data-00000-of-00001.tempstate1234").write_bytes(b"\x00" * 50)
    (model_dir / "ckpt-6.index").write_bytes(b"half an index")
    weights = first.model.get_weights()

    second = trainer(5)
    assert second.restore() == 4
    for a, b in zip(weights, second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    second.train(_dataset_fn(x, y))
    assert int(second.step.numpy()) == 5
    assert second.manager.latest_checkpoint.endswith("ckpt-5")
    assert not os.path.exists(model_dir / "ckpt-5_temp")  # the new save replaced it
    assert not os.path.exists(model_dir / "ckpt-3.index")  # still only 2 kept
    assert trainer(5).restore() == 5


@pytest.mark.slow  # ~45 s: the loop over a distributed iterator, grouped sync BN
def test_several_steps_per_call_on_two_replicas(tmp_path, cifar_small, two_device_strategy):
    x, y = _arrays(cifar_small, 64)
    weights = {}
    for per_loop in (1, 3):
        set_global_seed(0)
        trainer = Trainer(two_device_strategy, lambda: build_model(
            "resnet-18-cifar", 10, width_multiplier=0.125, normalizer="split_batch_norm",
            num_aux=0, synchronized=True, sync_group_size=2), make_recipe("vanilla", 10),
            _config(tmp_path / str(per_loop), train_steps=4, iterations_per_loop=per_loop,
                    summary_every_steps=100))
        trainer.train(_dataset_fn(x, y))
        assert int(trainer.step.numpy()) == 4
        weights[per_loop] = trainer.model.get_weights()
    for a, b in zip(weights[1], weights[3]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
