"""Tests of efficientnet_advprop.data.autoaugment against hand-computed results."""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import data
from efficientnet_advprop.data import autoaugment as aa

SEED = tf.constant([11, 22], tf.int64)


def _img(channels):
    """uint8 [H, W, 3] from three [H, W] lists, or one list used for all channels."""
    arr = np.asarray(channels, np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    else:
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _np(t):
    out = t.numpy()
    assert out.dtype == np.uint8
    return out


@pytest.fixture(scope="module")
def cifar_image():
    """One real 32x32 CIFAR-10 image (float32 in [0, 255]) from the embedded set."""
    ds = data.make_dataset(
        data.resolve_dataset("embedded"),
        None,
        "eval",
        batch_size=2,
        image_size=32,
        is_training=False,
        options=data.InputOptions(augmentation="none"),
    )
    x, _ = next(iter(ds))
    return x.numpy()[1]


# ---------------------------------------------------------------------------
# Policy tables and magnitude mapping.
# ---------------------------------------------------------------------------
def test_policy_v0_table():
    policy = aa.policy_v0()
    assert len(policy) == 25
    for sub in policy:
        assert len(sub) == 2
        for name, prob, level in sub:
            assert name in aa.OP_NAMES
            assert 0.0 <= prob <= 1.0
            assert isinstance(level, int) and 0 <= level <= 10
    assert policy[0] == [("Equalize", 0.8, 1), ("ShearY", 0.8, 4)]
    assert policy[22] == [("Posterize", 0.8, 2), ("Solarize", 0.6, 10)]
    assert policy[24] == [("Color", 0.8, 6), ("Rotate", 0.4, 5)]
    policy[0][0] = ("Invert", 1.0, 0)  # a copy: the constant is untouched
    assert aa.POLICY_V0[0][0] == ("Equalize", 0.8, 1)
    assert len(aa.RANDAUGMENT_OPS) == 16
    assert set(aa.RANDAUGMENT_OPS) == set(aa.OP_NAMES)
    assert aa.AUTOAUGMENT_HPARAMS == (100, 250) and aa.RANDAUGMENT_HPARAMS == (40, 100)


def test_level_to_arg_unsigned():
    ra = aa.RANDAUGMENT_HPARAMS
    assert aa.level_to_arg("Equalize", 7) is None
    assert aa.level_to_arg("Color", 10) == pytest.approx(1.9)
    assert aa.level_to_arg("Sharpness", 0) == pytest.approx(0.1)
    assert aa.level_to_arg("Contrast", 28) == pytest.approx(5.14)
    assert [aa.level_to_arg("Posterize", v) for v in (2, 6, 10)] == [0, 2, 4]
    assert [aa.level_to_arg("Solarize", v) for v in (3, 10, 28)] == [76, 256, 716]
    assert [aa.level_to_arg("SolarizeAdd", v) for v in (3, 7, 28)] == [33, 77, 308]
    assert aa.level_to_arg("Cutout", 10) == 100
    assert aa.level_to_arg("Cutout", 10, ra) == 40
    assert aa.level_to_arg("Cutout", 28, ra) == 112
    with pytest.raises(ValueError, match="op name"):
        aa.level_to_arg("Blur", 3)
    with pytest.raises(ValueError, match="seed"):
        aa.level_to_arg("Rotate", 3)


def test_level_to_arg_signed_random_sign():
    cases = [
        ("Rotate", 10, aa.AUTOAUGMENT_HPARAMS, 30.0),
        ("ShearX", 10, aa.AUTOAUGMENT_HPARAMS, 0.3),
        ("ShearY", 28, aa.RANDAUGMENT_HPARAMS, 0.84),
        ("TranslateY", 9, aa.AUTOAUGMENT_HPARAMS, 225.0),
        ("TranslateX", 9, aa.RANDAUGMENT_HPARAMS, 90.0),
    ]
    for name, level, hparams, expected in cases:
        values = [
            float(aa.level_to_arg(name, level, hparams, seed=tf.constant([s, 1])))
            for s in range(16)
        ]
        np.testing.assert_allclose(np.abs(values), expected, rtol=1e-6)
        assert min(values) < 0 < max(values)  # both signs occur
        again = float(aa.level_to_arg(name, level, hparams, seed=tf.constant([3, 1])))
        assert again == values[3]


# ---------------------------------------------------------------------------
# Pixel ops.
# ---------------------------------------------------------------------------
def test_to_uint8_rounds_and_clips():
    x = np.array([[[1.4, 1.6, -3.0], [254.6, 300.0, 0.5]]], np.float32)
    np.testing.assert_array_equal(_np(aa.to_uint8(x)), [[[1, 2, 0], [255, 255, 0]]])
    u = np.array([[[7, 8, 9]]], np.uint8)
    np.testing.assert_array_equal(_np(aa.to_uint8(u)), u)


def test_invert_posterize():
    x = _img([[0, 7, 100, 183, 255]])
    np.testing.assert_array_equal(_np(aa.invert(x)), _img([[255, 248, 155, 72, 0]]))
    np.testing.assert_array_equal(_np(aa.posterize(x, 4)), _img([[0, 0, 96, 176, 240]]))
    np.testing.assert_array_equal(_np(aa.posterize(x, 1)), _img([[0, 0, 0, 128, 128]]))
    # TensorFlow clamps uint8 shift counts to 7: bits 0 and bits >= 9 keep the top bit.
    np.testing.assert_array_equal(_np(aa.posterize(x, 0)), _img([[0, 0, 0, 128, 128]]))
    np.testing.assert_array_equal(_np(aa.posterize(x, 11)), _img([[0, 0, 0, 128, 128]]))
    np.testing.assert_array_equal(_np(aa.posterize(x, 8)), x)


def test_solarize_and_solarize_add():
    x = _img([[0, 100, 127, 128, 200, 255]])
    np.testing.assert_array_equal(_np(aa.solarize(x, 128)), _img([[0, 100, 127, 127, 55, 0]]))
    inverted = _img([[255, 155, 128, 127, 55, 0]])
    np.testing.assert_array_equal(_np(aa.solarize(x, 0)), inverted)
    np.testing.assert_array_equal(_np(aa.solarize(x, 256)), inverted)  # uint8 wrap
    np.testing.assert_array_equal(  # 716 = 204 (mod 256)
        _np(aa.solarize(x, 716)), _img([[0, 100, 127, 128, 200, 0]])
    )
    np.testing.assert_array_equal(
        _np(aa.solarize_add(x, 50)), _img([[50, 150, 177, 128, 200, 255]])
    )
    np.testing.assert_array_equal(
        _np(aa.solarize_add(x, 200)), _img([[200, 255, 255, 128, 200, 255]])
    )


def test_autocontrast_stretches_each_channel():
    x = _img([[[1, 11], [50, 86]], [[77, 77], [77, 77]], [[0, 10], [51, 51]]])
    expected = _img([[[0, 30], [147, 255]], [[77, 77], [77, 77]], [[0, 50], [255, 255]]])
    np.testing.assert_array_equal(_np(aa.autocontrast(x)), expected)


def test_equalize_known_histograms():
    small = _img([[0, 0, 64, 64], [128, 128, 255, 255], [3, 3, 3, 3], [9, 9, 9, 9]])
    np.testing.assert_array_equal(_np(aa.equalize(small)), small)  # step 0: unchanged
    rows = np.arange(32)[:, None] * np.ones((1, 32), int)
    ch0 = 10 * (rows // 8 + 1)  # 10, 20, 30, 40: 256 pixels each
    ch1 = np.full((32, 32), 77)  # one value: unchanged
    ch2 = np.where(rows < 16, 0, 200)  # 512 pixels each
    x = _img([ch0, ch1, ch2])
    # ch0: step (1024 - 256) // 255 = 3, lut[v] = (cumsum below v + 1) // 3.
    # ch2: step (1024 - 512) // 255 = 2, lut[200] = (512 + 1) // 2 = 256 -> 255.
    lut0 = {10: 0, 20: 85, 30: 171, 40: 255}
    expected = _img([np.vectorize(lut0.get)(ch0), ch1, np.where(rows < 16, 0, 255)])
    np.testing.assert_array_equal(_np(aa.equalize(x)), expected)


def test_color_brightness_contrast_blend():
    x = _img([[[255, 0], [0, 100]], [[0, 255], [0, 100]], [[0, 0], [255, 100]]])
    # rgb_to_grayscale: (255,0,0) -> 76, (0,255,0) -> 149, (0,0,255) -> 29, gray -> itself.
    half = _img([[[165, 74], [14, 100]], [[38, 202], [14, 100]], [[38, 74], [142, 100]]])
    np.testing.assert_array_equal(_np(aa.color(x, 0.5)), half)
    strong = _img([[[255, 0], [0, 100]], [[0, 255], [0, 100]], [[0, 0], [255, 100]]])
    np.testing.assert_array_equal(_np(aa.color(x, 1.9)), strong)
    np.testing.assert_array_equal(
        _np(aa.color(x, 0.0)),
        _img([[[76, 149], [29, 100]], [[76, 149], [29, 100]], [[76, 149], [29, 100]]]),
    )
    np.testing.assert_array_equal(_np(aa.color(x, 1.0)), x)
    # Brightness: blend from black, floor(f * x), clipped.
    np.testing.assert_array_equal(_np(aa.brightness(x, 0.5)), x // 2)
    np.testing.assert_array_equal(
        _np(aa.brightness(x, 1.5)), np.minimum(np.floor(x * 1.5), 255).astype(np.uint8)
    )
    # Contrast: the official gray level is H * W / 256 -> 0 on 2x2, 4 on 32x32.
    np.testing.assert_array_equal(_np(aa.contrast(x, 0.5)), x // 2)
    flat = np.full((32, 32, 3), 100, np.uint8)
    np.testing.assert_array_equal(_np(aa.contrast(flat, 0.5)), flat // 100 * 52)
    np.testing.assert_array_equal(_np(aa.contrast(flat, 1.9)), flat // 100 * 186)
    np.testing.assert_array_equal(_np(aa.contrast(flat, 0.0)), flat // 100 * 4)


def test_sharpness_smooths_interior_only():
    x = _img([[0, 0, 0, 0], [0, 100, 50, 0], [0, 20, 201, 0], [0, 0, 0, 0]])
    # Interior: (9-neighbourhood sum + 4 * centre) / 13, truncated: 771, 571, 451, 1175.
    smooth = _img([[0, 0, 0, 0], [0, 59, 43, 0], [0, 34, 90, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(_np(aa.sharpness(x, 0.0)), smooth)
    half = _img([[0, 0, 0, 0], [0, 79, 46, 0], [0, 27, 145, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(_np(aa.sharpness(x, 0.5)), half)
    np.testing.assert_array_equal(_np(aa.sharpness(x, 1.0)), x)
    tiny = _img([[10, 200], [30, 40]])  # all border: unchanged for any factor
    np.testing.assert_array_equal(_np(aa.sharpness(tiny, 1.9)), tiny)


# ---------------------------------------------------------------------------
# Geometric ops.
# ---------------------------------------------------------------------------
P = np.arange(1, 17).reshape(4, 4)


def _fill(a):
    return np.where(a < 0, 128, a)


def test_translate_and_shear_fill_128():
    x = _img(P)
    f = -1
    np.testing.assert_array_equal(
        _np(aa.translate_x(x, 1.0)),
        _img(_fill(np.array([[2, 3, 4, f], [6, 7, 8, f], [10, 11, 12, f], [14, 15, 16, f]]))),
    )
    np.testing.assert_array_equal(
        _np(aa.translate_x(x, -2.0)),
        _img(_fill(np.array([[f, f, 1, 2], [f, f, 5, 6], [f, f, 9, 10], [f, f, 13, 14]]))),
    )
    np.testing.assert_array_equal(
        _np(aa.translate_y(x, 1.0)),
        _img(_fill(np.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [f, f, f, f]]))),
    )
    # shear_x(1): output (x, y) <- input (x + y, y); shear_y(1): <- input (x, x + y).
    np.testing.assert_array_equal(
        _np(aa.shear_x(x, 1.0)),
        _img(_fill(np.array([[1, 2, 3, 4], [6, 7, 8, f], [11, 12, f, f], [16, f, f, f]]))),
    )
    np.testing.assert_array_equal(
        _np(aa.shear_y(x, 1.0)),
        _img(_fill(np.array([[1, 6, 11, 16], [5, 10, 15, f], [9, 14, f, f], [13, f, f, f]]))),
    )
    # Per-channel replace value.
    out = _np(aa.translate_x(x, 3.0, replace=(1, 2, 3)))
    np.testing.assert_array_equal(out[:, 0], np.stack([P[:, 3]] * 3, -1))
    np.testing.assert_array_equal(out[:, 1:], np.broadcast_to([1, 2, 3], (4, 3, 3)))


def test_rotate_quarter_turns():
    x = _img(P)
    np.testing.assert_array_equal(_np(aa.rotate(x, 90.0)), _img(np.rot90(P)))
    np.testing.assert_array_equal(_np(aa.rotate(x, -90.0)), _img(np.rot90(P, -1)))
    np.testing.assert_array_equal(_np(aa.rotate(x, 180.0)), _img(P[::-1, ::-1]))
    np.testing.assert_array_equal(_np(aa.rotate(x, 0.0)), x)
    # 45 degrees on 4x4: the corners come from outside the image.
    out = _np(aa.rotate(x, 45.0))
    assert out[0, 0, 0] == 128 and out[3, 3, 0] == 128 and 128 not in out[1:3, 1:3]


def test_cutout_region():
    x = np.full((8, 8, 3), 7, np.uint8)
    expected = x.copy()
    expected[0:3, 3:7] = 128  # rows [1-2, 1+2) clipped, columns [5-2, 5+2)
    np.testing.assert_array_equal(_np(aa._cutout_at(x, 1, 5, 2)), expected)
    np.testing.assert_array_equal(_np(aa._cutout_at(x, 1, 5, 0)), x)
    shapes = set()
    for s in range(12):
        out = _np(aa.cutout(x, 2, tf.constant([s, 5])))
        mask = (out == 128).all(-1)
        assert ((out == 7) | (out == 128)).all() and (mask == (out == 128).any(-1)).all()
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.sum() == len(rows) * len(cols)  # one rectangle
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
        assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
        assert 2 <= len(rows) <= 4 and 2 <= len(cols) <= 4
        shapes.add((rows[0], cols[0], len(rows), len(cols)))
        np.testing.assert_array_equal(_np(aa.cutout(x, 2, tf.constant([s, 5]))), out)
    assert len(shapes) >= 4  # the position depends on the seed


def test_apply_op_uses_magnitude_and_fill():
    x = np.full((32, 32, 3), 9, np.uint8)
    # RandAugment translate at level 10 is +-100 px: everything comes from outside.
    out = _np(aa.apply_op(x, "TranslateX", 10, SEED, aa.RANDAUGMENT_HPARAMS))
    np.testing.assert_array_equal(out, np.full_like(x, 128))
    out = _np(aa.apply_op(x, "Cutout", 10, SEED))  # pad 100 covers the image
    np.testing.assert_array_equal(out, np.full_like(x, 128))
    np.testing.assert_array_equal(_np(aa.apply_op(x, "Solarize", 10, SEED)), 255 - x)
    np.testing.assert_array_equal(_np(aa.apply_op(x, "ShearX", 0, SEED)), x)


# ---------------------------------------------------------------------------
# Policies.
# ---------------------------------------------------------------------------
def _check_output(out, like):
    out = out.numpy()
    assert out.dtype == np.float32 and out.shape == like.shape
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(out, np.round(out))
    return out


def test_autoaugment_deterministic_and_seed_dependent(cifar_image):
    outs = []
    for s in range(8):
        seed = tf.constant([s, 9], tf.int64)
        out = _check_output(aa.distort_image_with_autoaugment(cifar_image, seed), cifar_image)
        again = aa.distort_image_with_autoaugment(cifar_image, seed).numpy()
        np.testing.assert_array_equal(out, again)
        outs.append(out.tobytes())
    assert len(set(outs)) >= 4
    assert any(o != np.round(cifar_image).astype(np.float32).tobytes() for o in outs)
    uint8_out = aa.distort_image_with_autoaugment(np.round(cifar_image).astype(np.uint8), SEED)
    np.testing.assert_array_equal(
        uint8_out.numpy(), aa.distort_image_with_autoaugment(cifar_image, SEED).numpy()
    )
    with pytest.raises(ValueError, match="policy='v1'"):
        aa.distort_image_with_autoaugment(cifar_image, SEED, policy="v1")


def test_randaugment_deterministic_and_seed_dependent(cifar_image):
    outs = []
    for s in range(8):
        seed = tf.constant([s, 4], tf.int32)
        out = _check_output(
            aa.distort_image_with_randaugment(cifar_image, 2, 28, seed), cifar_image
        )
        again = aa.distort_image_with_randaugment(cifar_image, 2, 28, seed).numpy()
        np.testing.assert_array_equal(out, again)
        outs.append(out.tobytes())
    assert len(set(outs)) >= 6


def test_randaugment_zero_layers_and_zero_magnitude(cifar_image):
    rounded = np.round(cifar_image)
    out = aa.distort_image_with_randaugment(cifar_image + 0.3, 0, 10, SEED)
    np.testing.assert_array_equal(_check_output(out, cifar_image), rounded)
    # Magnitude 0: geometric ops, cutout and solarize_add are the identity; the
    # others still change the image (enhance factor 0.1, solarize threshold 0, ...).
    x = rounded.astype(np.uint8)
    candidates = {
        "identity": x,
        "autocontrast": _np(aa.autocontrast(x)),
        "equalize": _np(aa.equalize(x)),
        "invert": _np(aa.invert(x)),  # also Solarize at threshold 0
        "posterize": _np(aa.posterize(x, 0)),
        "color": _np(aa.color(x, 0.1)),
        "contrast": _np(aa.contrast(x, 0.1)),
        "brightness": _np(aa.brightness(x, 0.1)),
        "sharpness": _np(aa.sharpness(x, 0.1)),
    }
    hit = set()
    for s in range(16):
        out = aa.distort_image_with_randaugment(x, 1, 0, tf.constant([s, 0])).numpy()
        names = [k for k, v in candidates.items() if np.array_equal(out, v)]
        assert names, f"seed {s}: result is none of the level-0 ops"
        hit.update(names)
    assert len(hit) >= 4


def test_randaugment_validates_arguments(cifar_image):
    for layers in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_layers"):
            aa.distort_image_with_randaugment(cifar_image, layers, 10, SEED)
    for magnitude in (-1, float("nan"), "5"):
        with pytest.raises(ValueError, match="magnitude"):
            aa.distort_image_with_randaugment(cifar_image, 2, magnitude, SEED)
    with pytest.raises(ValueError, match="seed"):
        aa.distort_image_with_randaugment(cifar_image, 1, 5, tf.constant([1, 2, 3]))


# ---------------------------------------------------------------------------
# Size-dependent constants.
# ---------------------------------------------------------------------------
def test_constants_scaled_below_64_px_official_from_64():
    scaled32 = {"translate_const": 10, "cutout_const": 10, "scaled": True}
    assert aa.autoaugment_constants(32) == scaled32
    assert aa.autoaugment_constants(32, "randaugment") == scaled32
    assert aa.autoaugment_constants(224) == {"translate_const": 250, "cutout_const": 100,
                                             "scaled": False}
    assert aa.autoaugment_constants(224, "randaugment") == {
        "translate_const": 100, "cutout_const": 40, "scaled": False}
    assert aa.autoaugment_constants(64) == aa.autoaugment_constants(600)
    assert aa.autoaugment_constants(63)["translate_const"] == 20  # round(63 * 10 / 32)
    assert aa.autoaugment_constants(16)["cutout_const"] == 5
    assert aa.autoaugment_constants((48, 200))["translate_const"] == 15  # smaller side
    assert aa.autoaugment_constants(32, constants="official")["translate_const"] == 250
    assert aa.autoaugment_constants(224, constants="scaled")["translate_const"] == 70
    for bad in (0, -3, 32.0, True, (), "32"):
        with pytest.raises(ValueError, match="image_size"):
            aa.autoaugment_constants(bad)
    with pytest.raises(ValueError, match="constants"):
        aa.autoaugment_constants(32, constants="imagenet")
    with pytest.raises(ValueError, match="augment"):
        aa.autoaugment_constants(32, "v1")


def _seeds_with_translate(count):
    """Seeds for which policy v0 picks sub-policy 15 (Rotate, TranslateY at level 9)
    and its TranslateY fires: the only v0 op with a pixel constant."""
    assert aa.POLICY_V0[15][1] == ("TranslateY", 0.8, 9)
    found = []
    for s in range(2000):
        seed = tf.constant([s, 3], tf.int64)
        if (int(aa._randint(aa._fold(seed, 0), 25)) == 15
                and float(aa._uniform(aa._fold(aa._fold(seed, 2), 0))) < 0.8):
            found.append(seed)
            if len(found) == count:
                return found
    raise AssertionError("no seed picks sub-policy 15")


def test_autoaugment_default_constants_follow_the_image_size(cifar_image):
    seeds = _seeds_with_translate(3)
    small = cifar_image
    large = np.asarray(tf.image.resize(cifar_image[None], [224, 224], "nearest")[0])
    for seed in seeds:
        out = {c: aa.distort_image_with_autoaugment(small, seed, constants=c).numpy()
               for c in ("auto", "scaled", "official")}
        np.testing.assert_array_equal(out["auto"], out["scaled"])
        # Official: a 225-px shift leaves nothing of a 32-px image; scaled: 9 px.
        assert (out["official"] == 128).all()
        assert (out["scaled"] == 128).all(-1).mean() < 0.5
        big = {c: aa.distort_image_with_autoaugment(large, seed, constants=c).numpy()
               for c in ("auto", "official")}
        np.testing.assert_array_equal(big["auto"], big["official"])
    tiny = aa.distort_image_with_randaugment(small, 2, 10, seeds[0], constants="auto")
    np.testing.assert_array_equal(
        tiny.numpy(),
        aa.distort_image_with_randaugment(small, 2, 10, seeds[0], constants="scaled").numpy())
    unknown = tf.TensorSpec([None, None, 3], tf.float32)
    with pytest.raises(ValueError, match="static"):
        tf.function(lambda x: aa.distort_image_with_autoaugment(x, SEED)).get_concrete_function(
            unknown)
    tf.function(lambda x: aa.distort_image_with_randaugment(  # official: no size needed
        x, 0, 10, SEED, constants="official")).get_concrete_function(unknown)


def test_preprocess_for_train_passes_the_constants_on(cifar_image):
    from efficientnet_advprop.data import preprocessing

    png = tf.io.encode_png(tf.constant(np.round(cifar_image).astype(np.uint8)))
    differs = 0
    for s in range(12):
        out = {c: preprocessing.preprocess_for_train(
            png, 32, tf.constant([s, 4], tf.int64), "none", auto_augment="randaugment",
            auto_augment_constants=c).numpy() for c in ("auto", "scaled", "official")}
        np.testing.assert_array_equal(out["auto"], out["scaled"])
        differs += not np.array_equal(out["auto"], out["official"])
    assert differs >= 2


@pytest.fixture(scope="module")
def cifar_batch():
    """64 real 32x32 CIFAR-10 images (float32) from the embedded set."""
    ds = data.make_dataset(data.resolve_dataset("embedded"), None, "eval", batch_size=64,
                           image_size=32, is_training=False,
                           options=data.InputOptions(augmentation="none"))
    return next(iter(ds))[0].numpy()


def _fill_fraction(images, constants):
    """Per image, the share of pixels that RandAugment (2 ops, magnitude 10) sets to the
    fill colour (128, 128, 128): pixels that came from outside the image or from a
    cutout square."""
    out = np.stack([
        aa.distort_image_with_randaugment(image, 2, 10, tf.constant([i, 9], tf.int64),
                                          constants=constants).numpy()
        for i, image in enumerate(images)])
    return (out == 128).all(-1).mean((1, 2)) - (images == 128).all(-1).mean((1, 2))


def test_scaled_constants_keep_most_of_real_cifar_images(cifar_batch):
    """RandAugment (2 ops, magnitude 10) on real CIFAR images: with the official
    ImageNet constants TranslateX/Y (100 px) and Cutout (pad 40) erase a 32-px image,
    about a quarter of all images; the scaled constants (10 px, pad 10) erase none.
    (Policy v0's only pixel op is tested above.)"""
    official = _fill_fraction(cifar_batch, "official")
    scaled = _fill_fraction(cifar_batch, "auto")
    assert (official > 0.9).mean() > 0.15
    assert (scaled > 0.9).mean() == 0.0
    assert scaled.mean() < 0.5 * official.mean()
    assert (scaled < 0.5).mean() > 0.9  # most images keep most of their pixels


# ---------------------------------------------------------------------------
# Input pipeline.
# ---------------------------------------------------------------------------
def _train(info, **kw):
    return data.make_dataset(
        info,
        None,
        "train",
        batch_size=32,
        image_size=32,
        is_training=True,
        seed=5,
        options=data.InputOptions(augmentation="cifar", **kw),
    )


@pytest.mark.slow  # ~20 s of tf.data tracing; fine_grained_advprop's tag routing is in
# the fast suite (test_recipes.py)
def test_make_dataset_source_tags_and_clean_images():
    info = data.resolve_dataset("embedded")
    x0, y0 = [t.numpy() for t in next(iter(_train(info)))]
    x, y, extras = next(iter(_train(info, auto_augment="v0", auto_augment_fraction=0.5,
                                    source_tags=True)))
    assert set(extras) == {"source_tags"}
    src = extras["source_tags"]
    assert src.dtype == tf.int32 and src.shape == (32,)
    x, y, src = x.numpy(), y.numpy(), src.numpy()
    assert set(src.tolist()) == {0, 1}
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(x[src == 0], x0[src == 0])
    aug = x[src == 1]
    assert aug.min() >= 0.0 and aug.max() <= 255.0
    np.testing.assert_array_equal(aug, np.round(aug))
    assert not np.array_equal(aug, x0[src == 1])
    # Tags are a function of (seed, epoch, index): same again, all 1 at fraction 1.
    _, _, again = next(iter(_train(info, auto_augment="v0", auto_augment_fraction=0.5,
                                   source_tags=True)))
    np.testing.assert_array_equal(again["source_tags"].numpy(), src)
    xr, _, ra = next(iter(_train(info, auto_augment="randaugment", randaugment_layers=1,
                                 randaugment_magnitude=5, source_tags=True)))
    np.testing.assert_array_equal(ra["source_tags"].numpy(), np.ones(32, np.int32))
    assert not np.array_equal(xr.numpy(), x0)
    _, _, none = next(iter(_train(info, source_tags=True)))
    np.testing.assert_array_equal(none["source_tags"].numpy(), np.zeros(32, np.int32))
    xe, ye, se = next(iter(data.make_dataset(
        info, None, "eval", batch_size=4, image_size=32, is_training=False,
        options=data.InputOptions(augmentation="none", auto_augment="v0",
                                  source_tags=True))))
    np.testing.assert_array_equal(se["source_tags"].numpy(), np.zeros(4, np.int32))


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(auto_augment="v1"), "auto_augment="),
        (dict(auto_augment="randaugment", randaugment_layers=-1), "randaugment_layers"),
        (dict(randaugment_magnitude=-2), "randaugment_magnitude"),
        (dict(auto_augment_fraction=1.5), "auto_augment_fraction"),
        (dict(auto_augment_fraction="half"), "auto_augment_fraction"),
        (dict(source_tags="yes"), "source_tags"),
        (dict(auto_augment_constants="imagenet"), "auto_augment_constants="),
        (dict(extra_views=("deepaugment",)), "extra_views"),
    ],
)
def test_input_options_validate_auto_augment_args(kw, name):
    with pytest.raises(ValueError, match=name):
        data.InputOptions(augmentation="cifar", **kw)
