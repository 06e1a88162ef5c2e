"""Tests for the in-graph batch augmentations: mixing (Mixup/CutMix), TDA, DeepAugment-style."""


import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.data import deepaugment
from efficientnet_advprop.data import mixing
from efficientnet_advprop.data import tda

SEED = (7, -3)  # a negative word on purpose: eager and XLA must still agree


def _seed(a, b=0):
    return tf.constant([a, b], tf.int32)


def _distinct_images(n, size=32):
    """n images, image i constant 20 * i + 5 everywhere (pairwise different at every pixel)."""
    values = np.arange(n, dtype=np.float32) * 20.0 + 5.0
    return tf.constant(np.broadcast_to(values[:, None, None, None], (n, size, size, 3)).copy())


def _smooth_images(n, seed=0, size=32):
    """Natural-like test images: a random 4x4 colour layout upsampled, plus mild noise."""
    coarse = tf.random.stateless_uniform([n, 4, 4, 3], [seed, 1]) * 255.0
    fine = tf.image.resize(coarse, [size, size], "bilinear")
    noise = tf.random.stateless_normal([n, size, size, 3], [seed, 2]) * 8.0
    return tf.clip_by_value(fine + noise, 0.0, 255.0)


def _ramp_image(n, size=32):
    """R encodes the column (8 * x + 4), G the row (8 * y + 4), B constant 128."""
    coords = np.arange(size, dtype=np.float32) * 8.0 + 4.0
    image = np.zeros((size, size, 3), np.float32)
    image[..., 0] = coords[None, :]
    image[..., 1] = coords[:, None]
    image[..., 2] = 128.0
    return tf.constant(np.broadcast_to(image, (n, size, size, 3)).copy())


# ---------------------------------------------------------------------------
# Random helpers.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_beta_sampler_moments(alpha):
    lam = mixing.stateless_beta([20000], alpha, alpha, _seed(1, int(alpha * 10))).numpy()
    assert lam.dtype == np.float32 and lam.min() >= 0.0 and lam.max() <= 1.0
    assert abs(lam.mean() - 0.5) < 0.01
    expected_var = 1.0 / (4.0 * (2.0 * alpha + 1.0))
    assert abs(lam.var() / expected_var - 1.0) < 0.06


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_gamma_sampler_moments(alpha):
    g = np.exp(mixing.stateless_log_gamma([20000], alpha, _seed(2)).numpy().astype(np.float64))
    assert abs(g.mean() / alpha - 1.0) < 0.03
    assert abs(g.var() / alpha - 1.0) < 0.08


def test_permutation_and_seed_canonicalisation():
    perms = [mixing.stateless_permutation(16, _seed(s, -s)).numpy() for s in range(4)]
    for p in perms:
        np.testing.assert_array_equal(np.sort(p), np.arange(16))
    assert len({tuple(p) for p in perms}) == 4
    canon = mixing.canonical_seed(tf.constant([-1, 2**40 + 5], tf.int64)).numpy()
    assert canon.dtype == np.int32 and (canon >= 0).all()
    kept = mixing.canonical_seed(tf.constant([3, 2**31 - 1])).numpy()
    np.testing.assert_array_equal(kept, [3, 2**31 - 1])  # non-negative int32 words unchanged
    words = [0, 1, 5, -1, -2, -5, 2**40, 2**40 + 5, -(2**40)]
    mapped = [int(mixing.canonical_seed(tf.constant([w, 0], tf.int64))[0]) for w in words]
    assert len(set(mapped)) == len(words)
    with pytest.raises(ValueError):
        mixing.canonical_seed(tf.constant([1.0, 2.0]))


