"""APGD-CE / APGD-DLR / APGD-T and the AutoAttack-style ensemble: invariants."""

import math

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.attacks.apgd import (apgd, apgd_targeted, checkpoints, dlr_loss,
                                               targeted_dlr_loss, top_k_targets)
from efficientnet_advprop.attacks.pgd import random_targets
from efficientnet_advprop.evaluation.autoattack import (autoattack, ensemble_robust_accuracy,
                                                        member_robust_accuracies)

SEED = tf.constant([3, 4], tf.int64)
OTHER_SEED = tf.constant([3, 5], tf.int64)
fold_in = tf.random.experimental.stateless_fold_in


def _predict(logits_fn, x):
    return np.argmax(np.asarray(logits_fn(tf.constant(x, tf.float32))), -1)


def _batch(cifar_small, n=32):
    _, (x, y) = cifar_small
    return x[:n].astype("float32"), y[:n]


def _check_budget(adv, x, epsilon):
    adv = np.asarray(adv)
    assert adv.dtype == np.float32 and adv.shape == x.shape
    assert np.max(np.abs(adv - x)) <= epsilon + 1e-3
    assert adv.min() >= 0.0 and adv.max() <= 255.0


# ---------------------------------------------------------------- losses and helpers

def _dlr_by_definition(z, y, t=None):
    """DLR written out from the paper's formula, one sample at a time."""
    out = []
    for row, label, target in zip(z, y, t if t is not None else y):
        desc = sorted(row, reverse=True)
        if t is None:
            best_other = max(v for i, v in enumerate(row) if i != label)
            out.append(-(row[label] - best_other) / (desc[0] - desc[2] + 1e-12))
        else:
            out.append(-(row[label] - row[target])
                       / (desc[0] - (desc[2] + desc[3]) / 2 + 1e-12))
    return np.array(out)


def test_dlr_loss_hand_example():
    logits = tf.constant([[3.0, 1.0, 2.0, 0.5], [3.0, 1.0, 2.0, 0.5]])
    # Row 0, label 0 (correct): -(3 - 2) / (3 - 1); row 1, label 2: -(2 - 3) / (3 - 1).
    np.testing.assert_allclose(dlr_loss(logits, tf.constant([0, 2])).numpy(),
                               [-0.5, 0.5], rtol=1e-6)
    # Label 0, target 3: -(3 - 0.5) / (3 - (1 + 0.5) / 2).
    np.testing.assert_allclose(
        targeted_dlr_loss(logits[:1], tf.constant([0]), tf.constant([3])).numpy(),
        [-2.5 / 2.25], rtol=1e-6)


def test_dlr_loss_matches_definition_and_is_scale_invariant():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 10)).astype(np.float32) * 3
    y = rng.integers(0, 10, 64)
    t = (y + rng.integers(1, 10, 64)) % 10
    np.testing.assert_allclose(dlr_loss(z, y).numpy(), _dlr_by_definition(z, y),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targeted_dlr_loss(z, y, t).numpy(),
                               _dlr_by_definition(z, y, t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dlr_loss(7 * z + 11, y).numpy(), dlr_loss(z, y).numpy(),
                               rtol=1e-4, atol=1e-5)
    # Positive exactly when misclassified.
    np.testing.assert_array_equal(dlr_loss(z, y).numpy() > 0, np.argmax(z, -1) != y)


def test_dlr_needs_enough_classes():
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss(tf.zeros([2, 2]), tf.constant([0, 1]))
    with pytest.raises(ValueError, match="4 classes"):
        targeted_dlr_loss(tf.zeros([2, 3]), tf.constant([0, 1]), tf.constant([1, 2]))


def test_top_k_targets_never_the_label():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 10)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    y[:50] = np.argmax(z[:50], -1)  # label is the top class
    z[50:60] = 0.0  # all tied
    z[60:70] = -np.inf  # all tied at -inf
    for k in (1, 3, 9):
        targets = top_k_targets(z, y, k).numpy()
        assert targets.shape == (200, k) and targets.dtype == np.int32
        assert not np.any(targets == y[:, None])
        assert all(len(set(row)) == k for row in targets)
        picked = np.take_along_axis(z, targets, 1)
        assert np.all(np.diff(picked[:50], axis=1) <= 0)  # decreasing logits
        # Every other class with a strictly higher logit than the k-th pick is picked.
        for row, label, chosen in zip(z[:50], y[:50], targets[:50]):
            others = [c for c in range(10) if c != label]
            assert set(chosen) == set(sorted(others, key=lambda c: -row[c])[:k])
    with pytest.raises(ValueError, match="k"):
        top_k_targets(z, y, 10)


def test_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then 1.05): w_j = ceil(p_j * 100).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 5, 17, 40, 1000):
        points = checkpoints(n)
        assert points == sorted(set(points)) and 1 <= points[0] and points[-1] <= n
        assert points[0] == math.ceil(0.22 * n - 1e-9)


# ---------------------------------------------------------------- analytic worst case

