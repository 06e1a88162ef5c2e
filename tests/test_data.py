"""Tests of efficientnet_advprop.data on real CIFAR-10 JPEGs (no mocks)."""

import dataclasses
import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import data
from efficientnet_advprop.data import preprocessing
from efficientnet_advprop.data import tfrecord

from conftest import SHARED_DATA  # pylint: disable=g-bad-import-order

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _ctx(i, n=2):
    return tf.distribute.InputContext(
        num_input_pipelines=n, input_pipeline_id=i, num_replicas_in_sync=n
    )


@pytest.fixture(scope="module")
def cifar_jpegs():
    """{class: [(file name, jpeg bytes)]}: first 40 images/class in tar order."""
    if not os.path.exists(SHARED_DATA):
        pytest.skip(f"{SHARED_DATA} not available")
    per_class = 40
    out = {c: [] for c in CLASSES}
    with tarfile.open(SHARED_DATA, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            cls = member.name.split("/")[-2]
            if len(out[cls]) < per_class:
                out[cls].append(
                    (member.name.split("/")[-1], tar.extractfile(member).read())
                )
            if all(len(v) >= per_class for v in out.values()):
                break
    for v in out.values():
        v.sort()
    return out


def _items(cifar_jpegs, per_class, offset=0, classes=CLASSES):
    """[(jpeg bytes, label, class name)], class-interleaved."""
    items = []
    for i in range(offset, offset + per_class):
        for label, cls in enumerate(classes):
            items.append((cifar_jpegs[cls][i][1], label, cls))
    return items


def _decode(jpeg):
    return tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float32)


def _batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.fixture(scope="module")
def tiny_tfrecords(cifar_jpegs, tmp_path_factory):
    """50 train (2 shards) / 20 validation (2 shards) examples, plain TFRecord."""
    d = str(tmp_path_factory.mktemp("tiny_tfrecords"))
    train = _items(cifar_jpegs, 5)
    evals = _items(cifar_jpegs, 2, offset=5)
    data.write_tfrecords(train, d, "train", 2, class_names=CLASSES)
    data.write_tfrecords(evals, d, "validation", 2, class_names=CLASSES)
    return d, train, evals


# ---------------------------------------------------------------------------
# Embedded default dataset.
# ---------------------------------------------------------------------------
def test_embedded_info_batch_and_size():
    info = data.resolve_dataset()
    assert info.name == "embedded"
    assert (info.num_classes, info.num_train, info.num_eval) == (10, 15000, 2000)
    assert info.image_size == 32
    assert info.class_names == CLASSES
    ds = data.make_dataset(
        info,
        None,
        "train",
        batch_size=32,
        image_size=32,
        is_training=True,
        options=data.InputOptions(augmentation="cifar"),
    )
    x, y = next(iter(ds))
    assert x.shape == (32, 32, 32, 3) and x.dtype == tf.float32
    assert y.shape == (32,) and y.dtype == tf.int32
    x, y = x.numpy(), y.numpy()
    assert x.min() >= 0.0 and x.max() <= 255.0 and x.max() > 100.0
    assert y.min() >= 0 and y.max() <= 9
    total = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(data.EMBEDDED_DIR)
        for f in files
    )
    assert total < 8 * 1024 * 1024
    assert os.path.exists(os.path.join(data.EMBEDDED_DIR, "README.md"))


def test_embedded_eval_labels_balanced_and_upscaled():
    info = data.resolve_dataset("embedded")
    ds = data.make_dataset(
        info,
        None,
        "eval",
        batch_size=512,
        image_size=64,
        is_training=False,
        options=data.InputOptions(augmentation="cifar"),
    )
    shapes, labels = [], []
    for x, y in ds:
        shapes.append(tuple(x.shape))
        labels.append(y.numpy())
        assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0
    assert shapes[-1] == (2000 - 3 * 512, 64, 64, 3)  # partial last batch kept
    np.testing.assert_array_equal(np.bincount(np.concatenate(labels)), [200] * 10)


