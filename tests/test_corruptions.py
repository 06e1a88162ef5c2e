"""The 15 ImageNet-C / CIFAR-10-C corruptions (efficientnet_advprop.data.corruptions)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.data import corruptions as C

# its module fixture runs once: every test of this file on one xdist worker
# (the test command's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("corruptions")

SEED = (11, 7)
OTHER_SEED = (12, 7)
SEVERITIES = (1, 5)


@pytest.fixture(scope="module")
def few_images(cifar_small):
    """Eight held-out CIFAR-10 images of eight different classes (uint8)."""
    _, (x, _) = cifar_small
    return x[::50][:8]


@pytest.fixture(scope="module")
def corrupted_held_out(cifar_small):
    """{(name, severity): the 500 held-out images corrupted (uint8)}, severities 1, 5."""
    _, (x, _) = cifar_small
    return {(name, s): C.corrupt(x, name, s, SEED).numpy()
            for name in C.CORRUPTIONS for s in SEVERITIES}


@pytest.fixture(scope="module")
def tiny_cnn(cifar_small):
    """A small CNN trained for real on the 2,000 CIFAR-10 training images (~43%)."""
    (x, y), _ = cifar_small
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Rescaling(1 / 127.5, offset=-1.0),
        layers.Conv2D(24, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(48, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(48, 3, padding="same", activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype("float32"), y, batch_size=64, epochs=12, verbose=0)
    return model


def _mad(a, b):
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def test_corruption_names_and_groups():
    assert len(C.CORRUPTIONS) == 15 == len(set(C.CORRUPTIONS))
    assert C.CORRUPTIONS == C.NOISE + C.BLUR + C.WEATHER + C.DIGITAL
    assert C.CORRUPTIONS[0] == "gaussian_noise" and C.CORRUPTIONS[-1] == "jpeg_compression"
    assert set(C.RANDOM_CORRUPTIONS) < set(C.CORRUPTIONS)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_dtype_shape_range_determinism(few_images, name, dtype):
    x = few_images.astype(dtype)
    for severity in SEVERITIES:
        out = C.corrupt(x, name, severity, SEED).numpy()
        assert out.dtype == x.dtype and out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, C.corrupt(x, name, severity, SEED).numpy())
        assert _mad(out, x) > 0.5, (name, severity)
        other = C.corrupt(x, name, severity, OTHER_SEED).numpy()
        if name in C.RANDOM_CORRUPTIONS:
            assert not np.array_equal(out, other), (name, severity)
        else:
            np.testing.assert_array_equal(out, other)


def test_single_image_and_python_int_seed(few_images):
    out = C.corrupt(few_images[0], "fog", 3, 5)
    assert out.shape == (32, 32, 3) and out.dtype == tf.uint8
    np.testing.assert_array_equal(out.numpy(), C.corrupt(few_images[0], "fog", 3, [5, 0]))


def test_severity_5_is_further_from_clean_than_severity_1(cifar_small, corrupted_held_out):
    _, (x, _) = cifar_small
    for name in C.CORRUPTIONS:
        mad1 = _mad(corrupted_held_out[name, 1], x)
        mad5 = _mad(corrupted_held_out[name, 5], x)
        if name == "elastic_transform":
            # The published elastic parameters are not ordered by pixel change: severity
            # 1 is a strong random affine warp (jitter 0.08 * size), severity 5 a weaker
            # warp (0.03 * size) plus local displacements. Both must move pixels.
            assert mad1 > 5 and mad5 > 5
        else:
            assert mad5 > mad1, (name, mad1, mad5)


def test_imagenet_table_on_larger_images(few_images):
    """The ImageNet-C table (rescaled to 96 pixels) also orders severities."""
    x = tf.image.resize(few_images[:2].astype(np.float32), [96, 96]).numpy()
    assert C.parameter_table(96, 96) == "imagenet"
    for name in C.CORRUPTIONS:
        out1 = C.corrupt(x, name, 1, SEED).numpy()
        out5 = C.corrupt(x, name, 5, SEED).numpy()
        assert out5.shape == x.shape and 0 <= out5.min() and out5.max() <= 255
        if name == "frost":
            # x + 0.4 T (severity 1) brightens more than 0.6 x + 0.75 T (severity 5)
            # changes pixels on average; severity 5 keeps less of the clean image.
            def corr(out):
                return np.corrcoef(out.ravel(), x.ravel())[0, 1]

            assert corr(out5) < corr(out1) < 0.999
        elif name != "elastic_transform":  # see the CIFAR test above
            assert _mad(out5, x) > _mad(out1, x) > 0.1, name


def test_error_grows_with_severity(cifar_small, corrupted_held_out, tiny_cnn):
    _, (x, y) = cifar_small

    keys = list(corrupted_held_out)
    images = np.concatenate([x] + [corrupted_held_out[key] for key in keys])
    logits = tiny_cnn.predict(images.astype(np.float32), batch_size=1000, verbose=0)
    wrong = (np.argmax(logits, -1) != np.tile(y, len(keys) + 1)).reshape(-1, len(y))
    clean = wrong[0].mean()
    assert clean < 0.7  # the model learned something (chance is 0.9)
    errors = {key: wrong[i + 1].mean() for i, key in enumerate(keys)}
    mean1 = np.mean([errors[name, 1] for name in C.CORRUPTIONS])
    mean5 = np.mean([errors[name, 5] for name in C.CORRUPTIONS])
    assert mean5 > mean1 + 0.03 and mean1 >= clean - 0.01
    for name in C.NOISE:
        assert errors[name, 5] > errors[name, 1] + 0.02, name


def test_glass_blur_shuffle_follows_the_reference_loop():
    """The sequential copy of ImageNet-C's glass blur, chains included (delta 2)."""
    rng = np.random.default_rng(0)
    delta, (h, w) = 2, (12, 13)
    x = rng.random((2, h, w, 3)).astype(np.float32)
    seed = tf.constant([3, 9], tf.int64)
    out = C._local_shuffle(tf.constant(x), delta, seed).numpy()  # pylint: disable=protected-access
    draws = [tf.random.stateless_uniform(
        [2, h, w], C._stream(seed, k), -delta, delta,  # pylint: disable=protected-access
        dtype=tf.int32).numpy() for k in (0, 1)]
    expected = x.copy()
    for b in range(2):
        img = expected[b]
        for r in range(h - delta, delta, -1):
            for c in range(w - delta, delta, -1):
                r2, c2 = r + draws[0][b, r, c], c + draws[1][b, r, c]
                img[r, c], img[r2, c2] = img[r2, c2], img[r, c]  # numpy views: a copy
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, x)


