"""Image preprocessing for EfficientNet training and evaluation.

Implements the official EfficientNet (tensorflow/tpu) preprocessing:

* training ("inception"): an Inception-style random crop sampled with
  ``sample_distorted_bounding_box`` on the encoded image's shape
  (min_object_covered 0.1, aspect ratio [3/4, 4/3], area [0.08, 1.0],
  10 attempts; when sampling fails -- the sampler then returns the whole
  image -- the eval center crop is used instead), a random horizontal flip
  and a bicubic resize to ``image_size``;
* evaluation ("inception"): a center crop of
  ``image_size / (image_size + 32) * min(height, width)`` pixels followed by a
  bicubic resize to ``image_size``.

Plus, for small images such as CIFAR:

* training ("cifar"): pad 4 pixels (reflection; "cifar_zeros" pads with
  zeros), take a random crop of the original size, random horizontal flip,
  then a bicubic resize when ``image_size`` differs from the image size;
* training/eval ("none") and eval ("cifar"): decode and resize the whole
  image (no crop, no flip); when the image already has the requested size it
  is passed through untouched (pixel exact).

All outputs are float32 ``[image_size, image_size, 3]`` RGB in [0, 255] (not
normalised: the models normalise internally).  Bicubic results are clipped
to [0, 255].

Optionally, after crop + flip + resize (as in the official preprocessing),
training images are augmented with AutoAugment policy v0 or RandAugment
(:mod:`efficientnet_advprop.data.autoaugment`), on all images or on a
stateless per-image share of them (``auto_augment_fraction``); the rest stay
exactly as without augmentation.  Augmented images are quantised to integers
(rounded) on the way.

NoFrost*'s texture-debiased view (:func:`tda_view_for_train`, make_dataset's
``extra_views=("tda",)``) is made separately, from the whole decoded image (not
from the training crop), with its own sub-seed of the example's seed.

All randomness is stateless: every random op takes a seed derived from the
per-example seed passed in (a shape-[2] integer tensor), so results depend
only on that seed and never on op order, threads or ``tf.random`` state.
Use :func:`example_seed` to derive per-example seeds from a run seed, an
epoch and an example index.
"""

import math
import numbers

import tensorflow as tf

from efficientnet_advprop.data import autoaugment
from efficientnet_advprop.data import tda

CROP_PADDING = 32
AUGMENTATIONS = ("inception", "cifar", "cifar_zeros", "none")

# Inception crop parameters (official EfficientNet values).
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
AREA_RANGE = (0.08, 1.0)
MAX_ATTEMPTS = 10
CIFAR_PAD = 4
AUTO_AUGMENTS = (None, "v0", "randaugment")
# Sub-seed (fold_in data) of the per-example seed used by AutoAugment/RandAugment;
# the crop/flip seeds (stateless_split) are unaffected.
_AUTO_AUGMENT_STREAM = 0xA0A0
# Sub-seed of the per-example seed used by the TDA view (extra_views=("tda",)).
_TDA_STREAM = 0x7DA0
EXTRA_VIEWS = ("tda",)


def check_augmentation(augmentation):
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r}: expected one of {AUGMENTATIONS}")
    return augmentation


def check_auto_augment(
    auto_augment, randaugment_layers=2, randaugment_magnitude=10, auto_augment_fraction=1.0
):
    """Validates the AutoAugment/RandAugment options (ValueError naming the argument).

    Returns (auto_augment, randaugment_layers, randaugment_magnitude,
    auto_augment_fraction) as (str or None, int, float, float).
    """
    if auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"auto_augment={auto_augment!r}: expected one of {AUTO_AUGMENTS}")
    layers, magnitude = randaugment_layers, randaugment_magnitude
    if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 0:
        raise ValueError(f"randaugment_layers={layers!r}: expected an integer >= 0")
    if (
        isinstance(magnitude, bool)
        or not isinstance(magnitude, numbers.Real)
        or not math.isfinite(magnitude)
        or magnitude < 0
    ):
        raise ValueError(f"randaugment_magnitude={magnitude!r}: expected a number >= 0")
    fraction = auto_augment_fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not math.isfinite(fraction)
        or not 0.0 <= fraction <= 1.0
    ):
        raise ValueError(
            f"auto_augment_fraction={auto_augment_fraction!r}: expected a number in [0, 1]"
        )
    return auto_augment, int(layers), float(magnitude), float(fraction)


# ---------------------------------------------------------------------------
# Seeds.
# ---------------------------------------------------------------------------
def example_seed(seed, epoch, index):
    """Per-example stateless seed (shape [2], int32) from (seed, epoch, index).

    ``seed`` is a Python int or scalar tensor (the run seed); ``epoch`` and
    ``index`` are scalar integer tensors/ints.
    """
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])
    s = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(s, tf.cast(index, tf.int64))


def _split_seed(seed, num):
    seeds = tf.random.experimental.stateless_split(seed, num=num)
    return [seeds[i] for i in range(num)]


