"""mCE, the ImageNet-A/R class subsets and the distribution-shift readers."""

import os

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop.data import corruptions
from efficientnet_advprop.evaluation import distribution_shift as ds


def test_mce_against_a_hand_example():
    errors = {"fog": [0.2, 0.4, 0.6], "snow": [0.1, 0.1, 0.4]}
    baseline = {"fog": [0.5, 0.6, 0.9], "snow": [0.5, 0.5, 0.5]}
    ce_fog = 100 * (0.2 + 0.4 + 0.6) / (0.5 + 0.6 + 0.9)
    ce_snow = 100 * (0.1 + 0.1 + 0.4) / (0.5 + 0.5 + 0.5)
    result = ds.mean_corruption_error(errors, baseline)
    assert result["mce"] == pytest.approx((ce_fog + ce_snow) / 2)
    assert result["per_corruption"]["fog"]["ce"] == pytest.approx(ce_fog)
    assert result["per_corruption"]["snow"]["mean_error"] == pytest.approx(0.2)
    assert result["mce_unnormalized"] == pytest.approx((0.4 + 0.2) / 2)
    # A baseline given as one severity-averaged number per corruption: same ratio.
    averaged = {name: float(np.mean(values)) for name, values in baseline.items()}
    assert ds.mean_corruption_error(errors, averaged)["mce"] == pytest.approx(result["mce"])
    plain = ds.mean_corruption_error(errors)
    assert plain["mce"] is None and plain["per_corruption"]["fog"]["ce"] is None
    assert plain["mce_unnormalized"] == pytest.approx(result["mce_unnormalized"])


def test_mce_with_the_alexnet_baseline():
    alexnet = ds.alexnet_errors()
    same = {name: [alexnet[name]] * 5 for name in corruptions.CORRUPTIONS}
    assert ds.mean_corruption_error(same, "alexnet")["mce"] == pytest.approx(100.0)
    halved = {name: [v / 2 for v in values] for name, values in same.items()}
    result = ds.mean_corruption_error(halved, "alexnet")
    assert result["mce"] == pytest.approx(50.0)
    assert result["mce_unnormalized"] == pytest.approx(np.mean(list(alexnet.values())) / 2)


@pytest.mark.parametrize("errors, baseline, message", [
    ({}, None, "errors"),
    ({"fog": [20.0, 30.0]}, None, "fractions"),
    ({"fog": [0.2, float("nan")]}, None, "fractions"),
    ({"fog": [0.2]}, {"snow": [0.5]}, "no entry for corruption 'fog'"),
    ({"fog": [0.2, 0.3]}, {"fog": [0.5, 0.5, 0.5]}, "severities"),
    ({"fog": [0.2]}, "resnet", "baseline='resnet'"),
    ({"fog": [0.2]}, {"fog": [0.0]}, "must be > 0"),
])
def test_mce_bad_arguments(errors, baseline, message):
    with pytest.raises(ValueError, match=message):
        ds.mean_corruption_error(errors, baseline)


def test_alexnet_constants_load():
    alexnet = ds.alexnet_errors()
    assert tuple(alexnet) == corruptions.CORRUPTIONS
    assert all(0 < v < 1 for v in alexnet.values())
    assert ds.third_party_dir().joinpath("imagenet_c", "alexnet_errors.json").is_file()


def test_imagenet_wnids():
    wnids = ds.imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and list(wnids) == sorted(wnids)
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_200_class_subsets(name):
    indices = getattr(ds, f"{name}_indices")()
    wnids = getattr(ds, f"{name}_wnids")()
    assert len(indices) == 200 == len(set(indices)) == len(wnids)
    assert list(indices) == sorted(indices) and 0 <= min(indices) and max(indices) < 1000
    # The two lists were taken separately; they must name the same classes.
    assert [ds.imagenet_wnids()[i] for i in indices] == list(wnids)


def test_tfds_labels_use_the_same_class_order(tmp_path):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    names = tfds.builder("imagenet_a", data_dir=str(tmp_path)).info.features["label"].names
    assert tuple(names) == ds.imagenet_wnids()