# ---------------------------------------------------------------------------
# Determinism and resumption.
# ---------------------------------------------------------------------------
def test_determinism_and_start_step_embedded():
    info = data.resolve_dataset()
    kw = dict(batch_size=16, image_size=32, is_training=True,
              options=data.InputOptions(augmentation="cifar"))
    a = _batches(data.make_dataset(info, None, "train", seed=7, **kw), 6)
    # Same seed, different tf.data parallelism and global tf.random state.
    tf.random.set_seed(1234)
    single_thread = tf.data.Options()
    single_thread.threading.private_threadpool_size = 1
    b = _batches(
        data.make_dataset(info, None, "train", seed=7, **kw).with_options(single_thread), 1
    )
    c = _batches(data.make_dataset(info, None, "train", seed=8, **kw), 1)
    _assert_same_batches(a[:1], b)
    assert not np.array_equal(a[0][0], c[0][0])
    resumed = _batches(
        data.make_dataset(info, None, "train", seed=7, start_step=3, **kw), 3
    )
    _assert_same_batches(a[3:6], resumed)


@pytest.mark.parametrize("stream", [False, True])
def test_start_step_beyond_one_epoch(tiny_tfrecords, monkeypatch, stream):
    d, train, _ = tiny_tfrecords
    if stream:  # Force the streamed (large-dataset) path: interleave + blocks.
        monkeypatch.setattr(tfrecord, "MEMORY_LIMIT_BYTES", 0)
    info = data.resolve_dataset(data_dir=d)
    assert (info.name, info.num_train, info.num_eval) == ("imagenet", 50, 20)
    # 50 examples, batch 8: 6 steps per epoch, 2 examples dropped per epoch.
    kw = dict(
        batch_size=8,
        image_size=32,
        is_training=True,
        seed=3,
        options=data.InputOptions(augmentation="cifar", shuffle_buffer=16),
    )
    full = _batches(data.make_dataset(info, d, "train", **kw), 18)
    for start in (3, 6, 14):
        resumed = _batches(data.make_dataset(info, d, "train", start_step=start, **kw), 3)
        _assert_same_batches(full[start : start + 3], resumed)
    # Within an epoch no example repeats; epochs are reshuffled.
    labels = [np.concatenate([y for _, y in full[e * 6 : (e + 1) * 6]]) for e in range(3)]
    counts = np.bincount(np.concatenate(labels[:1]), minlength=10)
    assert counts.max() <= 5 and counts.sum() == 48
    assert not np.array_equal(labels[0], labels[1])


def test_augmentation_is_random_and_seeded():
    info = data.resolve_dataset()
    ds = data.make_dataset(
        info,
        None,
        "train",
        batch_size=8,
        image_size=32,
        is_training=True,
        seed=1,
        options=data.InputOptions(augmentation="none"),
    )
    ds_aug = data.make_dataset(
        info,
        None,
        "train",
        batch_size=8,
        image_size=32,
        is_training=True,
        seed=1,
        options=data.InputOptions(augmentation="cifar"),
    )
    ((x0, y0),) = _batches(ds, 1)
    ((x1, y1),) = _batches(ds_aug, 1)
    np.testing.assert_array_equal(y0, y1)  # same order, different pixels
    assert not np.array_equal(x0, x1)


# ---------------------------------------------------------------------------
# Sharding between input pipelines.
# ---------------------------------------------------------------------------
def _eval_examples(info, d, input_context=None):
    ds = data.make_dataset(
        info,
        d,
        "eval",
        batch_size=256,
        image_size=32,
        is_training=False,
        options=data.InputOptions(augmentation="none"),
        input_context=input_context,
    )
    out = []
    for x, y in ds:
        for xi, yi in zip(x.numpy(), y.numpy()):
            out.append((int(yi), xi.astype(np.uint8).tobytes()))
    return out