# ---------------------------------------------------------------------------
# Mixup.
# ---------------------------------------------------------------------------
def test_mixup_matches_its_labels():
    n = 6
    x = _smooth_images(n, seed=3)
    labels = tf.range(n)
    checked = 0
    for s in range(4):
        mixed, soft = mixing.mixup(x, labels, n, 1.0, _seed(s))
        mixed, soft = mixed.numpy(), soft.numpy()
        assert mixed.shape == (n, 32, 32, 3) and mixed.dtype == np.float32
        assert soft.shape == (n, n) and soft.dtype == np.float32
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        # Recover the partner and lam of each image from its soft label.
        lams, perm = [], []
        for i in range(n):
            others = [j for j in range(n) if j != i and soft[i, j] > 0]
            if not others:  # paired with itself: unchanged
                perm.append(i)
                np.testing.assert_allclose(mixed[i], x[i].numpy(), atol=1e-4)
                continue
            assert len(others) == 1
            perm.append(others[0])
            lams.append(soft[i, i])
        assert sorted(perm) == list(range(n))  # a permutation
        assert lams and np.ptp(lams) < 1e-6  # one lambda per batch
        lam = lams[0]
        expected = lam * x.numpy() + (1.0 - lam) * x.numpy()[perm]
        np.testing.assert_allclose(mixed, expected, atol=1e-3)
        checked += 1
    assert checked == 4
    # Soft input labels give the same result as int labels.
    a = mixing.mixup(x, labels, n, 0.4, _seed(9))
    b = mixing.mixup(x, tf.one_hot(labels, n), n, 0.4, _seed(9))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())


def test_mixup_determinism():
    x = _smooth_images(4)
    y = tf.constant([0, 1, 2, 3])
    a = mixing.mixup(x, y, 10, 0.5, _seed(5))
    b = mixing.mixup(x, y, 10, 0.5, _seed(5))
    c = mixing.mixup(x, y, 10, 0.5, _seed(6))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[1].numpy(), c[1].numpy())
    with pytest.raises(ValueError):
        mixing.mixup(x, y, 10, 0.0, _seed(5))


# ---------------------------------------------------------------------------
# CutMix.
# ---------------------------------------------------------------------------
def test_cutmix_label_weight_is_pasted_fraction():
    n = 5
    x = _distinct_images(n).numpy()
    fractions = set()
    clipped = unclipped = False
    for s in range(30):
        mixed, soft = mixing.cutmix(x, tf.range(n), n, 1.0, _seed(s, 1))
        mixed, soft = mixed.numpy(), soft.numpy()
        assert mixed.shape == x.shape and mixed.dtype == np.float32
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        boxes = []
        for i in range(n):
            changed = mixed[i, :, :, 0] != x[i, :, :, 0]
            fraction = changed.mean()
            partner = int(np.argmax(np.where(np.arange(n) == i, -1.0, soft[i])))
            if soft[i, i] == 1.0:  # paired with itself
                assert fraction == 0.0
                continue
            # The label weight of the partner is exactly the pasted-pixel fraction.
            assert soft[i, partner] == pytest.approx(fraction, abs=1e-6)
            assert soft[i, i] == pytest.approx(1.0 - fraction, abs=1e-6)
            if changed.any():
                np.testing.assert_array_equal(mixed[i][changed], x[partner][changed])
                rows, cols = np.nonzero(changed)
                box = (rows.min(), rows.max(), cols.min(), cols.max())
                # A filled rectangle, the same for every image of the batch.
                assert changed.sum() == (box[1] - box[0] + 1) * (box[3] - box[2] + 1)
                boxes.append(box)
                at_border = box[0] == 0 or box[2] == 0 or box[1] == 31 or box[3] == 31
                clipped |= at_border
                if not at_border:  # [c - side // 2, c + side // 2): even sides, square
                    side = box[1] - box[0] + 1
                    assert side % 2 == 0 and side == box[3] - box[2] + 1
                    unclipped = True
            fractions.add(round(float(fraction), 6))
        assert len(set(boxes)) <= 1
    assert len(fractions - {0.0}) >= 5  # the test saw many different boxes
    assert clipped and unclipped


