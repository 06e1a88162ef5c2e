"""Training recipes: the follow-up papers' pieces against hand-computed values, and every
recipe through the loop (MirroredStrategy on 2 logical CPUs; XLA)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.attacks import (AttackConfig, attack_model, linf_attack,
                                          random_targets)
from efficientnet_advprop.layers import AUX, MAIN, InputNormalization, SplitBatchNorm, bn_route
from efficientnet_advprop.recipes import (RECIPES, SHARED, StepContext, alp_penalty,
                                          consistent_bn_start_step, make_recipe, trades_loss)
from efficientnet_advprop.recipes.fast_advprop import (FastAdvProp, derangement_mix,
                                                      ghost_groups)
from efficientnet_advprop.training import TrainConfig, Trainer

NUM_CLASSES = 10


def micro_model(num_aux=1):
    """conv-SplitBN-relu x2 -> pool -> dense: enough BN structure for every recipe and
    fast to trace and compile."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((16, 16, 3))
    h = InputNormalization("advprop")(inputs)
    for i, filters in enumerate((8, 8)):
        h = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False,
                                name=f"conv{i}")(h)
        h = SplitBatchNorm(num_aux=num_aux, name=f"bn{i}")(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, name="logits")(h))


def _batch(n=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, n).astype("int32")
    return images, labels


def _ctx(step=0, tags=None):
    return StepContext(seed=tf.constant([7, step], tf.int64), step=tf.constant(step, tf.int64),
                       source_tags=tags)


# --------------------------------------------------------------------- Fast AdvProp
def test_fast_advprop_split_and_budget():
    recipe = FastAdvProp(NUM_CLASSES)
    assert recipe.split(320) == (256, 64)  # the reference: 320 drawn per 256 clean
    assert recipe.budget_factor == pytest.approx(1.2)
    assert 105 / recipe.budget_factor == pytest.approx(87.5)  # the paper's 105 -> 88
    assert recipe.sample_weights(256, 64) == {SHARED: 320.0, MAIN: 256.0, AUX: 64.0}
    with pytest.raises(ValueError, match="p_adv"):
        FastAdvProp(NUM_CLASSES, adv_fraction=1.0)
    with pytest.raises(ValueError, match="untargeted"):
        FastAdvProp(NUM_CLASSES, attack=AttackConfig(epsilon=1.0, targeted=True))
    with pytest.raises(ValueError, match="both must be >= 1"):
        recipe.split(2)


def test_shuffle_bn_keeps_the_reference_bn_batch_of_16():
    recipe = FastAdvProp(NUM_CLASSES)
    # The embedded batch of 64 leaves 13 adversarial images: refused, not 13 groups of 1.
    with pytest.raises(ValueError, match="not a multiple of the shuffle-BN group size 16"):
        recipe.bn_batches(64)
    # Two groups: a shuffle that moves every image out of its group only swaps them.
    with pytest.raises(ValueError, match="at least 3 BN groups"):
        recipe.bn_batches(160)
    assert recipe.bn_batches(240) == {"clean share, main BN": 64,
                                      "adversarial BN group": 16}
    # The reference's 4 GPUs of 64 clean + 16 adversarial, on one device.
    assert recipe.bn_batches(320) == {"clean share, main BN": 64,
                                      "adversarial BN group": 16}
    assert recipe.smallest_local_batch(16) == 240
    # Several replicas: the groups of all replicas are shuffled together.
    assert recipe.bn_batches(80, num_replicas=8) == {"clean share, main BN": 64,
                                                     "adversarial BN group": 16}
    assert recipe.smallest_local_batch(16, num_replicas=8) == 80
    assert recipe.smallest_local_batch(16, num_replicas=2) == 160  # 2 x 2 groups
    assert ghost_groups(64, 16) == 4 and ghost_groups(16, 16, num_replicas=3) == 1
    with pytest.raises(ValueError, match="at least 3 BN groups"):
        ghost_groups(16, 16, num_replicas=2)


