"""Extra per-image views of the input pipeline (InputOptions(extra_views=...)) and how
they reach the recipes: NoFrost*'s TDA view, made from the decoded image."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_advprop import data
from efficientnet_advprop.attacks import AttackConfig
from efficientnet_advprop.data import preprocessing, tda
from efficientnet_advprop.recipes import StepContext, make_recipe
from efficientnet_advprop.recipes.base import Recipe, RecipeOutput, batch_metrics
from efficientnet_advprop.training import TrainConfig, Trainer

BLUE = 60  # the ramp images' constant blue channel


def _ramp(height, width, blue=BLUE):
    """uint8 [h, w, 3]: red = column ramp 0..255, green = row ramp 0..255, blue const."""
    image = np.zeros((height, width, 3))
    image[..., 0] = np.linspace(0.0, 255.0, width)[None, :]
    image[..., 1] = np.linspace(0.0, 255.0, height)[:, None]
    image[..., 2] = blue
    return np.round(image).astype(np.uint8)


def _crop_of(view, height, width, blue=BLUE):
    """(crop height, crop width, flipped) in source pixels that a view of a _ramp image
    shows, read off its content; None when a colour op changed it (blue moved)."""
    if np.abs(view[..., 2] - blue).max() > 0.5:
        return None
    size = view.shape[0]
    red = view[..., 0].mean(axis=0)  # per output column
    green = view[..., 1].mean(axis=1)  # per output row
    # Output pixel centres 0 and size-1 sample source positions (size-1)/size of the
    # crop apart (bilinear, half-pixel centres).
    scale = size / (size - 1.0)
    crop_w = abs(red[-1] - red[0]) / (255.0 / (width - 1)) * scale
    crop_h = abs(green[-1] - green[0]) / (255.0 / (height - 1)) * scale
    assert np.all(np.diff(green) > 0)  # rows never flip
    flipped = red[-1] < red[0]
    assert np.all(np.diff(red) < 0) if flipped else np.all(np.diff(red) > 0)
    return crop_h, crop_w, flipped


@pytest.mark.parametrize("height, width", [(32, 32), (60, 80)])
def test_tda_view_is_a_crop_of_at_least_64_percent_of_the_decoded_image(height, width):
    image = _ramp(height, width)
    areas, flips = [], []
    for s in range(40):
        view = tda.tda_view(image, 32, tf.constant([s, 17], tf.int64)).numpy()
        assert view.shape == (32, 32, 3) and view.dtype == np.float32
        assert view.min() >= 0.0 and view.max() <= 255.0
        crop = _crop_of(view, height, width)
        if crop is None:
            continue
        crop_h, crop_w, flipped = crop
        # Antialiasing (when shrinking) pulls the edge samples in by < 1 source pixel.
        assert crop_h <= height + 0.5 and crop_w <= width + 0.5
        areas.append((crop_h + 1.0) * (crop_w + 1.0) / (height * width))
        assert 0.75 * 0.9 <= crop_w / crop_h <= 4 / 3 / 0.9  # aspect ratio (3/4, 4/3)
        flips.append(flipped)
    assert len(areas) >= 15  # colour distortion fires on about 44 % of the views
    assert min(areas) >= 0.64 * 0.95
    assert min(areas) < 0.8 < max(areas)  # scales spread over (0.64, 1)
    assert 0 < sum(flips) < len(flips)


def test_tda_view_deterministic_per_seed():
    image = _ramp(40, 40)
    seed = tf.constant([3, 4], tf.int64)
    a = tda.tda_view(image, 32, seed).numpy()
    np.testing.assert_array_equal(a, tda.tda_view(image, 32, seed).numpy())
    others = [tda.tda_view(image, 32, tf.constant([3, k], tf.int64)).numpy()
              for k in range(5, 9)]
    assert all(not np.array_equal(a, b) for b in others)
    # Inside a tf.function (the input pipeline) with a dynamic image size: same result.
    fn = tf.function(lambda x, s: tda.tda_view(x, 32, s),
                     input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                      tf.TensorSpec([2], tf.int64)])
    np.testing.assert_allclose(fn(image, seed).numpy(), a, atol=1e-3)


@pytest.fixture(scope="module")
def ramp_folder(tmp_path_factory):
    """A 4-class image folder, one 48x64 ramp PNG per class (blue = 40 * class)."""
    root = tmp_path_factory.mktemp("ramps")
    files = {}
    for split in ("train", "validation"):
        for label in range(4):
            d = root / split / f"c{label}"
            os.makedirs(d)
            png = tf.io.encode_png(_ramp(48, 64, blue=40 * label)).numpy()
            (d / "ramp.png").write_bytes(png)
            files[label] = png
    return str(root), files


def _tda_pipeline(root, start_step=0, **kw):
    info = data.resolve_dataset("folder", data_dir=root)
    options = data.InputOptions(augmentation="inception", extra_views=("tda",), **kw)
    return data.make_dataset(info, root, "train", batch_size=4, image_size=32,
                             is_training=True, seed=3, start_step=start_step,
                             options=options)


def test_make_dataset_tda_view_comes_from_the_decoded_image(ramp_folder):
    root, files = ramp_folder
    ds = _tda_pipeline(root)
    assert set(ds.element_spec[2]) == {"tda_images"}
    assert ds.element_spec[2]["tda_images"].shape == (4, 32, 32, 3)
    batches = [(x.numpy(), y.numpy(), e["tda_images"].numpy())
               for x, y, e in ds.take(2)]
    (images, labels, views), (_, labels1, views1) = batches
    # Example i of epoch e: the TDA view of the whole decoded file, seeded from
    # (seed, e, i) -- not a transform of the (inception-cropped) training image.
    for epoch, (lab, vws) in enumerate([(labels, views), (labels1, views1)]):
        for i, label in enumerate(lab):
            expected = preprocessing.tda_view_for_train(
                files[label], 32, preprocessing.example_seed(3, epoch, i)).numpy()
            np.testing.assert_allclose(vws[i], expected, atol=1e-3)
    assert not np.allclose(views, images)
    # Each view shows >= 64 % of the 48x64 picture (when no colour op hid the ramps).
    for view, label in zip(np.concatenate([views, views1]), np.concatenate([labels, labels1])):
        crop = _crop_of(view, 48, 64, blue=40 * label)
        if crop is not None:
            assert (crop[0] + 1) * (crop[1] + 1) >= 0.64 * 0.95 * 48 * 64
    # The same image gets a different view at a different step.
    first = {int(label): v for label, v in zip(labels, views)}
    assert all(not np.allclose(first[int(label)], v) for label, v in zip(labels1, views1))
    # Deterministic, and a resumed stream (start_step=1) continues it exactly.
    again = [(e["tda_images"].numpy()) for _, _, e in _tda_pipeline(root).take(2)]
    np.testing.assert_array_equal(again[0], views)
    np.testing.assert_array_equal(again[1], views1)
    resumed = next(iter(_tda_pipeline(root, start_step=1)))
    np.testing.assert_array_equal(resumed[2]["tda_images"].numpy(), views1)
    # Source tags and views share the extras dict.
    both = next(iter(_tda_pipeline(root, source_tags=True)))
    assert set(both[2]) == {"source_tags", "tda_images"}
    np.testing.assert_array_equal(both[2]["tda_images"].numpy(), views)
    with pytest.raises(ValueError, match="training data only"):
        data.make_dataset(data.resolve_dataset("folder", data_dir=root), root, "eval",
                          batch_size=4, image_size=32, is_training=False,
                          options=data.InputOptions(extra_views=("tda",)))


# ------------------------------------------------------------------ recipes and loop
def test_step_context_extras_and_source_tags():
    tags = tf.constant([0, 1], tf.int32)
    ctx = StepContext(seed=tf.constant([1, 2], tf.int64), source_tags=tags)
    assert ctx.extras["source_tags"] is tags and ctx.source_tags is tags
    ctx = StepContext(seed=tf.constant([1, 2], tf.int64), extras={"source_tags": tags})
    assert ctx.source_tags is tags
    assert StepContext(seed=tf.constant([1, 2], tf.int64)).source_tags is None
    assert StepContext(seed=tf.constant([1, 2], tf.int64)).extras == {}
    assert Recipe.input_views == () and make_recipe("nofrost_star", 10).input_views == ("tda",)
    assert make_recipe("nofrost", 10).input_views == ()


def test_nofrost_star_uses_the_pipeline_tda_view_and_names_what_is_missing():
    recipe = make_recipe("nofrost_star", 10, attack=AttackConfig(epsilon=4.0, num_iter=1))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    tda_images = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    seed = tf.constant([5, 6], tf.int64)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    labels = rng.integers(0, 10, 6).astype("int32")
    with pytest.raises(ValueError, match=r"tda_images.*extra_views"):
        recipe.compute(model, images, labels, StepContext(seed=seed))
    out = recipe.compute(model, images, labels,
                         StepContext(seed=seed, extras={"tda_images": tda_images}))
    assert "accuracy/augmented" in out.metrics and np.isfinite(float(out.loss_sum))


class _ExtrasProbe(Recipe):
    """Plain cross-entropy, plus metrics computed from the batch's extras: what the
    loop reports is what each replica received."""

    name = "extras_probe"
    needs_source_tags = True
    input_views = ("tda",)

    def compute(self, model, images, labels, ctx):
        logits = model(images, training=True)
        loss = self.loss(labels, logits)
        metrics = batch_metrics("clean", labels, logits, loss)
        views = tf.cast(ctx.extras["tda_images"], tf.float32)
        count = tf.cast(tf.shape(views)[0], tf.float32)
        metrics["probe/tda_mean"] = (tf.reduce_sum(tf.reduce_mean(views, [1, 2, 3])), count)
        metrics["probe/tags"] = (tf.reduce_sum(tf.cast(ctx.source_tags, tf.float32)), count)
        return RecipeOutput(loss_sum=tf.reduce_sum(loss), metrics=metrics)


def _dataset_fn(recipe, batch, info, data_dir=None, **kw):
    """make_dataset as a training script wires it for `recipe`."""

    def dataset_fn(ctx, start_step):
        return data.make_dataset(
            info, data_dir, "train", batch_size=ctx.get_per_replica_batch_size(batch),
            image_size=32, is_training=True, seed=0, start_step=start_step,
            input_context=ctx,
            options=data.InputOptions(augmentation="cifar",
                                      source_tags=recipe.needs_source_tags,
                                      extra_views=recipe.input_views, **kw))

    return dataset_fn


def _config(tmp_path, steps, iterations_per_loop):
    return TrainConfig(model_dir=str(tmp_path), train_steps=steps, global_batch_size=8,
                       steps_per_epoch=100, optimizer="momentum", base_learning_rate=0.01,
                       lr_warmup_epochs=0, moving_average_decay=0, seed=0,
                       iterations_per_loop=iterations_per_loop,
                       summary_every_steps=steps, checkpoint_every_steps=steps)


def test_extras_reach_every_replica_in_a_multi_step_loop(tmp_path, two_device_strategy,
                                                         ramp_folder):
    """Two replicas, two steps per tf.function call: the metrics the loop reports,
    computed by the recipe from ctx.extras, match the batches read directly."""
    root, _ = ramp_folder
    recipe = _ExtrasProbe(10)

    def model_fn():
        inputs = keras.Input((32, 32, 3))
        h = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
        return keras.Model(inputs, keras.layers.Dense(10)(h))

    trainer = Trainer(two_device_strategy, model_fn, recipe, _config(tmp_path, 2, 2))
    dataset_fn = _dataset_fn(recipe, 8, data.resolve_dataset("folder", data_dir=root), root,
                             auto_augment="randaugment", randaugment_layers=1,
                             auto_augment_fraction=0.5)
    metrics = trainer.train(dataset_fn)
    assert int(trainer.step.numpy()) == 2
    # One input pipeline (one worker) feeds both replicas, one per-replica batch each
    # per step: the two steps used its first four batches.
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=2)
    extras = [e for _, _, e in dataset_fn(context, 0).take(4)]
    expected_mean = np.mean([e["tda_images"].numpy().mean((1, 2, 3)) for e in extras])
    expected_tags = np.mean([e["source_tags"].numpy() for e in extras])
    assert 0.0 < expected_tags < 1.0
    assert metrics["probe/tda_mean"] == pytest.approx(expected_mean, rel=1e-5)
    assert metrics["probe/tags"] == pytest.approx(expected_tags)


@pytest.mark.slow  # ~30 s: the embedded data, an NF-ResNet, PGD and three forwards
def test_nofrost_star_trains_on_embedded_data_with_the_tda_view(tmp_path):
    from efficientnet_advprop.models import build_model

    recipe = make_recipe("nofrost_star", 10, attack=AttackConfig(epsilon=4.0, num_iter=1))

    def model_fn():
        keras.utils.set_random_seed(0)
        return build_model("nf-resnet-26-cifar", 10, width_multiplier=0.125)

    trainer = Trainer(tf.distribute.get_strategy(), model_fn, recipe,
                      _config(tmp_path, 1, 1))
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    metrics = trainer.train(_dataset_fn(recipe, 8, data.resolve_dataset("embedded")))
    assert int(trainer.step.numpy()) == 1
    assert {"accuracy/clean", "accuracy/augmented", "accuracy/adversarial"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    after = [v.numpy() for v in trainer.model.trainable_variables]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))