def test_cutmix_determinism():
    x = _smooth_images(4)
    y = tf.constant([0, 1, 2, 3])
    a = mixing.cutmix(x, y, 4, 1.0, _seed(5))
    b = mixing.cutmix(x, y, 4, 1.0, _seed(5))
    c = mixing.cutmix(x, y, 4, 1.0, _seed(8))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


# ---------------------------------------------------------------------------
# mix_batch.
# ---------------------------------------------------------------------------
def test_mix_batch_dispatch():
    x = _smooth_images(4)
    y = tf.constant([3, 1, 0, 2])
    images, soft = mixing.mix_batch(x, y, 5, seed=_seed(1))
    np.testing.assert_array_equal(images.numpy(), x.numpy())
    np.testing.assert_array_equal(soft.numpy(), tf.one_hot(y, 5).numpy())
    soft_in = tf.constant(np.full((4, 5), 0.2, np.float32))
    np.testing.assert_array_equal(mixing.mix_batch(x, soft_in, 5, seed=_seed(1))[1].numpy(),
                                  soft_in.numpy())

    seen = set()
    for s in range(12):
        only_mixup = mixing.mix_batch(x, y, 5, mixup_alpha=0.5, seed=_seed(s))
        only_cutmix = mixing.mix_batch(x, y, 5, cutmix_alpha=1.0, seed=_seed(s))
        assert not np.array_equal(only_mixup[0].numpy(), only_cutmix[0].numpy())
        both = mixing.mix_batch(x, y, 5, mixup_alpha=0.5, cutmix_alpha=1.0, seed=_seed(s))
        for name, ref in (("mixup", only_mixup), ("cutmix", only_cutmix)):
            if np.array_equal(both[0].numpy(), ref[0].numpy()):
                np.testing.assert_array_equal(both[1].numpy(), ref[1].numpy())
                seen.add(name)
        always_cutmix = mixing.mix_batch(x, y, 5, mixup_alpha=0.5, cutmix_alpha=1.0,
                                         switch_prob=1.0, seed=_seed(s))
        np.testing.assert_array_equal(always_cutmix[0].numpy(), only_cutmix[0].numpy())
        never_cutmix = mixing.mix_batch(x, y, 5, mixup_alpha=0.5, cutmix_alpha=1.0,
                                        switch_prob=0.0, seed=_seed(s))
        np.testing.assert_array_equal(never_cutmix[0].numpy(), only_mixup[0].numpy())
    assert seen == {"mixup", "cutmix"}

    for kwargs in ({"mixup_alpha": -0.1}, {"cutmix_alpha": -1.0}, {"switch_prob": 1.5},
                   {"mixup_alpha": float("nan")}):
        with pytest.raises(ValueError):
            mixing.mix_batch(x, y, 5, seed=_seed(1), **kwargs)


# ---------------------------------------------------------------------------
# TDA.
# ---------------------------------------------------------------------------
def test_tda_shape_range_determinism_variety():
    x = _smooth_images(8, seed=4)
    out = tda.texture_debiased_augment(x, _seed(1))
    assert out.shape == x.shape and out.dtype == tf.float32
    out = out.numpy()
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(out, tda.texture_debiased_augment(x, _seed(1)).numpy())
    assert not np.array_equal(out, tda.texture_debiased_augment(x, _seed(2)).numpy())
    # The same image repeated over the batch is augmented differently per image.
    same = tf.repeat(x[:1], 8, axis=0)
    aug = tda.texture_debiased_augment(same, _seed(3)).numpy()
    assert len({aug[i].tobytes() for i in range(8)}) == 8