def test_two_pipelines_eval_disjoint_and_complete(tiny_tfrecords):
    # Embedded: 1 validation file -> sharded by record.
    # Tiny set: 2 validation files -> sharded by file.
    for info, d in (
        (data.resolve_dataset(), None),
        (data.resolve_dataset(data_dir=tiny_tfrecords[0]), tiny_tfrecords[0]),
    ):
        whole = _eval_examples(info, d)
        parts = [_eval_examples(info, d, _ctx(i)) for i in range(2)]
        assert len(whole) == info.num_eval
        assert len(parts[0]) + len(parts[1]) == len(whole)
        assert abs(len(parts[0]) - len(parts[1])) <= 1
        assert sorted(parts[0] + parts[1]) == sorted(whole)
        assert len(set(whole)) == len(whole)  # examples are distinct
        assert not set(parts[0]) & set(parts[1])


def test_two_pipelines_train_disjoint(tiny_tfrecords):
    d = tiny_tfrecords[0]
    info = data.resolve_dataset(data_dir=d)
    seen = []
    for i in range(2):
        ds = data.make_dataset(
            info,
            d,
            "train",
            batch_size=5,
            image_size=32,
            is_training=True,
            options=data.InputOptions(augmentation="none"),
            input_context=_ctx(i),
        )
        # One epoch of this pipeline's 25 examples.
        seen.append({x.astype(np.uint8).tobytes() for xb, _ in _batches(ds, 5) for x in xb})
    assert len(seen[0]) == len(seen[1]) == 25
    assert not seen[0] & seen[1]


def test_distribute_datasets_from_function(two_device_strategy):
    info = data.resolve_dataset()

    def fn(ctx):
        return data.make_dataset(
            info,
            None,
            "train",
            batch_size=ctx.get_per_replica_batch_size(16),
            image_size=32,
            is_training=True,
            options=data.InputOptions(augmentation="none"),
            input_context=ctx,
        )

    dist = iter(two_device_strategy.distribute_datasets_from_function(fn))
    seen = []
    for _ in range(5):  # 80 examples of one epoch: every replica gets its own
        x, y = next(dist)
        xs = two_device_strategy.experimental_local_results(x)
        assert len(xs) == 2 and xs[0].shape == (8, 32, 32, 3)
        for replica in xs:
            seen += [image.tobytes() for image in replica.numpy()]
    assert len(seen) == 80 and len(set(seen)) == 80


# ---------------------------------------------------------------------------
# TFRecord round trip.
# ---------------------------------------------------------------------------
def test_tfrecord_round_trip_pixel_identical(cifar_jpegs, tmp_path):
    train = _items(cifar_jpegs, 20)  # 200 images
    evals = _items(cifar_jpegs, 10, offset=20)  # 100 images
    d = str(tmp_path)
    paths = data.write_tfrecords(train, d, "train", 2, class_names=CLASSES)
    data.write_tfrecords(evals, d, "validation", 3)
    assert [os.path.basename(p) for p in paths] == [
        "train-00000-of-00002",
        "train-00001-of-00002",
    ]
    # Labels are stored 1-based (official convention).
    raw = next(iter(tf.data.TFRecordDataset(paths[0])))
    ex = tf.train.Example.FromString(raw.numpy())
    assert ex.features.feature["image/class/label"].int64_list.value[0] == 1
    assert ex.features.feature["image/class/text"].bytes_list.value[0] == (b"airplane")

    info = data.resolve_dataset(data_dir=d)
    assert (info.name, info.num_classes, info.num_train, info.num_eval) == (
        "imagenet",
        10,
        200,
        100,
    )
    # Without dataset_info.json the reader counts records itself.
    os.remove(os.path.join(d, tfrecord.METADATA_FILE))
    info = data.resolve_dataset("imagenet", data_dir=d)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 200, 100)

    for split, items, shards in (("train", train, 2), ("eval", evals, 3)):
        expected = [it for s in range(shards) for it in items[s::shards]]
        ds = data.make_dataset(
            info,
            d,
            split,
            batch_size=64,
            image_size=32,
            is_training=False,
            options=data.InputOptions(augmentation="none"),
        )
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
        xs, ys = np.concatenate(xs), np.concatenate(ys)
        assert len(xs) == len(expected)
        np.testing.assert_array_equal(ys, [it[1] for it in expected])
        np.testing.assert_array_equal(xs, np.stack([_decode(it[0]) for it in expected]))