def _groups_of(perm, size):
    """[new group, old group] counts of a shuffle-BN permutation."""
    perm = np.asarray(perm)
    count = len(perm) // size
    out = np.zeros((count, count), int)
    for new, old in enumerate(perm):
        out[new // size, old // size] += 1
    return out


def test_derangement_mix_moves_every_image_out_of_its_group_evenly():
    for groups, size in [(3, 16), (4, 16), (5, 3), (7, 2)]:
        perm = derangement_mix(groups, size, tf.constant([1, groups], tf.int64)).numpy()
        assert sorted(perm) == list(range(groups * size))  # a permutation
        counts = _groups_of(perm, size)
        assert (np.diag(counts) == 0).all()  # no image stays in its own group
        off = counts[~np.eye(groups, dtype=bool)]
        assert off.max() - off.min() <= 1  # the other groups in equal shares
        assert (counts.sum(axis=1) == size).all()  # every group keeps its size


def test_shuffle_bn_one_device_is_a_new_derangement_every_step():
    recipe = FastAdvProp(NUM_CLASSES)
    num_adv = 48
    images = tf.reshape(tf.range(num_adv, dtype=tf.float32), [num_adv, 1, 1, 1])
    orders = set()
    for seed in range(4):
        x, labels = recipe.shuffle(images, tf.range(num_adv), 3, _ctx(step=seed))
        perm = labels.numpy()
        np.testing.assert_array_equal(x.numpy()[:, 0, 0, 0], perm)  # labels travel along
        # each BN group of 16 holds 8 images of each *other* noisy-pass group
        np.testing.assert_array_equal(_groups_of(perm, 16),
                                      [[0, 8, 8], [8, 0, 8], [8, 8, 0]])
        orders.add(tuple(perm))
    assert len(orders) == 4  # a new permutation every step


def test_shuffle_bn_across_two_replicas_uses_every_image_once(two_device_strategy):
    recipe = FastAdvProp(NUM_CLASSES)
    num_adv, local_groups = 6, 3  # 2 replicas x 3 groups of 2
    shared = tf.constant([3, 4], tf.int64)

    def replica_fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        ids = tf.cast(tf.range(num_adv) + num_adv * replica, tf.float32)
        images = tf.reshape(ids, [num_adv, 1, 1, 1]) * tf.ones([num_adv, 2, 2, 3])
        labels = tf.range(num_adv) + num_adv * replica
        ctx = StepContext(seed=tf.stack([tf.cast(replica, tf.int64), 9]), shared_seed=shared,
                          num_replicas=2)
        return recipe.shuffle(images, labels, local_groups, ctx)

    images, labels = two_device_strategy.run(tf.function(replica_fn))
    got_labels = np.concatenate([t.numpy() for t in
                                 two_device_strategy.experimental_local_results(labels)])
    got_images = np.concatenate([t.numpy()[:, 0, 0, 0] for t in
                                 two_device_strategy.experimental_local_results(images)])
    assert sorted(got_labels.tolist()) == list(range(2 * num_adv))  # each image once
    np.testing.assert_array_equal(got_images, got_labels)  # labels travel with images
    assert (np.diag(_groups_of(got_labels, 2)) == 0).all()  # none in its own group
    first = two_device_strategy.experimental_local_results(labels)[0].numpy()
    assert (first >= num_adv).any()  # really exchanged across replicas


def test_noisy_pass_updates_the_auxiliary_statistics_and_reuses_every_step():
    model = micro_model()
    recipe = FastAdvProp(NUM_CLASSES, shuffle_bn_group_size=1,
                         attack=AttackConfig(epsilon=2.0, step_size=1.0, num_iter=2))
    images, labels = _batch(15)  # 12 clean + 3 adversarial, 3 BN groups
    bns = [layer for layer in model._flatten_layers() if isinstance(layer, SplitBatchNorm)]
    before = [(layer.moving_means[AUX].numpy().copy(), layer.moving_means[MAIN].numpy().copy())
              for layer in bns]
    calls = []
    original = recipe.shuffle

    def stop(x_adv, adv_labels, groups, ctx):  # the state after the attack passes
        calls.append([layer.moving_means[AUX].numpy().copy() for layer in bns])
        return original(x_adv, adv_labels, groups, ctx)

    recipe.shuffle = stop
    out = recipe.gradients(model, model.trainable_variables, images, labels, _ctx())
    # The noisy (and second attack) pass moved the auxiliary statistics before the
    # adversarial pass, as the reference's attack in train mode does.
    assert any(np.abs(a - b[0]).max() > 0 for a, b in zip(calls[0], before))
    # K = 2: the two attack passes and the adversarial pass each count beta * 3.
    assert out.sample_weights == {SHARED: 12 + 3 * 0.5 * 3, MAIN: 12.0, AUX: 3 * 0.5 * 3}
    assert recipe.budget_factor == pytest.approx(1.4)


def test_update_speed_sync_divides_each_group_by_its_weighted_samples(tmp_path):
    recipe = FastAdvProp(NUM_CLASSES, label_smoothing=0.0, shuffle_bn_group_size=1)
    config = TrainConfig(model_dir=str(tmp_path), train_steps=1, global_batch_size=15,
                         steps_per_epoch=1, optimizer="sgd", weight_decay=0.0,
                         moving_average_decay=0.0)
    trainer = Trainer(tf.distribute.get_strategy(), micro_model, recipe, config)
    model = trainer.model
    images, labels = _batch(15)
    seed, step = tf.constant([7, 0], tf.int64), tf.constant(0, tf.int64)
    normalised, _, _ = trainer._gradients(images, labels, seed, seed, step, None)
    raw = recipe.gradients(model, model.trainable_variables, images, labels,
                           StepContext(seed=seed, step=step))
    num_clean, num_adv = 12, 3
    weights = {SHARED: num_clean + 2 * 0.5 * num_adv, MAIN: num_clean, AUX: 2 * 0.5 * num_adv}
    bn = {id(v): k for layer in model._flatten_layers() if isinstance(layer, SplitBatchNorm)
          for k in range(2) for v in (layer.gammas[k], layer.betas[k])}
    groups_seen = set()
    for var, g_norm, g_raw in zip(model.trainable_variables, normalised, raw.grads):
        group = bn.get(id(var), SHARED)
        groups_seen.add(group)
        np.testing.assert_allclose(g_norm.numpy(), g_raw.numpy() / weights[group],
                                   rtol=1e-5, atol=1e-8)
    assert groups_seen == {SHARED, MAIN, AUX}
    # Independently: the main BN only sees the clean share, so its gradient is the mean
    # over the 12 clean images of a forward of those images alone (in the 3 BN groups).
    with tf.GradientTape() as tape:
        with bn_route(MAIN, groups=3):
            logits = model(images[:num_clean], training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels[:num_clean], logits=logits))
    main_vars = [v for v in model.trainable_variables if bn.get(id(v)) == MAIN]
    direct = tape.gradient(loss, main_vars)
    by_id = {id(v): g for v, g in zip(model.trainable_variables, normalised)}
    for var, g in zip(main_vars, direct):
        np.testing.assert_allclose(by_id[id(var)].numpy(), g.numpy(), rtol=1e-4, atol=1e-6)