def test_tda_params_distribution():
    p = {k: v.numpy() for k, v in tda.sample_tda_params(1024, 32, 32, _seed(11)).items()}
    top, left, h, w = p["box"].T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    frac = h * w / 1024.0
    # w, h are rounded from sqrt(area * ratio), sqrt(area / ratio): allow the rounding.
    slack = 0.5 * (h + w) / 1024.0
    assert (frac >= 0.64 - slack).all() and frac.min() < 0.68 and frac.max() == 1.0
    assert (w / h >= 0.75 - 1.0 / h).all() and (w / h <= 4.0 / 3.0 + 1.0 / h).all()
    assert abs(p["flip"].mean() - 0.5) < 0.06
    assert abs(p["jitter"].mean() - 0.4) < 0.06
    assert abs(p["gray"].mean() - 0.1) < 0.04
    # Grayscale and jitter share the colour-distortion coin (P(both) = 0.5 * 0.8 * 0.2).
    assert abs((p["jitter"] & p["gray"]).mean() - 0.08) < 0.03
    f = p["factors"]
    assert (f[:, :3] >= 0.2).all() and (f[:, :3] <= 1.8).all()
    assert (np.abs(f[:, 3]) <= 0.2).all() and f[:, 3].min() < -0.18 and f[:, 3].max() > 0.18
    # Wide images: no attempt fits (h would exceed 16), torchvision's centred fallback.
    wide = tda.sample_tda_params(6, 16, 48, _seed(1))["box"].numpy()
    np.testing.assert_array_equal(wide, np.tile([[0, 13, 16, 21]], (6, 1)))
    # Image i's decisions do not depend on the batch size.
    small = tda.sample_tda_params(4, 32, 32, _seed(11))
    for key, value in small.items():
        np.testing.assert_array_equal(value.numpy(), p[key][:4])


def test_resized_crops_matches_tf_resize():
    x = _smooth_images(3, seed=5)
    full = tda.resized_crops(x, tf.constant([[0, 0, 32, 32]] * 3), tf.zeros([3], tf.bool))
    np.testing.assert_array_equal(full.numpy(), x.numpy())
    boxes = tf.constant([[3, 1, 25, 29], [0, 7, 32, 21], [10, 10, 22, 22]])
    flips = tf.constant([False, True, False])
    out = tda.resized_crops(x, boxes, flips).numpy()
    for i, (t, l, h, w) in enumerate(boxes.numpy()):
        ref = tf.image.resize(x[i, t:t + h, l:l + w], [32, 32], "bilinear").numpy()
        if flips[i]:
            ref = ref[:, ::-1]
        np.testing.assert_allclose(out[i], ref, atol=1e-3)


def test_tda_colour_ops_fire_or_not():
    x = _smooth_images(16, seed=6)
    seed = _seed(21)
    p = tda.sample_tda_params(16, 32, 32, seed)
    out = tda.texture_debiased_augment(x, seed).numpy()
    crops = tda.resized_crops(x, p["box"], p["flip"]).numpy()
    jitter, gray = p["jitter"].numpy(), p["gray"].numpy()
    plain = ~jitter & ~gray
    assert plain.any() and jitter.any() and gray.any()
    np.testing.assert_array_equal(out[plain], crops[plain])
    for i in np.nonzero(jitter)[0]:
        assert np.abs(out[i] - crops[i]).mean() > 1.0
    for i in np.nonzero(gray)[0]:
        np.testing.assert_array_equal(out[i, ..., 0], out[i, ..., 1])
        np.testing.assert_array_equal(out[i, ..., 0], out[i, ..., 2])
    for i in np.nonzero(~gray)[0]:
        assert not np.array_equal(out[i, ..., 0], out[i, ..., 1])


def test_tda_colour_jitter_reference():
    """ColorJitter semantics (fixed order brightness, contrast, saturation, hue)."""
    x = _smooth_images(2, seed=7)
    factors = np.array([[1.3, 0.6, 1.5, 0.15], [0.5, 1.7, 0.3, -0.2]], np.float32)
    params = {
        "box": tf.constant([[0, 0, 32, 32]] * 2),
        "flip": tf.constant([False, False]),
        "jitter": tf.constant([True, True]),
        "gray": tf.constant([False, False]),
        "factors": tf.constant(factors),
    }
    out = tda.apply_tda(x, params).numpy()
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    for i, (b, c, s, hue) in enumerate(factors):
        img = x[i].numpy() / 255.0
        img = np.clip(img * b, 0, 1)
        img = np.clip(c * img + (1 - c) * (img @ luma).mean(), 0, 1)
        img = np.clip(s * img + (1 - s) * (img @ luma)[..., None], 0, 1)
        img = tf.image.adjust_hue(img, hue).numpy()
        np.testing.assert_allclose(out[i], np.clip(img, 0, 1) * 255.0, atol=0.05)


