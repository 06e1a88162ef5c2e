"""Tests of scripts/build_tfrecords.py, efficientnet_advprop.data.convert and holdout shards.

Real CIFAR-10 JPEGs from the shared tarball (a few dozen) in a tmp image folder.
Multi-pipeline reads of plain TFRecord dirs are covered in test_data.py
(test_two_pipelines_train_disjoint, test_two_pipelines_eval_disjoint_and_complete);
here only their combination with holdout shards is tested.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import data
from efficientnet_advprop.data import convert
from efficientnet_advprop.data import tfrecord

from conftest import REPO_ROOT, SHARED_DATA  # pylint: disable=g-bad-import-order

SCRIPT = os.path.join(REPO_ROOT, "scripts", "build_tfrecords.py")
CLASSES = ("airplane", "cat", "dog", "ship")
TRAIN_PER_CLASS, EVAL_PER_CLASS = 10, 3
PNG_FILES = ("train/cat/zz_png_0.png", "train/ship/zz_png_1.png")


def _ctx(i, n=2):
    return tf.distribute.InputContext(
        num_input_pipelines=n, input_pipeline_id=i, num_replicas_in_sync=n
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """DIR/train/<class>/ (10 JPEGs + 2 PNGs) and DIR/validation/<class>/ (3 JPEGs)."""
    if not os.path.exists(SHARED_DATA):
        pytest.skip(f"{SHARED_DATA} not available")
    root = tmp_path_factory.mktemp("src")
    need = TRAIN_PER_CLASS + EVAL_PER_CLASS
    got = {c: [] for c in CLASSES}
    with tarfile.open(SHARED_DATA, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[1] in got:
                if len(got[parts[1]]) < need:
                    got[parts[1]].append((parts[2], tar.extractfile(member).read()))
            if all(len(v) >= need for v in got.values()):
                break
    for cls, files in got.items():
        for i, (name, jpeg) in enumerate(sorted(files)):
            d = root / ("train" if i < TRAIN_PER_CLASS else "validation") / cls
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(jpeg)
    for i, rel in enumerate(PNG_FILES):
        pixels = tf.io.decode_jpeg(got[CLASSES[i]][-1][1], channels=3)
        (root / rel).write_bytes(tf.io.encode_png(pixels).numpy())
    return str(root)


def _records(out, prefix):
    """[(shard index, parsed Example)] of all prefix-* files in order."""
    out_list = []
    for i, path in enumerate(tfrecord.list_files(out, prefix)):
        comp = tfrecord.detect_compression(path)
        for raw in tf.data.TFRecordDataset(path, compression_type=comp):
            out_list.append((i, tf.train.Example.FromString(raw.numpy())))
    return out_list


def _feature(ex, key):
    f = ex.features.feature[key]
    return f.int64_list.value[0] if f.int64_list.value else f.bytes_list.value[0]


def _key(pixels):
    return np.asarray(pixels).astype(np.uint8).tobytes()


def _decoded_key(encoded):
    return _key(tf.io.decode_jpeg(encoded, channels=3).numpy())


def _eval_images(info, d, split, input_context=None, **kw):
    ds = data.make_dataset(
        info, d, split, batch_size=16, image_size=32, is_training=False,
        input_context=input_context, options=data.InputOptions(augmentation="none", **kw),
    )
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------
# Conversion round trip.
# ---------------------------------------------------------------------------
def test_image_folder_round_trip(src, tmp_path):
    out = str(tmp_path / "out")
    summary = convert.convert_image_folder(src, out, num_shards=2, num_eval_shards=1)
    n_train = len(CLASSES) * TRAIN_PER_CLASS + len(PNG_FILES)
    n_eval = len(CLASSES) * EVAL_PER_CLASS
    assert (summary.images, summary.shards, summary.reencoded) == (n_train + n_eval, 3, 2)
    files = sorted(os.listdir(out))
    assert files == ["dataset_info.json", "train-00000-of-00002", "train-00001-of-00002",
                     "validation-00000-of-00001"]
    assert summary.bytes == sum(os.path.getsize(os.path.join(out, f)) for f in files[1:])
    assert f"wrote {n_train + n_eval} images, 3 shards, {summary.bytes:,} bytes" in (
        summary.line())
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no staging left
    with open(os.path.join(out, tfrecord.METADATA_FILE)) as f:
        assert json.load(f)["class_names"] == list(CLASSES)

    info = data.resolve_dataset(data_dir=out)
    assert (info.name, info.num_classes, info.num_train, info.num_eval) == (
        "imagenet", len(CLASSES), n_train, n_eval)
    assert info.class_names == CLASSES

    for prefix, split, count in (("train", "train", n_train), ("validation", "eval", n_eval)):
        records = _records(out, prefix)
        assert len(records) == count
        expected_pixels, expected_labels, seen = [], [], set()
        for _, ex in records:
            rel = _feature(ex, "image/filename").decode()
            seen.add(rel)
            split_dir, cls, _ = rel.split("/")
            assert split_dir == prefix
            label = CLASSES.index(cls)
            # Official convention: stored 1..num_classes, read back 0-based.
            assert _feature(ex, "image/class/label") == label + 1
            assert _feature(ex, "image/class/text").decode() == cls
            assert _feature(ex, "image/format") == b"JPEG"
            stored = _feature(ex, "image/encoded")
            with open(os.path.join(src, rel), "rb") as f:
                source = f.read()
            assert convert.is_jpeg(stored)
            if rel in PNG_FILES:  # re-encoded at quality 95 (lossy)
                png = tf.io.decode_png(source, channels=3)
                assert stored == tf.io.encode_jpeg(png, quality=95).numpy()
                jpg = tf.io.decode_jpeg(stored, channels=3).numpy()
                assert np.abs(png.numpy().astype(np.float32) - jpg).mean() < 5.0
                expected_pixels.append(jpg)
            else:
                assert stored == source  # byte for byte
                expected_pixels.append(tf.io.decode_jpeg(source, channels=3).numpy())
            assert (_feature(ex, "image/height"), _feature(ex, "image/width")) == (32, 32)
            expected_labels.append(label)
        assert len(seen) == count  # every source file exactly once
        # The eval path decodes pixel-identical images, in file order.
        xs, ys = _eval_images(info, out, split)
        np.testing.assert_array_equal(ys, expected_labels)
        np.testing.assert_array_equal(xs, np.stack(expected_pixels).astype(np.float32))


def test_flat_folder_gzip_and_bad_image(src, tmp_path):
    flat = os.path.join(src, "validation")  # DIR/<class>/ -> one split
    out = str(tmp_path / "flat")
    summary = convert.convert_image_folder(flat, out, 2, split_name="validation",
                                           compress=True, shuffle=False)
    assert [s.split for s in summary.splits] == ["validation"]
    assert tfrecord.detect_compression(os.path.join(out, "validation-00000-of-00002"))
    records = _records(out, "validation")
    # Without shuffling, sorted (class, file) order dealt round-robin to 2 shards.
    names = sorted(f"{c}/{f}" for c in CLASSES for f in os.listdir(os.path.join(flat, c)))
    assert [_feature(ex, "image/filename").decode() for _, ex in records] == (
        names[0::2] + names[1::2])

    # An undecodable file fails the conversion and leaves nothing behind.
    bad = tmp_path / "bad"
    (bad / "cat").mkdir(parents=True)
    with open(os.path.join(flat, "cat", sorted(os.listdir(os.path.join(flat, "cat")))[0]),
              "rb") as f:
        (bad / "cat" / "a.jpg").write_bytes(f.read())
    (bad / "cat" / "b.png").write_bytes(b"this is not an image")
    before = set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="b.png"):
        convert.convert_image_folder(str(bad), str(tmp_path / "new" / "out"), 1)
    assert set(os.listdir(tmp_path)) == before


def test_tfds_conversion(src, tmp_path):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    items = []
    for label, cls in enumerate(CLASSES):
        d = os.path.join(src, "validation", cls)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                items.append((tf.io.decode_jpeg(f.read()).numpy(), label))

    class TfrecordSliceForTest(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(32, 32, 3)),  # PNG
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(items[:8]),
                    "test": self._generate_examples(items[8:])}

        def _generate_examples(self, subset):
            for i, (pixels, label) in enumerate(subset):
                buf = io.BytesIO(tf.io.encode_png(pixels).numpy())
                yield i, {"image": buf, "label": label}

    d = str(tmp_path / "tfds")
    TfrecordSliceForTest(data_dir=d).download_and_prepare()
    out = str(tmp_path / "out")
    summary = convert.convert_tfds("tfrecord_slice_for_test", out, 2, data_dir=d,
                                   eval_split="test")
    assert [(s.split, s.images, s.shards, s.reencoded) for s in summary.splits] == [
        ("train", 8, 2, 8), ("validation", 4, 1, 4)]
    info = data.resolve_dataset(data_dir=out)
    assert (info.num_train, info.num_eval, info.class_names) == (8, 4, CLASSES)
    _, ys = _eval_images(info, out, "train")
    assert sorted(ys.tolist()) == sorted(label for _, label in items[:8])
    with pytest.raises(ValueError, match="--tfds_name=no_such_dataset_xyz"):
        convert.convert_tfds("no_such_dataset_xyz", str(tmp_path / "o2"), data_dir=d)


# ---------------------------------------------------------------------------
# The script.
# ---------------------------------------------------------------------------
def _run(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_converts(src, tmp_path):
    r = _run(tmp_path, f"--input_dir={src}", "--output_dir=out", "--num_shards=2",
             "--compress", "--noprogress")
    assert r.returncode == 0, r.stderr
    n = len(CLASSES) * (TRAIN_PER_CLASS + EVAL_PER_CLASS) + len(PNG_FILES)
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith(f"wrote {n} images, ") and "bytes" in line
    assert "2 non-JPEG images re-encoded as JPEG (quality 95)" in line
    assert os.listdir(tmp_path) == ["out"]
    info = data.resolve_dataset(data_dir=str(tmp_path / "out"))
    assert info.num_train + info.num_eval == n


def test_script_bad_input(src, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--input_dir=missing", "--output_dir=o"], "--input_dir=missing"),
        (["--input_dir=empty", "--output_dir=o"], "--input_dir=empty"),
        ([f"--input_dir={src}", "--output_dir=full"], "--output_dir=full"),
        ([f"--input_dir={src}", "--output_dir=o", "--num_shards=0"], "--num_shards=0"),
        (["--output_dir=o"], "--input_dir"),
        (["--input_dir=noimg", "--output_dir=o/deeper"], "--input_dir=noimg"),  # imports TF
    ]
    for args, named in cases:
        r = _run(tmp_path, *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("build_tfrecords.py: error: ") and named in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["empty", "full", "noimg"]
    assert os.listdir(tmp_path / "full") == ["x"]


# ---------------------------------------------------------------------------
# Holdout shards.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_shards(src, tmp_path_factory):
    """The train folder in 4 shards; returns (dir, [set of pixel keys per shard])."""
    out = str(tmp_path_factory.mktemp("holdout") / "out")
    convert.convert_image_folder(os.path.join(src, "train"), out, 4)
    shards = [[] for _ in range(4)]
    for i, ex in _records(out, "train"):
        shards[i].append(_decoded_key(_feature(ex, "image/encoded")))
    assert all(len(set(s)) == len(s) for s in shards)
    return out, shards


@pytest.mark.parametrize("stream", [False, True])
def test_holdout_shards(four_shards, monkeypatch, stream):
    out, shards = four_shards
    if stream:  # Force the streamed (large-dataset) path: interleave + blocks.
        monkeypatch.setattr(tfrecord, "MEMORY_LIMIT_BYTES", 0)
    info = data.resolve_dataset(data_dir=out, holdout_shards=1)
    kept = set().union(*shards[1:])  # the first shard is held out (official)
    assert (info.num_train, info.num_eval, info.holdout_shards) == (
        len(kept), len(shards[0]), 1)
    batch = 8
    steps = len(kept) // batch
    ds = data.make_dataset(info, out, "train", batch_size=batch, image_size=32,
                           is_training=True, seed=1,
                           options=data.InputOptions(augmentation="none",
                                                     shuffle_buffer=16))
    epochs = [[], [], []]
    for step, (x, _) in enumerate(ds.take(3 * steps)):
        epochs[step // steps].extend(_key(xi) for xi in x.numpy())
    for keys in epochs:
        assert len(set(keys)) == len(keys) == steps * batch
        assert set(keys) <= kept  # never an example of the held-out shard
    assert not set().union(*epochs) & set(shards[0])
    # Eval: exactly the first shard, in file order.
    xs, _ = _eval_images(info, out, "eval")
    assert [_key(x) for x in xs] == shards[0]


def test_holdout_shards_two_pipelines(four_shards):
    out, shards = four_shards
    info = data.resolve_dataset("imagenet", out, holdout_shards=1)
    # Train: 3 files over 2 pipelines (by file: shards 1, 3 and shard 2); one epoch each.
    seen = []
    for i, files in ((0, (1, 3)), (1, (2,))):
        n = sum(len(shards[f]) for f in files)
        ds = data.make_dataset(info, out, "train", batch_size=n, image_size=32,
                               is_training=True, input_context=_ctx(i),
                               options=data.InputOptions(augmentation="none"))
        (x, _), = ds.take(1)
        seen.append([_key(xi) for xi in x.numpy()])
        assert sorted(seen[-1]) == sorted(k for f in files for k in shards[f])
    assert len(seen[0]) + len(seen[1]) == len(set(seen[0]) | set(seen[1]))
    assert set(seen[0]) | set(seen[1]) == set().union(*shards[1:])
    # Eval: the one held-out file is split by record.
    parts = [[_key(x) for x in _eval_images(info, out, "eval", _ctx(i))[0]] for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(shards[0])
    assert not set(parts[0]) & set(parts[1])


def test_holdout_shards_api(four_shards, src):
    out, shards = four_shards
    plain = data.resolve_dataset(data_dir=out)
    assert (plain.num_eval, plain.holdout_shards) == (0, 0)
    # make_dataset's own argument works on an info resolved without it ...
    xs, _ = _eval_images(plain, out, "eval", holdout_shards=1)
    assert [_key(x) for x in xs] == shards[0]
    xs, _ = _eval_images(plain, out, "eval", holdout_shards=2)
    assert sorted(_key(x) for x in xs) == sorted(shards[0] + shards[1])
    # ... but may not contradict the info's.
    info = data.resolve_dataset(data_dir=out, holdout_shards=1)
    with pytest.raises(ValueError, match="holdout_shards"):
        _eval_images(info, out, "eval", holdout_shards=2)
    with pytest.raises(ValueError, match="--holdout_shards=4"):
        data.resolve_dataset(data_dir=out, holdout_shards=4)
    with pytest.raises(ValueError, match="--holdout_shards=1"):
        data.resolve_dataset("folder", src, holdout_shards=1)
    with pytest.raises(ValueError, match="--holdout_shards=-1"):
        data.resolve_dataset(data_dir=out, holdout_shards=-1)
    embedded = data.resolve_dataset(holdout_shards=1)  # 2 train files of 7,500
    assert (embedded.num_train, embedded.num_eval, embedded.holdout_shards) == (7500, 7500, 1)