def test_fast_advprop_adversarial_images_stay_in_the_ball():
    model = micro_model()
    recipe = FastAdvProp(NUM_CLASSES, attack=AttackConfig(epsilon=2.0, step_size=1.0,
                                                          num_iter=2), shuffle_bn_group_size=1)
    images, labels = _batch(15)
    captured = {}
    original = recipe.shuffle

    def spy(x_adv, adv_labels, num_adv, ctx):
        captured["x"], captured["labels"] = x_adv, adv_labels
        return original(x_adv, adv_labels, num_adv, ctx)

    recipe.shuffle = spy
    out = recipe.gradients(model, model.trainable_variables, images, labels, _ctx())
    x_adv = captured["x"].numpy()
    np.testing.assert_array_equal(captured["labels"].numpy(), labels[12:])
    assert np.abs(x_adv - images[12:]).max() <= 2.0 + 1e-4
    assert x_adv.min() >= 0 and x_adv.max() <= 255
    assert np.abs(x_adv - images[12:]).max() > 0.5
    assert set(out.metrics) >= {"loss/clean", "loss/noisy", "loss/adversarial"}
    assert all(g is not None for g in out.grads)


# ---------------------------------------------------- AdvProp's attack and baseline
def test_advprop_family_attacks_a_random_wrong_class_by_default():
    for name in ("advprop", "fine_grained_advprop", "sat"):
        assert RECIPES[name](NUM_CLASSES).attack.targeted, name
    # the untargeted methods stay untargeted
    for name in ("fast_advprop", "bn_sat", "nofrost", "madry_at", "fat"):
        assert not RECIPES[name](NUM_CLASSES).attack.targeted, name
    # the attack descends the target's loss: with the target drawn from the step seed,
    # advprop's adversarial images are those of linf_attack towards those targets
    model = micro_model()
    images, labels = _batch(8)
    recipe = RECIPES["advprop"](NUM_CLASSES)
    seed = tf.constant([5, 1], tf.int64)
    adv = attack_model(model, images, labels, recipe.attack, bn_set=AUX,
                       num_classes=NUM_CLASSES, seed=seed)
    fold = tf.random.experimental.stateless_fold_in
    targets = random_targets(labels, NUM_CLASSES, fold(seed, 1))
    assert not np.any(targets.numpy() == labels)

    def aux_logits(x):
        with bn_route(AUX, update_stats=False):
            return model(x, training=False)

    expected = linf_attack(aux_logits, images, labels, epsilon=1.0, step_size=1.0,
                           num_iter=1, targets=targets, seed=fold(seed, 0))
    np.testing.assert_allclose(adv.numpy(), expected.numpy(), atol=1e-5)