def test_tda_flip_and_crop_scale_on_ramp_image():
    n = 32
    x = _ramp_image(n)
    seed = _seed(31)
    p = {k: v.numpy() for k, v in tda.sample_tda_params(n, 32, 32, seed).items()}
    out = tda.texture_debiased_augment(x, seed).numpy()
    plain = ~p["jitter"] & ~p["gray"]
    flips = p["flip"][plain]
    assert flips.any() and (~flips).any()
    for i in np.nonzero(plain)[0]:
        red = out[i, 0, :, 0]
        steps = np.diff(red)
        if p["flip"][i]:
            assert (steps <= 1e-4).all() and red[0] > red[-1]
        else:
            assert (steps >= -1e-4).all() and red[0] < red[-1]
        # The visible source region, read back from the ramps (bilinear samples of a
        # linear ramp; the extreme samples are clamped to the crop's edge pixels).
        w = (red.max() - red.min()) / 8.0 + 1.0
        h = (out[i, :, 0, 1].max() - out[i, :, 0, 1].min()) / 8.0 + 1.0
        top, left, bh, bw = p["box"][i]
        assert w == pytest.approx(bw, abs=1e-3) and h == pytest.approx(bh, abs=1e-3)
        assert red.min() == pytest.approx(8.0 * left + 4.0, abs=1e-3)
        assert h * w / 1024.0 >= 0.6  # scale 0.64 minus rounding of h and w


# ---------------------------------------------------------------------------
# DeepAugment-style.
# ---------------------------------------------------------------------------
def test_deep_augment_magnitude_and_identity():
    x = _smooth_images(8, seed=8)
    changes = []
    for s in range(5):
        out = deepaugment.deep_augment(x, _seed(s, 3))
        assert out.shape == x.shape and out.dtype == tf.float32
        out = out.numpy()
        assert out.min() >= 0.0 and out.max() <= 255.0
        change = np.abs(out - x.numpy()).mean()
        assert 5.0 <= change <= 40.0, change
        changes.append(change)
    np.testing.assert_array_equal(deepaugment.deep_augment(x, _seed(0, 3), strength=0.0).numpy(),
                                  x.numpy())
    weaker = [np.abs(deepaugment.deep_augment(x, _seed(s, 3), strength=0.5).numpy()
                     - x.numpy()).mean() for s in range(5)]
    assert np.mean(weaker) < 0.8 * np.mean(changes)
    with pytest.raises(ValueError):
        deepaugment.deep_augment(x, _seed(0), strength=-1.0)


def test_deep_augment_determinism_and_plain_tensors():
    x = _smooth_images(2, seed=9)
    a = deepaugment.deep_augment(x, _seed(4)).numpy()
    np.testing.assert_array_equal(a, deepaugment.deep_augment(x, _seed(4)).numpy())
    assert np.abs(a - deepaugment.deep_augment(x, _seed(5)).numpy()).mean() > 1.0
    net = deepaugment.random_network(_seed(4))
    assert len(net) == 3
    for w, b in net:
        assert isinstance(w, tf.Tensor) and not isinstance(w, tf.Variable)
        assert isinstance(b, tf.Tensor) and not isinstance(b, tf.Variable)
    # Different seeds give different networks built on the same fixed base weights.
    other = deepaugment.random_network(_seed(5))
    assert not np.array_equal(net[2][0].numpy(), other[2][0].numpy())
    base = deepaugment.random_network(_seed(6), strength=0.0)
    base2 = deepaugment.random_network(_seed(7), strength=0.0)
    for (w1, _), (w2, _) in zip(base[:2], base2[:2]):
        w1, w2 = w1.numpy(), w2.numpy()
        both = (w1 != 0) & (w2 != 0)  # filters that neither call zeroed
        assert both.mean() > 0.5
        # Same base weights, up to each call's sign flips and norm rescaling.
        ratio = np.abs(w1[both]) / np.abs(w2[both])
        assert np.ptp(ratio) < 1e-4 * ratio.mean()
    assert not np.any(base[2][0].numpy())  # zero residual branch: identity


