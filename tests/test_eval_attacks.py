"""Evaluation attacks: Square, MI-FGSM, CW-L-inf and the PGD-N curve on a real model."""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.attacks.iterative import class_margin, cw_linf, mi_fgsm, pgd_curve
from efficientnet_advprop.attacks.pgd import linf_attack, random_targets
from efficientnet_advprop.attacks.square import square_attack, square_p

SEED = tf.constant([3, 4], tf.int64)
OTHER_SEED = tf.constant([3, 5], tf.int64)
EPS = 8.0


@pytest.fixture(scope="module")
def batch(cifar_small):
    """48 held-out CIFAR-10 images (float32, 0..255) and labels."""
    _, (x, y) = cifar_small
    return x[:48].astype("float32"), y[:48].astype("int32")


@pytest.fixture(scope="module")
def logits_fn(trained_linear_model):
    return lambda x: trained_linear_model(x, training=False)


def _predict(logits_fn, x):
    return np.argmax(np.asarray(logits_fn(x)), -1)


def _run(name, logits_fn, x, y, seed, targets=None):
    """Each attack at a small, fast setting; returns float32 numpy images."""
    if name == "square":
        out = square_attack(logits_fn, x, y, epsilon=EPS, num_queries=60, seed=seed,
                            targets=targets)
    elif name == "mi_fgsm":
        out = mi_fgsm(logits_fn, x, y, epsilon=EPS, num_iter=5, targets=targets)
    elif name == "cw_linf":
        out = cw_linf(logits_fn, x, y, epsilon=EPS, num_iter=5, seed=seed, targets=targets)
    else:
        out = pgd_curve(logits_fn, x, y, epsilon=EPS, step_size=2.0, iterations=(2, 5),
                        seed=seed, targets=targets)["adversarial_images"]
    assert out.dtype == tf.float32
    return out.numpy()


ATTACKS = ["square", "mi_fgsm", "cw_linf", "pgd_curve"]
RANDOM_ATTACKS = ["square", "cw_linf", "pgd_curve"]


@pytest.mark.parametrize("name", ATTACKS)
def test_in_ball_pixel_range_reproducible_and_not_above_clean_accuracy(
        logits_fn, batch, name):
    x, y = batch
    adv = _run(name, logits_fn, x, y, SEED)
    assert adv.shape == x.shape
    assert np.max(np.abs(adv - x)) <= EPS + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    np.testing.assert_array_equal(adv, _run(name, logits_fn, x, y, SEED))
    clean_right = _predict(logits_fn, x) == y
    adv_right = _predict(logits_fn, adv) == y
    assert clean_right.mean() > 0.2  # the model learned something to attack
    assert adv_right.mean() < clean_right.mean(), (name, clean_right.mean(), adv_right.mean())


@pytest.mark.parametrize("name", RANDOM_ATTACKS)
def test_random_attacks_depend_on_the_seed(logits_fn, batch, name):
    x, y = batch
    assert not np.array_equal(_run(name, logits_fn, x, y, SEED),
                              _run(name, logits_fn, x, y, OTHER_SEED))


@pytest.mark.parametrize("name", ATTACKS)
def test_targeted_attacks_refuse_the_true_class_and_reach_targets(logits_fn, batch, name):
    x, y = batch
    targets = random_targets(y, 10, SEED).numpy()
    assert not np.any(targets == y)
    with pytest.raises(ValueError, match="targets"):
        _run(name, logits_fn, x, y, SEED, targets=y)
    clean_hits = np.mean(_predict(logits_fn, x) == targets)
    adv = _run(name, logits_fn, x, y, SEED, targets=targets)
    assert np.max(np.abs(adv - x)) <= EPS + 1e-4
    assert np.mean(_predict(logits_fn, adv) == targets) > clean_hits


def test_mi_fgsm_without_momentum_is_ifgsm(logits_fn, batch):
    x, y = batch
    step = EPS / 4
    for targets in (None, random_targets(y, 10, SEED)):
        ifgsm = linf_attack(logits_fn, x, y, epsilon=EPS, step_size=step, num_iter=4,
                            random_start=False, targets=targets).numpy()
        no_momentum = mi_fgsm(logits_fn, x, y, epsilon=EPS, num_iter=4, decay=0.0,
                              targets=targets).numpy()
        np.testing.assert_array_equal(no_momentum, ifgsm)
    # The momentum path really is used: with decay 1 the untargeted result differs.
    ifgsm = linf_attack(logits_fn, x, y, epsilon=EPS, step_size=step, num_iter=4,
                        random_start=False).numpy()
    with_momentum = mi_fgsm(logits_fn, x, y, epsilon=EPS, num_iter=4, decay=1.0).numpy()
    assert not np.array_equal(with_momentum, ifgsm)