def test_sat_is_advprops_baseline_pgd5_eps4_with_the_papers_summed_loss():
    recipe = RECIPES["sat"](NUM_CLASSES)
    a = recipe.attack
    assert (a.attacker, a.epsilon, a.iterations, a.step_size, a.targeted) == (
        "pgd", 4.0, 5, 1.0, True)
    model = micro_model(0)
    images, labels = _batch(8)
    out = recipe.compute(model, images, labels, tf.constant([2, 3], tf.int64))
    clean, adv = out.metrics["loss/clean"][0], out.metrics["loss/adversarial"][0]
    # Eq. 2: L(clean) + max L(adv), weight 1 each (not Goodfellow's 0.5 / 0.5)
    np.testing.assert_allclose(float(out.loss_sum), float(clean) + float(adv), rtol=1e-6)


# ----------------------------------------------------------------------- losses
def test_trades_loss_matches_hand_computation():
    clean = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], np.float32)
    adv = np.array([[1.0, 1.0, -1.0], [0.0, 2.0, 0.0]], np.float32)
    labels = np.array([0, 2])

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(clean), softmax(adv)
    ce = -np.log(p[np.arange(2), labels])
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    got = trades_loss(labels, clean, adv, beta=6.0, num_classes=3).numpy()
    np.testing.assert_allclose(got, ce + 6.0 * kl, rtol=1e-5)
    assert kl[0] > 0 and kl[1] > 0


def test_alp_penalty_matches_hand_computation():
    clean = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    adv = np.array([[1.0, 0.0, 3.0, 8.0]], np.float32)
    # mean over logits of the squared differences: (0 + 4 + 0 + 16) / 4 = 5
    np.testing.assert_allclose(alp_penalty(clean, adv).numpy(), [5.0])