# ---------------------------------------------------------------------------
# Decoding helpers.
# ---------------------------------------------------------------------------
def _decode_full(image_bytes):
    """Decodes JPEG/PNG/BMP/GIF (first frame) to uint8 RGB."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _image_shape(image_bytes):
    """[height, width, channels] of an encoded image (cheap for JPEG)."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int32),
        lambda: tf.shape(_decode_full(image_bytes), out_type=tf.int32),
    )


def _decode_and_crop(image_bytes, crop_window):
    """Decodes and crops to crop_window [y, x, h, w] (JPEG: while decoding)."""

    def jpeg():
        image = tf.image.decode_and_crop_jpeg(image_bytes, crop_window, channels=3)
        image.set_shape([None, None, 3])
        return image

    def other():
        image = _decode_full(image_bytes)
        return tf.image.crop_to_bounding_box(
            image, crop_window[0], crop_window[1], crop_window[2], crop_window[3]
        )

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def resize(image, image_size):
    """Bicubic resize to [image_size, image_size], float32 clipped to [0, 255].

    Passes the image through unchanged (only cast to float32) when it already
    has the requested size.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)

    def same():
        return tf.cast(image, tf.float32)

    def resized():
        out = tf.image.resize(
            image, [image_size, image_size], method=tf.image.ResizeMethod.BICUBIC
        )
        return tf.clip_by_value(out, 0.0, 255.0)

    out = tf.cond(
        tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size)),
        same,
        resized,
    )
    out.set_shape([image_size, image_size, 3])
    return out


# ---------------------------------------------------------------------------
# Center crop (eval).
# ---------------------------------------------------------------------------
def center_crop_window(height, width, image_size, crop_padding=CROP_PADDING):
    """Official center-crop window [offset_y, offset_x, size, size] (int32).

    size = int(image_size / (image_size + crop_padding) * min(height, width)).
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    size = tf.cast(
        (image_size / (image_size + crop_padding))
        * tf.cast(tf.minimum(height, width), tf.float64),
        tf.int32,
    )
    size = tf.maximum(size, 1)
    offset_y = ((height - size) + 1) // 2
    offset_x = ((width - size) + 1) // 2
    return tf.stack([offset_y, offset_x, size, size])


def decode_and_center_crop(image_bytes, image_size, crop_padding=CROP_PADDING):
    """Official eval preprocessing: padded center crop + bicubic resize."""
    shape = _image_shape(image_bytes)
    window = center_crop_window(shape[0], shape[1], image_size, crop_padding)
    image = _decode_and_crop(image_bytes, window)
    return resize(image, image_size)


# ---------------------------------------------------------------------------
# Inception random crop (train).
# ---------------------------------------------------------------------------
def inception_crop_window(
    image_shape,
    seed,
    min_object_covered=MIN_OBJECT_COVERED,
    aspect_ratio_range=ASPECT_RATIO_RANGE,
    area_range=AREA_RANGE,
    max_attempts=MAX_ATTEMPTS,
):
    """Samples a crop window [y, x, h, w] statelessly (seed: shape [2] int)."""
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=bbox,
        seed=seed,
        min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    target_h, target_w, _ = tf.unstack(size)
    return tf.stack([offset_y, offset_x, target_h, target_w])


def decode_and_random_crop(image_bytes, image_size, seed):
    """Inception crop; falls back to the center crop when sampling fails."""
    shape = _image_shape(image_bytes)
    window = inception_crop_window(shape, seed)
    # The sampler returns the whole image when all attempts fail; like the
    # official code, treat "crop == whole image" as failure.
    bad = tf.logical_and(tf.equal(window[2], shape[0]), tf.equal(window[3], shape[1]))
    center = center_crop_window(shape[0], shape[1], image_size)
    window = tf.where(bad, center, window)
    image = _decode_and_crop(image_bytes, window)
    return image