def _binaryish_linear_problem(num_images=48, epsilon=8.0):
    """A 4-class linear model where classes 2, 3 never matter, and images whose
    analytic worst margin is known: max_{|d|<=eps} (z_o - z_y)(x + d) =
    (z_o - z_y)(x) + eps * ||w_o - w_y||_1, o the other of classes 0, 1."""
    rng = np.random.default_rng(2)
    dim = 4 * 4 * 3
    w = np.zeros((dim, 4), np.float32)
    w[:, 0] = rng.normal(size=dim) * 0.01
    w[:, 1] = w[:, 0] + rng.choice([-1, 1], dim) * rng.uniform(0.005, 0.015, dim)
    x = rng.uniform(60, 195, (num_images, 4, 4, 3)).astype(np.float32)
    diff = x.reshape(num_images, -1) @ (w[:, 1] - w[:, 0])
    b = np.array([0.0, -np.median(diff), -1e3, -1e3], np.float32)
    w_t, b_t = tf.constant(w), tf.constant(b)

    def logits_fn(images):
        return tf.reshape(images, [tf.shape(images)[0], -1]) @ w_t + b_t

    logits = x.reshape(num_images, -1).astype(np.float64) @ w + b
    y = np.argmax(logits[:, :2], -1)
    y[:4] = 1 - y[:4]  # a few images misclassified clean
    other = 1 - y
    l1 = np.abs(w[:, 1] - w[:, 0]).astype(np.float64).sum()
    worst = logits[np.arange(num_images), other] - logits[np.arange(num_images), y]
    worst = worst + epsilon * l1
    return logits_fn, x, y, worst, epsilon * l1


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr", "apgd-t"])
def test_reaches_the_analytic_worst_case_of_a_linear_model(attack):
    logits_fn, x, y, worst, reach = _binaryish_linear_problem()
    gap = 0.02 * reach
    breakable, safe = worst > gap, worst < -gap
    clean_correct = _predict(logits_fn, x) == y
    assert np.sum(breakable & clean_correct) >= 8 and np.sum(safe) >= 8
    if attack == "apgd-t":
        adv = apgd_targeted(logits_fn, x, y, epsilon=8.0, num_classes=4, num_iter=100,
                            seed=SEED)
    else:
        adv = apgd(logits_fn, x, y, epsilon=8.0, num_iter=100, loss=attack[5:], seed=SEED)
    _check_budget(adv, x, 8.0)
    adv = adv.numpy()
    assert np.all(adv > 0) and np.all(adv < 255)  # clipping to the pixel range never bound
    broken = _predict(logits_fn, adv) != y
    np.testing.assert_array_equal(broken[breakable], True)
    np.testing.assert_array_equal(broken[safe], False)


# ---------------------------------------------------------------- realistic model

def _attacks(num_iter):
    targets = lambda y: random_targets(y, 10, tf.constant([9, 9], tf.int64))  # noqa: E731
    return {
        "ce": lambda f, x, y, s: apgd(f, x, y, epsilon=8.0, num_iter=num_iter, seed=s),
        "dlr": lambda f, x, y, s: apgd(f, x, y, epsilon=8.0, num_iter=num_iter,
                                       loss="dlr", seed=s),
        "ce-targeted": lambda f, x, y, s: apgd(f, x, y, epsilon=8.0, num_iter=num_iter,
                                               targets=targets(y), seed=s),
        "apgd-t": lambda f, x, y, s: apgd_targeted(f, x, y, epsilon=8.0, num_classes=10,
                                                   num_target_classes=3,
                                                   num_iter=num_iter, seed=s),
    }


@pytest.mark.parametrize("name", ["ce", "dlr", "ce-targeted", "apgd-t"])
def test_budget_reproducibility_and_accuracy(trained_linear_model, cifar_small, name):
    x, y = _batch(cifar_small)
    run = _attacks(20)[name]
    adv = run(trained_linear_model, x, y, SEED)
    _check_budget(adv, x, 8.0)
    np.testing.assert_array_equal(adv.numpy(), run(trained_linear_model, x, y, SEED).numpy())
    assert not np.array_equal(adv.numpy(),
                              run(trained_linear_model, x, y, OTHER_SEED).numpy())
    clean_wrong = _predict(trained_linear_model, x) != y
    adv_wrong = _predict(trained_linear_model, adv.numpy()) != y
    assert np.all(adv_wrong[clean_wrong])  # per image: clean-wrong stays wrong
    np.testing.assert_array_equal(adv.numpy()[clean_wrong], x[clean_wrong])
    assert adv_wrong.sum() > clean_wrong.sum()  # the attack does break images


def test_traced_by_the_caller_gives_the_same_points(trained_linear_model, cifar_small):
    x, y = _batch(cifar_small, 16)
    run = lambda xx, yy: apgd(trained_linear_model, xx, yy, epsilon=2.0,  # noqa: E731
                              num_iter=10, loss="dlr", num_restarts=2, seed=SEED)
    np.testing.assert_array_equal(tf.function(run)(x, y).numpy(), run(x, y).numpy())