# ---------------------------------------------------------------------- attacks
def test_targeted_attacker_never_picks_the_true_class():
    labels = tf.constant(np.arange(5000) % NUM_CLASSES, tf.int32)
    for s in range(4):
        targets = random_targets(labels, NUM_CLASSES, tf.constant([s, 2], tf.int64)).numpy()
        assert not np.any(targets == labels.numpy())
        assert set(np.unique(targets)) == set(range(NUM_CLASSES))  # every other class


def test_clean_start_probability_is_a_per_image_uniform_coin():
    images = tf.fill([2000, 2, 2, 3], 100.0)
    flat = lambda x: tf.zeros([tf.shape(x)[0], NUM_CLASSES]) * tf.reduce_sum(x)  # noqa
    starts = {}
    for prob in (0.0, 0.2, 1.0):
        x = linf_attack(flat, images, tf.zeros([2000], tf.int32), epsilon=8.0, step_size=1.0,
                        num_iter=1, seed=tf.constant([1, 2], tf.int64), clean_start_prob=prob)
        unchanged = np.all(x.numpy() == 100.0, axis=(1, 2, 3))
        starts[prob] = unchanged.mean()
    assert starts[0.0] == 0.0 and starts[1.0] == 1.0
    assert 0.17 < starts[0.2] < 0.23


def test_fat_early_stop_freezes_misclassified_images():
    w = tf.constant(np.eye(2, dtype=np.float32))

    def logits_fn(x):  # class = which of the two pixel values is larger
        return tf.matmul(tf.reshape(x, [-1, 2]), w)

    images = tf.constant([[[[100.0], [110.0]]], [[[110.0], [100.0]]]])  # [2, 1, 2, 1]
    labels = tf.constant([0, 0])  # image 0 is misclassified already, image 1 correct
    for tau, moved0 in ((0, False), (1, True)):
        x = linf_attack(logits_fn, images, labels, epsilon=8.0, step_size=1.0, num_iter=4,
                        random_start=False, early_stop_tau=tau).numpy()
        assert (np.abs(x[0] - images[0].numpy()).max() > 0) == moved0
        np.testing.assert_allclose(np.abs(x[1] - images[1].numpy()).max(), 4.0)