def _reference_plasma(mapsize, decay, draw):
    """Diamond-square written with in-place strided slices, as the paper's code does."""
    grid = np.zeros((mapsize, mapsize))
    step, wibble, level = mapsize, 100.0, 0
    while step >= 2:
        half, n = step // 2, mapsize // step
        corners = grid[0::step, 0::step]
        total = corners + np.roll(corners, -1, 0)
        total += np.roll(total, -1, 1)
        grid[half::step, half::step] = total / 4 + wibble * draw(level, 0, n, wibble)
        centers = grid[half::step, half::step]
        total = centers + np.roll(centers, 1, 0) + corners + np.roll(corners, -1, 1)
        grid[0::step, half::step] = total / 4 + wibble * draw(level, 1, n, wibble)
        total = centers + np.roll(centers, 1, 1) + corners + np.roll(corners, -1, 0)
        grid[half::step, 0::step] = total / 4 + wibble * draw(level, 2, n, wibble)
        step, wibble, level = half, wibble / decay, level + 1
    grid -= grid.min()
    return grid / grid.max()


def test_plasma_fractal():
    seed = tf.constant([1, 2], tf.int64)
    maps = C.plasma_fractal(2, 16, 2.0, seed).numpy()
    assert maps.shape == (2, 16, 16)
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    np.testing.assert_array_equal(maps, C.plasma_fractal(2, 16, 2.0, seed).numpy())
    assert not np.allclose(maps, C.plasma_fractal(2, 16, 2.0, [1, 3]).numpy())

    def draw(level, k, n, wibble, image=1):
        stream = C._stream(seed, 3 * level + k)  # pylint: disable=protected-access
        noise = tf.random.stateless_uniform([2, n, n], stream, -wibble, wibble)
        return noise.numpy()[image].astype(np.float64)

    np.testing.assert_allclose(maps[1], _reference_plasma(16, 2.0, draw), atol=1e-5)
    with pytest.raises(ValueError, match="mapsize=24"):
        C.plasma_fractal(1, 24, 2.0, seed)