def test_class_subset_logits_and_labels():
    indices = ds.imagenet_r_indices()
    logits = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000)
    subset = ds.class_subset_logits(logits, indices).numpy()
    np.testing.assert_array_equal(subset, logits[:, list(indices)])
    label_map = ds.label_map_for_subset(indices)
    assert label_map.shape == (1000,) and (label_map >= 0).sum() == 200
    assert 0 not in indices  # class 0 (tench) is not in ImageNet-R
    labels = ds.subset_labels([indices[0], indices[57], 0], indices).numpy()
    np.testing.assert_array_equal(labels, [0, 57, -1])
    # A class outside the subset with the highest logit does not count as a mistake.
    outside = next(i for i in range(1000) if i not in set(indices))
    scores = np.zeros([1, 1000], np.float32)
    scores[0, outside], scores[0, indices[3]] = 9.0, 5.0
    assert int(tf.argmax(ds.class_subset_logits(scores, indices), -1)[0]) == 3
    for bad in ([1, 1], [1000], [[1, 2]]):
        with pytest.raises(ValueError, match="indices"):
            ds.label_map_for_subset(bad)


PALETTE = ((200, 40, 40), (40, 180, 60), (50, 70, 210))


def _write_folder(root, classes, per_class=2, size=40):
    """JPEGs of solid colours under root/<class>/; returns {class: colour}."""
    colours = {}
    for k, name in enumerate(classes):
        colour = np.array(PALETTE[k % len(PALETTE)])
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            image = np.tile(colour.astype(np.uint8), [size, size + 8 * i, 1])
            tf.io.write_file(os.path.join(root, name, f"img{i}.jpg"), tf.io.encode_jpeg(image))
        colours[name] = colour
    return colours


def _read_all(dataset):
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)


def test_wnid_folder_is_read_with_imagenet_labels(tmp_path):
    classes = [ds.imagenet_a_wnids()[k] for k in (0, 7, 199)]
    colours = _write_folder(str(tmp_path / "imagenet-a"), classes)
    data_dir = str(tmp_path / "imagenet-a")
    images, labels = _read_all(ds.shift_dataset("imagenet_a", data_dir, batch_size=4,
                                                image_size=24, augmentation="none"))
    wnids = ds.imagenet_wnids()
    expected = [wnids.index(w) for w in classes for _ in range(2)]
    np.testing.assert_array_equal(labels, expected)
    assert images.shape == (6, 24, 24, 3) and images.dtype == np.float32
    for image, label in zip(images, labels):
        colour = colours[wnids[label]]
        assert np.abs(image.mean(axis=(0, 1)) - colour).max() < 8
    _, subset = _read_all(ds.shift_dataset("imagenet_a", data_dir, batch_size=4,
                                           image_size=24, subset=True))
    np.testing.assert_array_equal(subset, [0, 0, 7, 7, 199, 199])
    with pytest.raises(ValueError, match="outside imagenet_r"):
        ds.shift_dataset("imagenet_r", data_dir, batch_size=4, image_size=24, subset=True)


def test_any_folder_and_stylized_imagenet(tmp_path):
    _write_folder(str(tmp_path / "pets"), ["dog", "cat"], per_class=1)
    _, labels = _read_all(ds.shift_dataset("folder", str(tmp_path / "pets"), batch_size=8,
                                           image_size=16))
    np.testing.assert_array_equal(labels, [0, 1])  # sorted folder names: cat, dog
    with pytest.raises(ValueError, match="not ImageNet WordNet IDs"):
        ds.shift_dataset("stylized_imagenet", str(tmp_path / "pets"), batch_size=8,
                         image_size=16)
    wnids = ds.imagenet_wnids()
    _write_folder(str(tmp_path / "stylized"), [wnids[5], wnids[900]], per_class=1)
    _, labels = _read_all(ds.shift_dataset("stylized_imagenet", str(tmp_path / "stylized"),
                                           batch_size=8, image_size=16))
    np.testing.assert_array_equal(labels, [5, 900])


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="name='imagenet_x'"):
        ds.shift_dataset("imagenet_x", str(tmp_path), batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="no TFDS dataset"):
        ds.shift_dataset("stylized_imagenet", str(tmp_path), batch_size=2, image_size=8,
                         source="tfds")
    with pytest.raises(ValueError, match="subset=True"):
        ds.shift_dataset("imagenet_sketch", str(tmp_path), batch_size=2, image_size=8,
                         subset=True)
    with pytest.raises(ValueError, match="imagenet_r") as info:
        ds.shift_dataset("imagenet_r", str(tmp_path), batch_size=2, image_size=8)
    assert "\n" not in str(info.value)