# ------------------------------------------------------------------ consistent BN
def test_consistent_bn_switches_at_the_right_step():
    start = consistent_bn_start_step(train_steps=100, steps_per_epoch=10, last_epochs=2)
    assert start == 80 and consistent_bn_start_step(100, 10, 0) is None
    recipe = make_recipe("mbn_at", NUM_CLASSES, consistent_bn_from_step=start)
    layer = SplitBatchNorm(num_aux=1, momentum=0.5)
    x = tf.random.stateless_normal([8, 4, 4, 3], seed=[1, 1]) * 3.0 + 2.0
    layer(x)
    inference = layer(x, training=False).numpy()
    for step, consistent in ((79, False), (80, True), (95, True)):
        before = layer.moving_mean.numpy().copy()
        flag = recipe._moving_stats_flag(_ctx(step))
        with bn_route(MAIN, use_moving_stats=flag):
            out = layer(x, training=True).numpy()
        if consistent:
            np.testing.assert_allclose(out, inference, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
        else:
            assert np.abs(out - inference).max() > 0.1
            assert np.abs(layer.moving_mean.numpy() - before).max() > 0.1
            inference = layer(x, training=False).numpy()


# ----------------------------------------------------------- ghost and per-image BN
def test_ghost_groups_normalise_each_group_with_its_own_statistics():
    layer = SplitBatchNorm(num_aux=1, momentum=0.0)
    x = tf.random.stateless_normal([6, 3, 3, 2], seed=[4, 4]) * 2.0 + 1.0
    layer(x)
    with bn_route(AUX, groups=3):
        grouped = layer(x, training=True).numpy()
    means = []
    for g in range(3):
        with bn_route(AUX, update_stats=False):
            alone = layer(x[2 * g:2 * g + 2], training=True).numpy()
        np.testing.assert_allclose(grouped[2 * g:2 * g + 2], alone, rtol=1e-5, atol=1e-5)
        means.append(tf.reduce_mean(x[2 * g:2 * g + 2], axis=[0, 1, 2]).numpy())
    # momentum 0: the moving mean is the mean over groups of the group means
    np.testing.assert_allclose(layer.moving_means[AUX].numpy(), np.mean(means, 0), rtol=1e-5)
    with pytest.raises(ValueError, match="ghost BN groups"):
        with bn_route(AUX, groups=4):
            layer(x, training=True)



def test_per_image_assignment_equals_routing_each_source_alone():
    layer = SplitBatchNorm(num_aux=2)
    x = tf.random.stateless_normal([6, 4, 4, 2], seed=[2, 2])
    layer(x)
    for k in range(3):  # distinct affine parameters per set
        layer.gammas[k].assign([1.0 + k, 2.0 - 0.5 * k])
        layer.betas[k].assign([0.1 * k, -0.2 * k])
    tags = tf.constant([0, 2, 1, 0, 2, 1])
    with bn_route(assignment=tags, update_stats=False):
        mixed = layer(x, training=True).numpy()
    for k in range(3):
        idx = np.where(tags.numpy() == k)[0]
        with bn_route(k, update_stats=False):
            alone = layer(tf.gather(x, idx), training=True).numpy()
        np.testing.assert_allclose(mixed[idx], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- every recipe, the loop
def _recipe(name):
    small = AttackConfig(epsilon=2.0, step_size=1.0, num_iter=2)
    options = {"label_smoothing": 0.1}
    if name != "vanilla":
        options["attack"] = small
    if name == "mbn_at":
        options.update(attack=AttackConfig(epsilon=4.0, num_iter=2, targeted=True,
                                           clean_start_prob=0.2), alp_weight=0.5,
                       consistent_bn_from_step=1)
    if name == "fast_advprop":  # 4 adversarial images of 20: ghost groups of 1
        options["shuffle_bn_group_size"] = 1
    return make_recipe(name, NUM_CLASSES, **options)


def _step(strategy, name, tmp_path, jit):
    recipe = _recipe(name)
    config = TrainConfig(model_dir=str(tmp_path), train_steps=1, global_batch_size=20,
                         steps_per_epoch=1, optimizer="momentum", base_learning_rate=0.1,
                         lr_warmup_epochs=0, moving_average_decay=0.9, jit_compile=jit)
    trainer = Trainer(strategy, lambda: micro_model(max(1, recipe.num_aux)), recipe, config)
    images, labels = _batch(20)
    extras = {}
    if recipe.needs_source_tags:
        extras["source_tags"] = (np.arange(20) % 2).astype("int32")
    if "tda" in recipe.input_views:  # a stand-in view: the images mirrored
        extras["tda_images"] = images[:, :, ::-1].copy()

    def dataset_fn(ctx, start):
        per = ctx.get_per_replica_batch_size(20)
        parts = (images, labels, extras) if extras else (images, labels)
        ds = tf.data.Dataset.from_tensor_slices(parts).shard(ctx.num_input_pipelines,
                                                             ctx.input_pipeline_id)
        return ds.batch(per, drop_remainder=True).repeat()

    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    metrics = trainer.train(dataset_fn)
    after = [v.numpy() for v in trainer.model.trainable_variables]
    assert int(trainer.step.numpy()) == 1
    assert all(np.isfinite(v).all() for v in after)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))
    assert any(k.startswith("accuracy/") for k in metrics)
    return trainer


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_trains_a_step_on_two_replicas(name, tmp_path, two_device_strategy):
    _step(two_device_strategy, name, tmp_path, jit=False)


# Two recipes compile in the fast suite: advprop (split BN routes and the attack) and
# fast_advprop (its cross-replica pieces); the others, 5-10 s of compilation each, are
# marked slow. The in-graph augmentations compile in test_batch_augment.py.
_XLA_FAST = ("advprop", "fast_advprop")


@pytest.mark.parametrize("name", [
    name if name in _XLA_FAST else pytest.param(name, marks=pytest.mark.slow)
    for name in RECIPES])