def test_restarts_only_add_broken_images(trained_linear_model, cifar_small):
    x, y = _batch(cifar_small)
    one = apgd(trained_linear_model, x, y, epsilon=0.5, num_iter=5, seed=SEED).numpy()
    three = apgd(trained_linear_model, x, y, epsilon=0.5, num_iter=5, num_restarts=3,
                 seed=SEED).numpy()
    _check_budget(three, x, 0.5)
    broken_one = _predict(trained_linear_model, one) != y
    broken_three = _predict(trained_linear_model, three) != y
    assert np.all(broken_three[broken_one])
    np.testing.assert_array_equal(three[broken_one], one[broken_one])
    assert not np.all(broken_three)  # a small budget leaves robust images to compare


def test_bad_arguments():
    f = lambda x: tf.zeros([2, 10])  # noqa: E731
    x, y = tf.zeros([2, 4, 4, 3]), tf.constant([0, 1])
    for kwargs, word in [({"epsilon": 0.0}, "epsilon"), ({"num_iter": 0}, "num_iter"),
                         ({"loss": "cw"}, "loss"), ({"num_restarts": 0}, "num_restarts"),
                         ({"rho": 1.5}, "rho"), ({"seed": None}, "seed")]:
        args = {"epsilon": 8.0, "seed": SEED, **kwargs}
        with pytest.raises(ValueError, match=word):
            apgd(f, x, y, **args)
    with pytest.raises(ValueError, match="num_classes"):
        apgd_targeted(f, x, y, epsilon=8.0, num_classes=3, seed=SEED)
    with pytest.raises(ValueError, match="targets"):
        apgd(f, x, y, epsilon=8.0, targets=tf.constant([1, 1]), seed=SEED)
    with pytest.raises(ValueError, match="version"):
        autoattack(f, x, y, epsilon=8.0, num_classes=10, version="rand", seed=SEED)
    with pytest.raises(ValueError, match="num_classes"):
        autoattack(f, x, y, epsilon=8.0, num_classes=3, version="standard", seed=SEED)


# ---------------------------------------------------------------- ensemble

def _check_ensemble(result, model, x, y, epsilon):
    _check_budget(result.adversarial_images, x, epsilon)
    clean_correct = _predict(model, x) == y
    np.testing.assert_array_equal(result.clean_correct.numpy(), clean_correct)
    members = [result.per_attack[m].numpy() for m in result.members]
    np.testing.assert_array_equal(result.robust.numpy(),
                                  clean_correct & np.logical_and.reduce(members))
    accuracy = ensemble_robust_accuracy(result)
    for name, member_accuracy in member_robust_accuracies(result).items():
        assert accuracy <= member_accuracy <= clean_correct.mean()
    robust = result.robust.numpy()
    adv = result.adversarial_images.numpy()
    np.testing.assert_array_equal(_predict(model, adv) == y, robust)
    np.testing.assert_array_equal(adv[robust], x[robust])


def test_fast_ensemble(trained_linear_model, cifar_small):
    x, y = _batch(cifar_small)
    result = autoattack(trained_linear_model, x, y, epsilon=1.0, num_classes=10,
                        version="fast", seed=SEED, num_iter=10)
    assert result.members == ("apgd-ce", "apgd-dlr")
    _check_ensemble(result, trained_linear_model, x, y, 1.0)
    # Member k is the standalone attack with seed fold_in(seed, k).
    alone = apgd(trained_linear_model, x, y, epsilon=1.0, num_iter=10, loss="dlr",
                 seed=fold_in(SEED, 1))
    np.testing.assert_array_equal(result.per_attack["apgd-dlr"].numpy(),
                                  (_predict(trained_linear_model, alone.numpy()) == y)
                                  & result.clean_correct.numpy())
    assert 0 < ensemble_robust_accuracy(result)  # the small budget leaves robust images
    again = autoattack(trained_linear_model, x, y, epsilon=1.0, num_classes=10,
                       version="fast", seed=SEED, num_iter=10, skip_when_all_broken=True)
    np.testing.assert_array_equal(again.adversarial_images.numpy(),
                                  result.adversarial_images.numpy())


def test_standard_ensemble(trained_linear_model, cifar_small):
    x, y = _batch(cifar_small, 16)
    result = autoattack(trained_linear_model, x, y, epsilon=1.0, num_classes=10,
                        version="standard", seed=SEED, num_iter=5, square_queries=30)
    assert result.members == ("apgd-ce", "apgd-t", "square")
    _check_ensemble(result, trained_linear_model, x, y, 1.0)


def test_skip_when_all_broken(trained_linear_model, cifar_small):
    x, y = _batch(cifar_small, 16)
    result = autoattack(trained_linear_model, x, y, epsilon=32.0, num_classes=10,
                        version="fast", seed=SEED, num_iter=10, skip_when_all_broken=True)
    assert not np.any(result.per_attack["apgd-ce"].numpy())  # the first member broke all
    assert result.per_attack["apgd-dlr"] is None
    assert member_robust_accuracies(result)["apgd-dlr"] is None
    assert ensemble_robust_accuracy(result) == 0.0
    assert np.all(_predict(trained_linear_model, result.adversarial_images.numpy()) != y)