def test_gzip_tfrecords_detected_without_metadata(cifar_jpegs, tmp_path):
    items = _items(cifar_jpegs, 3)
    d = str(tmp_path)
    data.write_tfrecords(items, d, "train", 1, compression="GZIP")
    os.remove(os.path.join(d, tfrecord.METADATA_FILE))
    info = data.resolve_dataset(data_dir=d)
    assert info.num_train == 30 and info.num_eval == 0
    ds = data.make_dataset(
        info,
        d,
        "train",
        batch_size=30,
        image_size=32,
        is_training=False,
        options=data.InputOptions(augmentation="none"),
    )
    x, y = next(iter(ds))
    np.testing.assert_array_equal(x.numpy(), np.stack([_decode(it[0]) for it in items]))


# ---------------------------------------------------------------------------
# Image folder.
# ---------------------------------------------------------------------------
def test_image_folder(cifar_jpegs, tmp_path):
    classes = ("cat", "airplane", "dog")
    for cls in classes:
        for split, sl in (("train", slice(0, 30)), ("validation", slice(30, 35))):
            os.makedirs(tmp_path / split / cls)
            for name, jpeg in cifar_jpegs[cls][sl]:
                (tmp_path / split / cls / name).write_bytes(jpeg)
    info = data.resolve_dataset(data_dir=str(tmp_path))
    assert info.name == "folder"
    assert info.class_names == ("airplane", "cat", "dog")
    assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (
        3,
        90,
        15,
        32,
    )
    ds = data.make_dataset(
        info,
        str(tmp_path),
        "eval",
        batch_size=8,
        image_size=32,
        is_training=False,
        options=data.InputOptions(augmentation="none"),
    )
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    expected = [
        (label, jpeg)
        for label, cls in enumerate(info.class_names)
        for _, jpeg in cifar_jpegs[cls][30:35]
    ]
    np.testing.assert_array_equal(np.concatenate(ys), [e[0] for e in expected])
    np.testing.assert_array_equal(
        np.concatenate(xs), np.stack([_decode(e[1]) for e in expected])
    )
    ds = data.make_dataset(
        info,
        str(tmp_path),
        "train",
        batch_size=16,
        image_size=40,
        is_training=True,
        options=data.InputOptions(augmentation="inception"),
    )
    x, y = next(iter(ds))
    assert x.shape == (16, 40, 40, 3) and set(y.numpy()) <= {0, 1, 2}

    # A single folder of class folders is split by a deterministic holdout.
    single = tmp_path / "train"
    info = data.resolve_dataset("folder", data_dir=str(single))
    assert info.num_train + info.num_eval == 90 and info.num_eval == 9


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------
def test_tfds_dataset(cifar_jpegs, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    train_items = _items(cifar_jpegs, 6)
    test_items = _items(cifar_jpegs, 2, offset=6)

    class CifarSliceForTest(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(
                            shape=(32, 32, 3), encoding_format="jpeg"
                        ),
                        "label": tfds.features.ClassLabel(names=list(CLASSES)),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(train_items),
                "test": self._generate_examples(test_items),
            }

        def _generate_examples(self, items):
            for i, (jpeg, label, _) in enumerate(items):
                yield i, {"image": io.BytesIO(jpeg), "label": label}

    d = str(tmp_path)
    CifarSliceForTest(data_dir=d).download_and_prepare()
    name = "tfds:cifar_slice_for_test"
    info = data.resolve_dataset(name, data_dir=d)
    assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (
        10,
        60,
        20,
        32,
    )
    assert info.class_names == CLASSES

    ds = data.make_dataset(
        info,
        d,
        "eval",
        batch_size=32,
        image_size=32,
        is_training=False,
        options=data.InputOptions(augmentation="none"),
    )
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    assert sorted(np.concatenate(ys).tolist()) == sorted(it[1] for it in test_items)
    got = {
        (int(y), x.astype(np.uint8).tobytes())
        for x, y in zip(np.concatenate(xs), np.concatenate(ys))
    }
    want = {(it[1], _decode(it[0]).astype(np.uint8).tobytes()) for it in test_items}
    assert got == want

    cifar = data.InputOptions(augmentation="cifar")
    kw = dict(batch_size=8, image_size=32, is_training=True, seed=5)
    full = _batches(data.make_dataset(info, d, "train", options=cifar, **kw), 9)
    _assert_same_batches(
        full[8:9],
        _batches(data.make_dataset(info, d, "train", start_step=8, options=cifar, **kw), 1),
    )
    # Streamed (large-dataset) path: block shuffle instead of a full permutation.
    with monkeypatch.context() as m:
        m.setattr(tfrecord, "MEMORY_LIMIT_BYTES", 0)
        blocks = dataclasses.replace(cifar, shuffle_buffer=16)
        streamed = _batches(data.make_dataset(info, d, "train", options=blocks, **kw), 9)
        _assert_same_batches(
            streamed[8:9],
            _batches(
                data.make_dataset(info, d, "train", start_step=8, options=blocks, **kw),
                1,
            ),
        )
    parts = [_eval_examples(info, d, _ctx(i)) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == 10
    assert not set(parts[0]) & set(parts[1])

    # Split overrides.
    info = data.resolve_dataset(name + ":train[:50%]:train[50%:]", data_dir=d)
    assert (info.num_train, info.num_eval) == (30, 30)

    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        data.resolve_dataset("tfds:no_such_dataset_xyz", data_dir=d)
    with pytest.raises(ValueError, match="not prepared"):
        data.resolve_dataset("tfds:cifar10", data_dir=d)


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------
def test_center_crop_padding_formula():
    # crop = int(image_size / (image_size + 32) * min(h, w)).
    for h, w, s in ((100, 200, 32), (375, 500, 224), (32, 32, 224)):
        oy, ox, ch, cw = preprocessing.center_crop_window(h, w, s).numpy()
        crop = int(s / (s + 32) * min(h, w))
        assert ch == cw == crop
        assert (oy, ox) == ((h - crop + 1) // 2, (w - crop + 1) // 2)
    # Synthetic 128x160 image, image_size 96: crop 96/128*128 = 96 -> no resize,
    # so the output is exactly the centered 96x96 window.
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(128, 160, 3)).astype(np.uint8)
    png = tf.io.encode_png(img)
    out = preprocessing.preprocess_for_eval(png, 96).numpy()
    np.testing.assert_array_equal(out, img[16:112, 32:128].astype(np.float32))
    jpeg = tf.io.encode_jpeg(img, quality=95)
    out = preprocessing.preprocess_for_eval(jpeg, 96).numpy()
    assert out.shape == (96, 96, 3)
    # JPEGs are cropped while decoding (decode_and_crop_jpeg, as officially):
    # chroma upsampling differs on the window's border pixels only.
    np.testing.assert_array_equal(
        out[1:-1, 1:-1], tf.io.decode_jpeg(jpeg).numpy()[17:111, 33:127].astype(np.float32)
    )


def test_eval_center_crop_shape_and_range(cifar_jpegs):
    jpeg = cifar_jpegs["ship"][0][1]
    for size in (32, 224):
        out = preprocessing.preprocess_for_eval(jpeg, size)
        assert out.shape == (size, size, 3) and out.dtype == tf.float32
        out = out.numpy()
        assert out.min() >= 0.0 and out.max() <= 255.0


def test_inception_crop_deterministic_under_seed(cifar_jpegs):
    jpeg = cifar_jpegs["horse"][0][1]
    rng = np.random.RandomState(1)
    big = tf.io.encode_jpeg(rng.randint(0, 256, (300, 400, 3)).astype(np.uint8))
    for image in (jpeg, big):
        outs = [
            preprocessing.preprocess_for_train(
                image, 64, tf.constant([s, 0]), "inception"
            ).numpy()
            for s in (1, 1, 2, 3, 4)
        ]
        np.testing.assert_array_equal(outs[0], outs[1])
        assert sum(not np.array_equal(outs[0], o) for o in outs[2:]) >= 2
        for o in outs:
            assert o.shape == (64, 64, 3) and o.min() >= 0 and o.max() <= 255
    windows = {
        tuple(
            preprocessing.inception_crop_window(
                tf.constant([300, 400, 3]), tf.constant([s, 9])
            ).numpy()
        )
        for s in range(20)
    }
    for oy, ox, h, w in windows:
        assert 0 <= oy and oy + h <= 300 and 0 <= ox and ox + w <= 400
        assert h * w >= 0.08 * 300 * 400 - 1e-6 or (h, w) == (300, 400)
    assert len(windows) > 10


def test_cifar_augmentation_pads_and_crops():
    img = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    png = tf.io.encode_png(img)
    for aug in ("cifar", "cifar_zeros"):
        outs = [
            preprocessing.preprocess_for_train(png, 32, tf.constant([s, 1]), aug).numpy()
            for s in range(8)
        ]
        assert all(o.shape == (32, 32, 3) for o in outs)
        assert len({o.tobytes() for o in outs}) > 4
    out = preprocessing.preprocess_for_train(png, 48, tf.constant([0, 1]), "cifar")
    assert out.shape == (48, 48, 3)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------
def test_resolve_dataset_errors(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(ValueError, match="does_not_exist"):
        data.resolve_dataset(data_dir=missing)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(ValueError) as e:
        data.resolve_dataset(data_dir=empty)
    assert empty in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=empty):
        data.resolve_dataset("imagenet", data_dir=empty)
    with pytest.raises(ValueError, match=empty):
        data.resolve_dataset("folder", data_dir=empty)
    with pytest.raises(ValueError, match="bogus"):
        data.resolve_dataset("bogus")


# ---------------------------------------------------------------------------
# InputOptions.
# ---------------------------------------------------------------------------
def test_input_options_defaults_and_normalised_values():
    assert dataclasses.asdict(data.InputOptions()) == dict(
        augmentation="inception", auto_augment=None, randaugment_layers=2,
        randaugment_magnitude=10.0, auto_augment_fraction=1.0,
        auto_augment_constants="auto", source_tags=False, extra_views=(), cache=False,
        shuffle_buffer=None, holdout_shards=None, skip_bad_records=False)
    options = data.InputOptions(randaugment_layers=np.int64(3), randaugment_magnitude=15,
                                auto_augment_fraction=1, extra_views=["tda", "tda"])
    assert type(options.randaugment_layers) is int and options.randaugment_layers == 3
    assert type(options.randaugment_magnitude) is float
    assert type(options.auto_augment_fraction) is float
    assert options.extra_views == ("tda",)
    assert data.InputOptions(extra_views="tda").extra_views == ("tda",)
    hash(options)  # frozen and hashable, extra_views included
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.augmentation = "none"
    changed = dataclasses.replace(options, augmentation="cifar")
    assert (changed.augmentation, changed.extra_views) == ("cifar", ("tda",))


@pytest.mark.parametrize("field,value", [
    ("augmentation", "autoaugment"),
    ("auto_augment", "v1"),
    ("randaugment_layers", -1),
    ("randaugment_layers", 1.5),
    ("randaugment_magnitude", -0.5),
    ("randaugment_magnitude", float("nan")),
    ("auto_augment_fraction", 1.5),
    ("auto_augment_constants", "imagenet"),
    ("source_tags", 1),
    ("extra_views", ("texture",)),
    ("cache", "yes"),
    ("shuffle_buffer", 0),
    ("shuffle_buffer", True),
    ("holdout_shards", -1),
    ("holdout_shards", 1.5),
    ("skip_bad_records", None),
])
def test_input_options_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        data.InputOptions(**{field: value})


def test_input_options_from_data_config():
    from efficientnet_advprop import config
    from efficientnet_advprop.recipes import RECIPES

    cfg = config.DataConfig(augmentation="cifar", auto_augment="randaugment",
                            randaugment_layers=3, randaugment_magnitude=15.0,
                            auto_augment_fraction=None, skip_bad_records=True,
                            holdout_shards=2)
    options = data.InputOptions.from_data_config(cfg)
    assert options == data.InputOptions(
        augmentation="cifar", auto_augment="randaugment", randaugment_layers=3,
        randaugment_magnitude=15.0, auto_augment_fraction=1.0, skip_bad_records=True)
    # holdout_shards stays None: the DatasetInfo resolved with it carries it.
    assert options.holdout_shards is None
    tagged = data.InputOptions.from_data_config(cfg, RECIPES["fine_grained_advprop"])
    assert (tagged.source_tags, tagged.extra_views) == (True, ())
    assert tagged == dataclasses.replace(options, source_tags=True)
    views = data.InputOptions.from_data_config(
        dataclasses.replace(cfg, auto_augment_fraction=0.25), RECIPES["nofrost_star"])
    assert (views.source_tags, views.extra_views) == (False, ("tda",))
    assert views.auto_augment_fraction == 0.25
    with pytest.raises(ValueError, match="augmentation=None"):
        data.InputOptions.from_data_config(config.DataConfig())  # not resolved


def test_make_dataset_takes_input_options_only():
    info = data.resolve_dataset()
    kw = dict(batch_size=8, image_size=32, is_training=True)
    with pytest.raises(TypeError, match="InputOptions"):
        data.make_dataset(info, None, "train", options={"augmentation": "none"}, **kw)
    with pytest.raises(TypeError):  # no keyword shim for the old arguments
        data.make_dataset(info, None, "train", augmentation="none", **kw)
    # The default options are the inception augmentation: a different stream from
    # "none" with the same seed, the same labels.
    ((x0, y0),) = _batches(data.make_dataset(info, None, "train", **kw), 1)
    ((x1, y1),) = _batches(data.make_dataset(
        info, None, "train", options=data.InputOptions(augmentation="none"), **kw), 1)
    np.testing.assert_array_equal(y0, y1)
    assert not np.array_equal(x0, x1)
    ((x2, _),) = _batches(data.make_dataset(
        info, None, "train", options=data.InputOptions(augmentation="inception"), **kw), 1)
    np.testing.assert_array_equal(x0, x2)


# ---------------------------------------------------------------------------
# Skipping bad records.
# ---------------------------------------------------------------------------
def _good_images(items):
    return {_decode(jpeg).tobytes() for jpeg, _, _ in items}


def _record_offsets(path):
    """Start of every record of an uncompressed TFRecord file."""
    blob, offsets, at = open(path, "rb").read(), [], 0
    while at < len(blob):
        offsets.append(at)
        at += 12 + int.from_bytes(blob[at : at + 8], "little") + 4
    return offsets


def _damaged_tfrecords(cifar_jpegs, d):
    """Two train shards, no metadata. Shard 0: 10 good examples, one whose JPEG does
    not decode and one record that is not an Example; shard 1: 10 good examples, the
    payload of record 6 flipped (records 6-9 unreadable). Returns the good items."""
    items = _items(cifar_jpegs, 2)
    data.write_tfrecords(items, d, "train", 2)
    os.remove(os.path.join(d, tfrecord.METADATA_FILE))
    first, second = tfrecord.list_files(d, "train")
    records = [r.numpy() for r in tf.data.TFRecordDataset(first)]
    records += [
        tfrecord.make_example(b"not a jpeg", 3).SerializeToString(),
        b"not an Example proto",
    ]
    with tf.io.TFRecordWriter(first) as writer:
        for record in records:
            writer.write(record)
    blob = bytearray(open(second, "rb").read())
    blob[_record_offsets(second)[6] + 12 + 5] ^= 0xFF
    open(second, "wb").write(bytes(blob))
    return items[0::2] + items[1::2][:6]


@pytest.mark.parametrize("stream", [False, True])
def test_skip_bad_records_in_tfrecords(cifar_jpegs, tmp_path, monkeypatch, stream):
    if stream:
        monkeypatch.setattr(tfrecord, "MEMORY_LIMIT_BYTES", 0)
    d = str(tmp_path)
    good = _damaged_tfrecords(cifar_jpegs, d)
    info = data.resolve_dataset(data_dir=d, skip_bad_records=True)
    assert info.num_train == 22  # record headers; the payload damage is not seen yet
    kw = dict(batch_size=4, image_size=32, is_training=True, seed=1)
    plain = data.InputOptions(augmentation="none")
    skipping = data.InputOptions(augmentation="none", skip_bad_records=True)
    with pytest.raises(tf.errors.OpError):  # without the option the run stops
        _batches(data.make_dataset(info, d, "train", options=plain, **kw), 6)
    counter = data.make_skip_counter()
    ds = data.make_dataset(info, d, "train", options=skipping, skip_counter=counter, **kw)
    # In memory the shards are read at once: the non-Example and the 4 unreadable
    # records are counted then; streamed shards count as they are read.
    assert int(counter.numpy()) == (0 if stream else 5)
    batches = _batches(ds, 25)
    allowed = _good_images(good)
    assert all(image.tobytes() in allowed for x, _ in batches for image in x)
    # Over 25 batches (> 5 epochs) the bad JPEG is met (and, streamed, every epoch
    # also misses the non-Example and the 4 lost positions).
    assert int(counter.numpy()) >= (20 if stream else 6)
    again = data.make_dataset(info, d, "train", options=skipping, **kw)
    _assert_same_batches(batches[:5], _batches(again, 5))  # still deterministic


def test_skip_bad_records_in_an_image_folder(cifar_jpegs, tmp_path):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / cls)
        for name, jpeg in cifar_jpegs[cls][:10]:
            (tmp_path / "train" / cls / name).write_bytes(jpeg)
    for k in range(3):
        (tmp_path / "train" / "cat" / f"zz_broken_{k}.jpg").write_bytes(b"not a jpeg")
    info = data.resolve_dataset(data_dir=str(tmp_path), skip_bad_records=True)
    kw = dict(batch_size=4, image_size=32, is_training=True, seed=2)
    plain = data.InputOptions(augmentation="none")
    skipping = data.InputOptions(augmentation="none", skip_bad_records=True)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _batches(data.make_dataset(info, str(tmp_path), "train", options=plain, **kw), 10)
    counter = data.make_skip_counter()
    ds = data.make_dataset(info, str(tmp_path), "train", options=skipping,
                           skip_counter=counter, **kw)
    batches = _batches(ds, 20)
    good = [(jpeg, 0, "cat") for _, jpeg in cifar_jpegs["cat"][:10]]
    good += [(jpeg, 1, "dog") for _, jpeg in cifar_jpegs["dog"][:10]]
    allowed = _good_images(good)
    assert all(image.tobytes() in allowed for x, _ in batches for image in x)
    assert int(counter.numpy()) >= 3
    with pytest.raises(ValueError, match="training data only"):
        data.make_dataset(info, str(tmp_path), "eval", batch_size=4, image_size=32,
                          is_training=False, options=skipping)