def test_every_recipe_compiles_with_xla(name, tmp_path):
    _step(tf.distribute.get_strategy(), name, tmp_path, jit=True)


@pytest.mark.slow  # about 40 s: XLA compiles the two passes separately
def test_fast_advprop_compiles_its_pieces_with_xla_on_two_replicas(tmp_path,
                                                                   two_device_strategy):
    trainer = _step(two_device_strategy, "fast_advprop", tmp_path, jit=True)
    assert trainer._piece_compiler is not None  # the exchange stays outside XLA


def test_fine_grained_advprop_refuses_untagged_batches():
    recipe = make_recipe("fine_grained_advprop", NUM_CLASSES)
    model = micro_model(num_aux=2)
    images, labels = _batch(4)
    with pytest.raises(ValueError, match="source tags"):
        recipe.compute(model, images, labels, _ctx())


def test_fine_grained_advprop_without_augmented_images_is_advprop_on_its_third_set():
    """Fine-grained AdvProp runs AdvProp's step with another routing: with every image
    tagged 0 (none from AutoAugment) and BN sets 1 and 2 equal (as built), its loss,
    gradients and statistics are AdvProp's with set 2 in place of set 1, and set 1 is
    left alone; one tagged image moves set 1."""
    images, labels = _batch(8)
    advprop_model, fine_model = micro_model(num_aux=2), micro_model(num_aux=2)
    advprop = make_recipe("advprop", NUM_CLASSES).gradients(
        advprop_model, advprop_model.trainable_variables, images, labels, _ctx())
    fine = make_recipe("fine_grained_advprop", NUM_CLASSES).gradients(
        fine_model, fine_model.trainable_variables, images, labels,
        _ctx(tags=tf.zeros([8], tf.int32)))

    def swap(path):  # advprop's set-1 variables are fine-grained's set-2 ones
        return path.replace("aux1_", "aux2_") if "aux1_" in path else path

    np.testing.assert_allclose(fine.loss_sum.numpy(), advprop.loss_sum.numpy(), rtol=1e-5)
    assert set(fine.metrics) == set(advprop.metrics) | {"fraction/augmented"}
    for name, (total, count) in advprop.metrics.items():
        np.testing.assert_allclose(fine.metrics[name][0].numpy(), total.numpy(), rtol=1e-5)
        assert fine.metrics[name][1].numpy() == count.numpy()
    assert [float(v) for v in fine.metrics["fraction/augmented"]] == [0.0, 8.0]
    fine_grads = {v.path: g for v, g in zip(fine_model.trainable_variables, fine.grads)}
    for variable, grad in zip(advprop_model.trainable_variables, advprop.grads):
        if "aux2_" in variable.path:  # advprop leaves its set 2 out of the step
            assert grad is None or not np.any(grad.numpy()), variable.path
            continue
        np.testing.assert_allclose(fine_grads[swap(variable.path)].numpy(), grad.numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=variable.path)
    fine_stats = {v.path: v.numpy() for v in fine_model.non_trainable_variables}
    for variable in advprop_model.non_trainable_variables:
        if "aux2_" not in variable.path:
            np.testing.assert_allclose(fine_stats[swap(variable.path)], variable.numpy(),
                                       rtol=1e-5, atol=1e-6, err_msg=variable.path)
    built = micro_model(num_aux=2)
    for variable in built.non_trainable_variables:  # set 1: no image tagged 1
        if "aux1_" in variable.path:
            np.testing.assert_array_equal(fine_stats[variable.path], variable.numpy())

    tagged = micro_model(num_aux=2)
    make_recipe("fine_grained_advprop", NUM_CLASSES).gradients(
        tagged, tagged.trainable_variables, images, labels,
        _ctx(tags=tf.constant([0, 1, 0, 0, 0, 0, 0, 0], tf.int32)))
    built_stats = {v.path: v.numpy() for v in built.non_trainable_variables}
    for variable in tagged.non_trainable_variables:
        if variable.path.endswith("aux1_moving_mean"):
            assert not np.allclose(variable.numpy(), built_stats[variable.path])