def test_cw_confidence_clamp_stops_images_past_the_margin(logits_fn, batch):
    x, y = batch
    # With a tiny confidence an image stops moving as soon as it is misclassified by
    # more than it, so clean-misclassified images with a wide margin never move.
    wrong_margin = -class_margin(logits_fn(x), y).numpy()
    adv = cw_linf(logits_fn, x, y, epsilon=EPS, num_iter=3, confidence=1e-3,
                  random_start=False).numpy()
    frozen = wrong_margin > 1e-3
    assert frozen.any()
    np.testing.assert_array_equal(adv[frozen], x[frozen])
    assert np.any(np.abs(adv[~frozen] - x[~frozen]) > 0)


def test_square_queries_margin_and_stripes(logits_fn, batch):
    x, y = batch
    budget = 80
    init = square_attack(logits_fn, x, y, epsilon=EPS, num_queries=1, seed=SEED).numpy()
    adv, queries = square_attack(logits_fn, x, y, epsilon=EPS, num_queries=budget,
                                 seed=SEED, return_queries=True)
    adv, queries = adv.numpy(), queries.numpy()
    clean_right = _predict(logits_fn, x) == y
    # Misclassified images are not attacked; the others start at vertical stripes.
    np.testing.assert_array_equal(adv[~clean_right], x[~clean_right])
    assert np.all(queries[~clean_right] == 0)
    delta = init[clean_right] - x[clean_right]
    unclipped = (init[clean_right] > 0) & (init[clean_right] < 255)
    np.testing.assert_allclose(np.abs(delta[unclipped]), EPS, atol=1e-4)
    column_sign = np.sign(np.sum(delta, axis=1, keepdims=True))
    assert np.all((np.sign(delta) == column_sign) | ~unclipped)
    # Budget, monotone margin, and stopping exactly when broken.
    assert queries.max() <= budget and queries[clean_right].min() >= 1
    margin_init = class_margin(logits_fn(init), y).numpy()[clean_right]
    margin_adv = class_margin(logits_fn(adv), y).numpy()[clean_right]
    assert np.all(margin_adv <= margin_init + 1e-4)
    assert np.any(margin_adv < margin_init - 1e-3)
    still_right = margin_adv > 1e-4
    assert np.all(queries[clean_right][still_right] == budget)
    assert np.all(margin_adv[queries[clean_right] < budget] <= 1e-4)
    assert still_right.mean() < 1.0


def test_square_schedule_follows_the_published_halvings():
    p = lambda k, n: float(square_p(0.8, k, n))  # noqa: E731
    assert p(0, 10000) == pytest.approx(0.8) and p(10, 10000) == pytest.approx(0.8)
    assert p(11, 10000) == pytest.approx(0.4) and p(50, 10000) == pytest.approx(0.4)
    assert p(2001, 10000) == pytest.approx(0.8 / 64)
    assert p(9999, 10000) == pytest.approx(0.8 / 512)
    # 400 queries: iteration k behaves like k * 25 of the 10,000-query schedule.
    assert p(0, 400) == pytest.approx(0.8) and p(1, 400) == pytest.approx(0.4)
    assert p(2, 400) == pytest.approx(0.4) and p(3, 400) == pytest.approx(0.2)
    assert p(399, 400) == pytest.approx(0.8 / 512)


def test_loops_trace_the_model_once(trained_linear_model, batch):
    x, y = batch
    calls = []

    def counting_fn(images):
        calls.append(1)
        return trained_linear_model(images, training=False)

    square_attack(counting_fn, x[:8], y[:8], epsilon=EPS, num_queries=40, seed=SEED)
    assert len(calls) <= 4  # clean check, init, one loop body: not 40 copies
    calls.clear()
    pgd_curve(counting_fn, x[:8], y[:8], epsilon=EPS, step_size=1.0, iterations=(10, 60),
              seed=SEED)
    assert len(calls) <= 4  # clean check, one loop body, final iterate