# ---------------------------------------------------------------------------
# XLA: everything compiles and agrees with eager mode.
# ---------------------------------------------------------------------------
def _all_augmentations(images, labels, seed):
    mixed, mixed_labels = mixing.mixup(images, labels, 10, 0.4, seed)
    cut, cut_labels = mixing.cutmix(images, labels, 10, 1.0, seed)
    both, both_labels = mixing.mix_batch(images, labels, 10, mixup_alpha=0.2, cutmix_alpha=1.0,
                                         seed=seed)
    return {
        "mixup": mixed, "mixup_labels": mixed_labels,
        "cutmix": cut, "cutmix_labels": cut_labels,
        "mix_batch": both, "mix_batch_labels": both_labels,
        "tda": tda.texture_debiased_augment(images, seed),
        "deep_augment": deepaugment.deep_augment(images, seed),
    }


def test_xla_compiles_and_matches_eager():
    images = _smooth_images(6, seed=10)
    labels = tf.constant([0, 3, 5, 7, 9, 1])
    jitted = tf.function(_all_augmentations, jit_compile=True)
    branches = set()
    for seed in (tf.constant(SEED), tf.constant([123456, -987654])):
        eager = _all_augmentations(images, labels, seed)
        xla = jitted(images, labels, seed)
        for key, value in eager.items():
            assert xla[key].shape == value.shape, key
            tol = 1e-5 if key.endswith("labels") else 2e-3
            np.testing.assert_allclose(xla[key].numpy(), value.numpy(), atol=tol, err_msg=key)
        only_cutmix = mixing.mix_batch(images, labels, 10, cutmix_alpha=1.0, seed=seed)[0]
        same = np.array_equal(eager["mix_batch"].numpy(), only_cutmix.numpy())
        branches.add("cutmix" if same else "mixup")
    assert branches == {"mixup", "cutmix"}  # both branches of the coin ran under XLA


@pytest.mark.slow  # ~8 s; the same graphs compile in test_xla_compiles_and_matches_eager
def test_xla_in_replica_context(two_device_strategy):
    """As in a training step: strategy.run of a jit-compiled function, per-replica seeds."""
    strategy = two_device_strategy
    images = _smooth_images(4, seed=12)
    labels = tf.constant([1, 2, 3, 4])

    def augment(images, labels, seed):
        mixed, soft = mixing.mix_batch(images, labels, 10, mixup_alpha=0.2, cutmix_alpha=1.0,
                                       seed=seed)
        out = deepaugment.deep_augment(tda.texture_debiased_augment(mixed, seed), seed)
        return out, soft

    jitted = tf.function(augment, jit_compile=True)

    @tf.function
    def step(seed):
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return jitted(images, labels, mixing.sub_seed(seed, replica))
        return strategy.run(replica_fn)

    out, soft = step(tf.constant([5, 6]))
    per_replica = [strategy.experimental_local_results(t) for t in (out, soft)]
    for replica in range(2):
        ref_out, ref_soft = augment(images, labels, mixing.sub_seed(tf.constant([5, 6]), replica))
        np.testing.assert_allclose(per_replica[0][replica].numpy(), ref_out.numpy(), atol=2e-3)
        np.testing.assert_allclose(per_replica[1][replica].numpy(), ref_soft.numpy(), atol=1e-5)
    assert not np.allclose(per_replica[0][0].numpy(), per_replica[0][1].numpy())