def test_fast_advprop_mixes_only_the_clean_share():
    model = micro_model()
    recipe = FastAdvProp(NUM_CLASSES, mixup_alpha=0.4, cutmix_alpha=1.0,
                         shuffle_bn_group_size=1)
    images, labels = _batch(15)
    seen = {}
    original_mix, original_shuffle = recipe._mix, recipe.shuffle

    def mix_spy(clean, clean_labels, seed):
        seen["clean_in"] = clean
        seen["clean"] = original_mix(clean, clean_labels, seed)
        return seen["clean"]

    def shuffle_spy(x_adv, adv_labels, *args):
        seen["adv_labels"] = adv_labels
        return original_shuffle(x_adv, adv_labels, *args)

    recipe._mix, recipe.shuffle = mix_spy, shuffle_spy
    recipe.gradients(model, model.trainable_variables, images, labels, _ctx())
    mixed_images, soft = seen["clean"]
    assert seen["clean_in"].shape[0] == 12 and soft.shape == (12, NUM_CLASSES)
    np.testing.assert_allclose(soft.numpy().sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(mixed_images.numpy(), images[:12])  # the clean share is mixed
    np.testing.assert_array_equal(seen["adv_labels"].numpy(), labels[12:])  # hard, unmixed


def test_nofrost_star_augments_half_deepaugment_half_tda():
    """First half: DeepAugment-style of the batch; second half: the input pipeline's TDA
    views (made from the decoded images, tests/test_extra_views.py)."""
    from efficientnet_advprop.data.deepaugment import deep_augment
    from efficientnet_advprop.recipes.nofrost import augmented_view

    images, _ = _batch(6)
    tda_images, _ = _batch(6, seed=1)
    seed = tf.constant([5, 6], tf.int64)
    view = augmented_view(images, seed, tda_images).numpy()
    fold = tf.random.experimental.stateless_fold_in
    np.testing.assert_allclose(view[:3], deep_augment(images[:3], fold(seed, 0)).numpy())
    np.testing.assert_array_equal(view[3:], tda_images[3:])
    assert np.abs(view[:3] - images[:3]).mean() > 1.0
    with pytest.raises(ValueError, match="shape"):
        augmented_view(images, seed, tda_images[:, :8])


def test_step_schedule_decays_at_each_milestone():
    from efficientnet_advprop.training import WarmupStepDecay

    schedule = WarmupStepDecay(0.1, milestones=[30, 60], decay_factor=0.1, warmup_steps=10)
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(29)) == pytest.approx(0.1)
    assert float(schedule(30)) == pytest.approx(0.01)
    assert float(schedule(60)) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="increase"):
        WarmupStepDecay(0.1, milestones=[60, 30])


def test_mbn_at_group_norm_variant_trains_without_batch_norm(tmp_path):
    from efficientnet_advprop import build_model

    recipe = make_recipe("mbn_at", NUM_CLASSES, mixture_bn=False, attack=AttackConfig(
        epsilon=4.0, num_iter=1, targeted=True, clean_start_prob=0.2))
    assert recipe.num_aux == 0 and recipe.attack_bn_set == MAIN
    config = TrainConfig(model_dir=str(tmp_path), train_steps=1, global_batch_size=8,
                         steps_per_epoch=1, optimizer="momentum", moving_average_decay=0.0)
    trainer = Trainer(tf.distribute.get_strategy(), lambda: build_model(
        "resnet-18-cifar", NUM_CLASSES, normalizer="group_norm", width_multiplier=0.125),
        recipe, config)
    assert not any(isinstance(layer, (SplitBatchNorm, keras.layers.BatchNormalization))
                   for layer in trainer.model._flatten_layers())
    images, labels = _batch(8)
    images = tf.image.resize(images, [32, 32])
    loss, metrics = trainer._train_step(images, tf.constant(labels))
    assert np.isfinite(float(loss)) and "loss/adversarial" in metrics