# ---------------------------------------------------------------------------
# CIFAR-style random crop (train).
# ---------------------------------------------------------------------------
def cifar_random_crop(image, seed, pad=CIFAR_PAD, mode="REFLECT"):
    """Pads ``pad`` pixels (REFLECT or CONSTANT zeros), random crop back."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=mode)
    return tf.image.stateless_random_crop(
        padded, tf.stack([shape[0], shape[1], 3]), seed=seed
    )


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------
def preprocess_for_train(
    image_bytes,
    image_size,
    seed,
    augmentation="inception",
    *,
    auto_augment=None,
    randaugment_layers=2,
    randaugment_magnitude=10,
    auto_augment_fraction=1.0,
    auto_augment_constants="auto",
    return_source=False,
):
    """Training preprocessing of one encoded image; seed: shape-[2] int tensor.

    ``augmentation`` selects the crop/flip/resize.  ``auto_augment`` then adds,
    after the resize: None (nothing), "v0" (AutoAugment policy v0) or
    "randaugment" (``randaugment_layers`` ops at ``randaugment_magnitude``).
    ``auto_augment_fraction`` in [0, 1] is the probability (a stateless coin per
    image) that an image is augmented; the others are returned exactly as with
    ``auto_augment=None``.  Augmented images are rounded to integers in
    [0, 255] (the ops work on uint8).  ``auto_augment_constants`` ("auto",
    "official" or "scaled") picks the ops' translate/cutout pixel constants:
    "auto" scales them down below 64 px and keeps the official ones from 64 px
    (:func:`efficientnet_advprop.data.autoaugment.autoaugment_constants`).

    Returns float32 [image_size, image_size, 3] in [0, 255], or
    ``(image, source)`` when ``return_source``: int32 scalar, 0 = clean,
    1 = augmented by AutoAugment/RandAugment.
    """
    check_augmentation(augmentation)
    auto_augment, layers, magnitude, fraction = check_auto_augment(
        auto_augment, randaugment_layers, randaugment_magnitude, auto_augment_fraction
    )
    constants = autoaugment.check_constants(auto_augment_constants)
    if augmentation == "none":
        image = resize(_decode_full(image_bytes), image_size)
    else:
        crop_seed, flip_seed = _split_seed(seed, 2)
        if augmentation == "inception":
            image = decode_and_random_crop(image_bytes, image_size, crop_seed)
        else:
            mode = "REFLECT" if augmentation == "cifar" else "CONSTANT"
            image = cifar_random_crop(_decode_full(image_bytes), crop_seed, mode=mode)
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        image = resize(image, image_size)

    source = tf.constant(0, tf.int32)
    if auto_augment is not None and fraction > 0.0:
        aa_seed = tf.random.experimental.stateless_fold_in(
            seed, tf.constant(_AUTO_AUGMENT_STREAM, tf.int64)
        )
        distort_seed = tf.random.experimental.stateless_fold_in(
            aa_seed, tf.constant(1, tf.int64)
        )
        clean = image

        def augmented():
            if auto_augment == "v0":
                return autoaugment.distort_image_with_autoaugment(
                    clean, distort_seed, "v0", constants=constants
                )
            return autoaugment.distort_image_with_randaugment(
                clean, layers, magnitude, distort_seed, constants=constants
            )

        if fraction >= 1.0:
            image = augmented()
            source = tf.constant(1, tf.int32)
        else:
            coin_seed = tf.random.experimental.stateless_fold_in(
                aa_seed, tf.constant(0, tf.int64)
            )
            apply = tf.random.stateless_uniform([], seed=coin_seed) < fraction
            image = tf.cond(apply, augmented, lambda: clean)
            source = tf.cast(apply, tf.int32)
        image.set_shape([image_size, image_size, 3])
    if return_source:
        return image, source
    return image


def tda_view_for_train(image_bytes, image_size, seed):
    """NoFrost*'s texture-debiased view of one encoded training image: the TDA random
    resized crop (scale 0.64-1) of the whole *decoded* image, resized to
    ``image_size``, flipped and colour-distorted (:func:`efficientnet_advprop.data.tda.
    tda_view`).  ``seed`` is the example's seed (:func:`example_seed`); the view uses a
    sub-seed of it, so it is independent of the example's crop/flip/AutoAugment draws.

    Returns float32 [image_size, image_size, 3] in [0, 255].
    """
    view_seed = tf.random.experimental.stateless_fold_in(
        seed, tf.constant(_TDA_STREAM, tf.int64)
    )
    return tda.tda_view(_decode_full(image_bytes), image_size, view_seed)


def check_extra_views(extra_views):
    """Validates make_dataset's ``extra_views`` (an iterable of names from
    EXTRA_VIEWS); returns them as a tuple without repeats, in EXTRA_VIEWS order."""
    if isinstance(extra_views, str):
        extra_views = (extra_views,)
    try:
        views = tuple(extra_views or ())
    except TypeError:
        raise ValueError(
            f"extra_views={extra_views!r}: expected a tuple of names from {EXTRA_VIEWS}"
        ) from None
    unknown = [v for v in views if v not in EXTRA_VIEWS]
    if unknown:
        raise ValueError(f"extra_views: unknown view(s) {unknown}; expected names from "
                         f"{EXTRA_VIEWS}")
    return tuple(v for v in EXTRA_VIEWS if v in views)


def preprocess_for_eval(
    image_bytes, image_size, augmentation="inception", crop_padding=CROP_PADDING
):
    """Eval: padded center crop ("inception") or whole-image resize."""
    check_augmentation(augmentation)
    if augmentation == "inception":
        return decode_and_center_crop(image_bytes, image_size, crop_padding)
    return resize(_decode_full(image_bytes), image_size)


def preprocess_image(
    image_bytes, image_size, is_training, seed=None, augmentation="inception"
):
    """Preprocesses one encoded image to float32 [image_size, image_size, 3]."""
    if is_training:
        if seed is None:
            raise ValueError("preprocess_image(is_training=True) needs a seed")
        return preprocess_for_train(image_bytes, image_size, seed, augmentation)
    return preprocess_for_eval(image_bytes, image_size, augmentation)