def test_same_result_eager_and_inside_a_tf_function(logits_fn, batch):
    x, y = batch[0][:16], batch[1][:16]

    def both(y, seed):
        square = square_attack(logits_fn, x, y, epsilon=EPS, num_queries=20, seed=seed)
        curve = pgd_curve(logits_fn, x, y, epsilon=EPS, step_size=1.0, iterations=(3, 6),
                          seed=seed)
        return square, curve["adversarial_images"], curve["correct_at"]

    for eager, graph in zip(both(y, SEED), tf.function(both)(y, SEED)):
        np.testing.assert_array_equal(eager.numpy(), graph.numpy())
    # Inside a graph the target guard can only fail at run time.
    with pytest.raises(tf.errors.InvalidArgumentError, match="targets"):
        tf.function(lambda t: cw_linf(logits_fn, x, y, epsilon=EPS, num_iter=2, seed=SEED,
                                      targets=t))(tf.constant(y))


def test_pgd_curve_monotone_prefix_consistent_and_effective(logits_fn, batch):
    x, y = batch
    targets = random_targets(y, 10, SEED)
    kwargs = dict(epsilon=EPS, step_size=1.0, seed=SEED, targets=targets)
    long = pgd_curve(logits_fn, x, y, iterations=(5, 10, 20), **kwargs)
    short = pgd_curve(logits_fn, x, y, iterations=(5, 10), **kwargs)
    correct = long["correct_at"].numpy()
    assert correct.shape == (3, len(y)) and correct.dtype == bool
    clean_right = _predict(logits_fn, x) == y
    # More iterations never help the model, and nothing beats the clean image.
    assert np.all(correct[1:] <= correct[:-1])
    assert np.all(correct[0] <= clean_right)
    np.testing.assert_array_equal(short["correct_at"].numpy(), correct[:2])
    assert correct[-1].mean() < clean_right.mean()
    # The returned image is the final iterate for robust images, a fooling one otherwise.
    adv = long["adversarial_images"].numpy()
    np.testing.assert_array_equal(_predict(logits_fn, adv) == y, correct[-1])
    assert np.max(np.abs(adv - x)) <= EPS + 1e-4


def test_pgd_curve_counts_the_running_worst_case():
    """A model fooled only while the mean shift is in (2.5, 4.5): PGD walks +1 per step
    through that band and out again; images stay counted as broken once fooled."""

    @tf.custom_gradient
    def band_logits(x):
        shift = tf.reduce_mean(x - 100.0, axis=[1, 2, 3])
        fooled = tf.cast((shift > 2.5) & (shift < 4.5), tf.float32)
        logits = tf.stack([1.0 - 2.0 * fooled, tf.zeros_like(fooled)], axis=-1)

        def grad(upstream):  # always "increase every pixel"
            return tf.ones_like(x) * tf.reshape(tf.reduce_sum(tf.abs(upstream), -1),
                                                [-1, 1, 1, 1])

        return logits, grad

    x = np.full([1, 4, 4, 3], 100.0, np.float32)
    y = np.zeros([1], np.int32)
    out = pgd_curve(band_logits, x, y, epsilon=16.0, step_size=1.0, iterations=(2, 4, 8),
                    seed=SEED, random_start=False)
    assert out["correct_at"].numpy()[:, 0].tolist() == [True, False, False]
    assert _predict(band_logits, x + 8.0)[0] == 0  # the 8th iterate alone looks robust
    np.testing.assert_array_equal(out["adversarial_images"].numpy(), x + 3.0)


def test_bad_arguments_name_the_argument(logits_fn, batch):
    x, y = batch
    with pytest.raises(ValueError, match="num_queries"):
        square_attack(logits_fn, x, y, epsilon=EPS, num_queries=0, seed=SEED)
    with pytest.raises(ValueError, match="p_init"):
        square_attack(logits_fn, x, y, epsilon=EPS, p_init=1.5, seed=SEED)
    with pytest.raises(ValueError, match="epsilon"):
        mi_fgsm(logits_fn, x, y, epsilon=0.0)
    with pytest.raises(ValueError, match="seed"):
        cw_linf(logits_fn, x, y, epsilon=EPS)
    with pytest.raises(ValueError, match="iterations"):
        pgd_curve(logits_fn, x, y, epsilon=EPS, step_size=1.0, iterations=(10, 5), seed=SEED)