def test_frost_texture():
    texture = C.frost_texture(2, 40, 24, tf.constant([4, 4], tf.int64)).numpy()
    assert texture.shape == (2, 40, 24, 3)
    assert texture.min() >= 0 and texture.max() <= 1 and 0.35 < texture.mean() < 0.65
    assert (texture[..., 2] >= texture[..., 0]).all()  # pale blue tint
    np.testing.assert_array_equal(texture, C.frost_texture(2, 40, 24, [4, 4]).numpy())
    assert not np.allclose(texture, C.frost_texture(2, 40, 24, [4, 5]).numpy())


def test_parameter_tables():
    assert C.parameter_table(32, 32) == "cifar"
    assert C.parameter_table(64, 48) == "cifar"
    assert C.parameter_table(65, 65) == "imagenet"
    assert C.parameter_table(32, 32, "imagenet") == "imagenet"
    assert C.severity_parameters("gaussian_noise", 5, "imagenet") == 0.38
    assert C.severity_parameters("jpeg_compression", 1, "cifar") == 80
    for table in ("imagenet", "cifar"):
        for name in C.CORRUPTIONS:
            assert all(C.severity_parameters(name, s, table) is not None for s in range(1, 6))


def test_table_argument_selects_parameters(few_images):
    cifar = C.corrupt(few_images, "gaussian_noise", 5, SEED, table="cifar").numpy()
    imagenet = C.corrupt(few_images, "gaussian_noise", 5, SEED, table="imagenet").numpy()
    assert _mad(imagenet, few_images) > 2 * _mad(cifar, few_images)


def test_bad_arguments(few_images):
    cases = [
        (dict(name="rain"), "name="),
        (dict(severity=0), "severity="),
        (dict(severity=6), "severity="),
        (dict(severity=True), "severity="),
        (dict(table="tiny"), "table="),
        (dict(images=few_images[..., :2]), "images"),
        (dict(images=few_images.astype(np.int32)), "images"),
        (dict(seed=[1, 2, 3]), "seed"),
    ]
    for change, message in cases:
        kwargs = dict(images=few_images, name="fog", severity=1, seed=SEED)
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            C.corrupt(**kwargs)


@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "jpeg_compression"])
def test_corrupt_dataset_is_deterministic_per_batch(few_images, name):
    labels = np.arange(8, dtype=np.int32)
    images = np.concatenate([few_images[:4], few_images[:4]])  # batch 1 repeats batch 0
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    seed = tf.constant(SEED, tf.int64)
    first = list(C.corrupt_dataset(ds, name, 3, seed).as_numpy_iterator())
    second = list(C.corrupt_dataset(ds, name, 3, seed).as_numpy_iterator())
    assert len(first) == 2
    for k, (out, out_labels) in enumerate(first):
        np.testing.assert_array_equal(out, second[k][0])
        np.testing.assert_array_equal(out_labels, labels[4 * k:4 * k + 4])
        batch_seed = tf.random.experimental.stateless_fold_in(seed, tf.constant(k, tf.int64))
        eager = C.corrupt(images[4 * k:4 * k + 4], name, 3, batch_seed).numpy()
        np.testing.assert_allclose(out.astype(int), eager.astype(int), atol=1)
    same_images_differ = not np.array_equal(first[0][0], first[1][0])
    assert same_images_differ == (name in C.RANDOM_CORRUPTIONS)


def test_tfds_config_names():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    assert C.tfds_corruption_name("cifar10", "glass_blur", 3) == \
        "cifar10_corrupted/frosted_glass_blur_3"
    assert C.tfds_corruption_name("cifar10_corrupted", "elastic_transform", 5) == \
        "cifar10_corrupted/elastic_5"
    assert C.tfds_corruption_name("imagenet", "glass_blur", 1) == \
        "imagenet2012_corrupted/glass_blur_1"
    for dataset in ("cifar10_corrupted", "imagenet2012_corrupted"):
        configs = {c.name for c in tfds.builder_cls(dataset).BUILDER_CONFIGS}
        names = {C.tfds_corruption_name(dataset, n, s).split("/")[1]
                 for n in C.CORRUPTIONS for s in range(1, 6)}
        assert len(names) == 75 and names <= configs
    with pytest.raises(ValueError, match="dataset='mnist'"):
        C.tfds_corruption_name("mnist", "fog", 1)


def test_missing_tfds_corruption_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="cifar10_corrupted/fog_2") as info:
        C.load_tfds_corruption("cifar10", "fog", 2, data_dir=str(tmp_path))
    assert "\n" not in str(info.value)
