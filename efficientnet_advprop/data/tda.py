"""Texture-debiased augmentation (TDA), in-graph on a batch, stateless and XLA-compilable.

TDA is the augmentation NoFrost uses (Wang et al., "Removing Batch Normalization Boosts
Adversarial Training", ICML 2022), following Hermann et al., "The Origins and Prevalence
of Texture Bias in Convolutional Neural Networks" (NeurIPS 2020), who showed that
aggressive random crops and colour distortion reduce texture bias.  Per image, in this
order:

1. Random resized crop with torchvision ``RandomResizedCrop`` semantics, scale
   (0.64, 1.0), aspect ratio (3/4, 4/3): up to 10 attempts, each drawing
   ``area ~ U(0.64, 1.0) * H * W`` and ``log(ratio) ~ U(log 3/4, log 4/3)``,
   ``w = round(sqrt(area * ratio))``, ``h = round(sqrt(area / ratio))``; the first
   attempt with ``0 < h <= H`` and ``0 < w <= W`` is used, its top-left corner uniform
   over the integer positions that keep the crop inside the image; if no attempt fits,
   torchvision's fallback (a centred crop with the aspect ratio clamped to the range --
   the whole image for square inputs).  The crop is resized back to H x W with
   bilinear interpolation, half-pixel centres, edge clamping (``align_corners=False``;
   the crop is never larger than the image, so no antialiasing is involved).
2. Horizontal flip with probability 0.5.
3. With probability 0.5 a colour distortion:
   a. with probability 0.8, colour jitter with torchvision ``ColorJitter(0.8, 0.8, 0.8,
      0.2)`` semantics on [0, 1] images: brightness ``x * b``, contrast
      ``c * x + (1 - c) * mean(gray(x))`` (mean over the image), saturation
      ``s * x + (1 - s) * gray(x)``, each clamped to [0, 1], with ``b, c, s`` uniform in
      [0.2, 1.8]; hue: the HSV hue is shifted by ``h`` uniform in [-0.2, 0.2] (of the
      colour wheel, modulo 1).  Deviation: torchvision applies the four sub-ops in a
      random order per image; here the order is fixed: brightness, contrast,
      saturation, hue.
   b. then, with probability 0.2, grayscale ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2
      luma, as torchvision), replicated to 3 channels.

All coin flips and factors are independent per image.  Inputs and outputs are float32
[B, H, W, 3] in [0, 255] (static H and W).  Other deviations from the torchvision
pipeline NoFrost runs on PIL images: everything is computed in float32 (no rounding to
uint8 between steps), and the contrast mean is not rounded to an integer.

Randomness is stateless: :func:`sample_tda_params` draws every per-image decision from the
shape-[2] integer ``seed`` (one [B, 30] array of stateless uniforms; row i belongs to
image i and does not depend on B); :func:`apply_tda` applies them.  Same seed, same
output; eager, ``tf.function`` and ``jit_compile=True`` agree up to float rounding (see
:mod:`efficientnet_advprop.data.mixing` for why the random draws are built from integer
ops).  Under ``tf.distribute`` fold the replica id into the seed for per-replica
randomness.

Input-pipeline view (:func:`tda_view`): NoFrost's reference code
(amazon-research/normalizer-free-robust-training) applies TDA to the *decoded* image,
not to an already cropped training image: ``RandomResizedCrop(size, scale=(0.64, 1))``
on the original picture, then the flip and the colour distortion above.
:func:`tda_view` does that for one decoded image of any size ``[h, w, 3]``: the crop box
is drawn with the same rule on the original ``h x w`` (same draws as
:func:`sample_tda_params` for a batch of one), the crop is resized to
``image_size x image_size`` with ``tf.image.resize`` bilinear, ``antialias=True`` (like
torchvision's PIL bilinear resize, which filters when it shrinks), then flipped and
colour-distorted exactly as :func:`apply_tda`.  ``make_dataset`` with
``InputOptions(extra_views=("tda",))`` uses it to add ``extras["tda_images"]`` to each
training batch.

XLA notes (TF 2.21, CPU): ``tf.image.crop_and_resize`` has no XLA kernel, so the crop is
a hand-written separable bilinear resampler (two batched ``tf.gather`` + lerp; the flip
is folded into the column sample positions).  ``tf.image.rgb_to_hsv`` /
``hsv_to_rgb`` compile and are used for the hue shift.
"""

import math

import tensorflow as tf

from efficientnet_advprop.data.mixing import canonical_seed
from efficientnet_advprop.data.mixing import stateless_uniform01

__all__ = [
    "texture_debiased_augment",
    "tda_view",
    "sample_tda_params",
    "apply_tda",
    "resized_crops",
    "SCALE",
    "RATIO",
]

SCALE = (0.64, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROB = 0.5
COLOR_PROB = 0.5
JITTER_PROB = 0.8
GRAY_PROB = 0.2
BRIGHTNESS = CONTRAST = SATURATION = 0.8
HUE = 0.2
_LUMA = (0.299, 0.587, 0.114)


def _fallback_box(height, width):
    """torchvision's central-crop fallback, (h, w): Python ints in, Python ints out;
    int32 scalar tensors in, int32 tensors out."""
    if isinstance(height, int) and isinstance(width, int):
        in_ratio = width / height
        if in_ratio < RATIO[0]:
            return int(round(width / RATIO[0])), width
        if in_ratio > RATIO[1]:
            return height, int(round(height * RATIO[1]))
        return height, width
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    in_ratio = w / h
    narrow = in_ratio < RATIO[0]
    wide = in_ratio > RATIO[1]
    fb_h = tf.where(narrow, tf.cast(tf.round(w / RATIO[0]), tf.int32), height)
    fb_w = tf.where(wide, tf.cast(tf.round(h * RATIO[1]), tf.int32), width)
    return fb_h, fb_w


def _size(value):
    """A Python int as is; anything else as an int32 scalar tensor."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value)  # numpy ints, eager scalar tensors
    except (TypeError, ValueError):
        return tf.cast(value, tf.int32)


def sample_tda_params(batch_size, height, width, seed):
    """Per-image TDA decisions for a [batch_size, height, width, 3] batch.

    Returns a dict of tensors:
      ``box``: int32 [B, 4], crop (top, left, crop_height, crop_width) in pixels;
      ``flip``: bool [B];
      ``jitter``: bool [B], colour jitter applied (colour-distortion coin and jitter coin);
      ``gray``: bool [B], grayscale applied (colour-distortion coin and grayscale coin);
      ``factors``: float32 [B, 4], (brightness, contrast, saturation, hue shift).
    ``height`` and ``width`` are Python ints or int32 scalar tensors (a decoded image's
    dynamic size); ``batch_size`` may be a scalar tensor.
    """
    height, width = _size(height), _size(width)
    # One random op for all per-image draws (columns below); fewer random ops keep the XLA
    # compile time down.
    k = CROP_ATTEMPTS
    u = stateless_uniform01([batch_size, 2 * k + 10], canonical_seed(seed))
    pixels = (float(height * width) if isinstance(height, int) and isinstance(width, int)
              else tf.cast(height, tf.float32) * tf.cast(width, tf.float32))
    area = pixels * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, :k])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = tf.exp(log_lo + (log_hi - log_lo) * u[:, k:2 * k])
    top_u, left_u, flip_u, color_u, jitter_u, gray_u = tf.unstack(u[:, 2 * k:2 * k + 6], axis=1)
    factor_u = u[:, 2 * k + 6:]

    crop_w = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    attempt = tf.range(k, dtype=tf.int32)
    first = tf.reduce_min(tf.where(fits, attempt, k), axis=1)  # [B]
    pick = attempt[None, :] == first[:, None]  # all False when nothing fits
    found = first < k
    fb_h, fb_w = _fallback_box(height, width)
    crop_h = tf.where(found, tf.reduce_sum(tf.where(pick, crop_h, 0), axis=1), fb_h)
    crop_w = tf.where(found, tf.reduce_sum(tf.where(pick, crop_w, 0), axis=1), fb_w)
    top = tf.cast(tf.floor(top_u * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(left_u * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    top = tf.where(found, top, (height - crop_h) // 2)
    left = tf.where(found, left, (width - crop_w) // 2)

    color = color_u < COLOR_PROB
    lo = tf.constant([max(0.0, 1.0 - BRIGHTNESS), max(0.0, 1.0 - CONTRAST),
                      max(0.0, 1.0 - SATURATION), -HUE])
    hi = tf.constant([1.0 + BRIGHTNESS, 1.0 + CONTRAST, 1.0 + SATURATION, HUE])
    return {
        "box": tf.stack([top, left, crop_h, crop_w], axis=1),
        "flip": flip_u < FLIP_PROB,
        "jitter": color & (jitter_u < JITTER_PROB),
        "gray": color & (gray_u < GRAY_PROB),
        "factors": lo + (hi - lo) * factor_u,
    }


def _sample_positions(start, size, out_size, reverse=None):
    """Bilinear source indices/weights along one axis for a batch of crops.

    ``start``, ``size``: int32 [B] crop extent; returns (lo, hi) int32 [B, out_size]
    absolute indices and the float32 weight of ``hi``.
    """
    size_f = tf.cast(size, tf.float32)[:, None]
    out = tf.range(out_size, dtype=tf.float32)[None, :]
    if reverse is not None:
        out = tf.where(reverse[:, None], float(out_size - 1) - out, out)
    src = (out + 0.5) * (size_f / float(out_size)) - 0.5
    src = tf.clip_by_value(src, 0.0, size_f - 1.0)
    lo = tf.floor(src)
    frac = src - lo
    lo = tf.cast(lo, tf.int32)
    hi = tf.minimum(lo + 1, size[:, None] - 1)
    return start[:, None] + lo, start[:, None] + hi, frac


def resized_crops(images, box, flip=None):
    """Crops ``box`` (int32 [B, 4]: top, left, h, w) of each image and resizes it back to
    the input H x W (bilinear, half-pixel centres, edge clamp); ``flip`` (bool [B])
    mirrors the result horizontally.  XLA-friendly (gathers only)."""
    images = tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    box = tf.cast(box, tf.int32)
    y_lo, y_hi, wy = _sample_positions(box[:, 0], box[:, 2], height)
    x_lo, x_hi, wx = _sample_positions(box[:, 1], box[:, 3], width, flip)
    top = tf.gather(images, y_lo, axis=1, batch_dims=1)  # [B, H, W, C]
    bottom = tf.gather(images, y_hi, axis=1, batch_dims=1)
    rows = top + (bottom - top) * wy[:, :, None, None]
    left = tf.gather(rows, x_lo, axis=2, batch_dims=1)
    right = tf.gather(rows, x_hi, axis=2, batch_dims=1)
    return left + (right - left) * wx[:, None, :, None]


def _gray(x):
    """Luma [B, H, W, 1] of RGB images."""
    r, g, b = tf.unstack(x, axis=-1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[..., None]


def _color_jitter(x, factors):
    """ColorJitter on [0, 1] images with per-image factors [B, 4] (fixed order)."""
    f = factors[:, None, None, :]
    x = tf.clip_by_value(x * f[..., 0:1], 0.0, 1.0)
    mean = tf.reduce_mean(_gray(x), axis=[1, 2, 3], keepdims=True)
    x = tf.clip_by_value(f[..., 1:2] * x + (1.0 - f[..., 1:2]) * mean, 0.0, 1.0)
    x = tf.clip_by_value(f[..., 2:3] * x + (1.0 - f[..., 2:3]) * _gray(x), 0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., 0:1] + f[..., 3:4], 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)


def _color_distort(x, params):
    """The colour part of TDA (jitter, then grayscale, per the params' coins) of float32
    [B, H, W, 3] images in [0, 255]."""
    jittered = _color_jitter(x * (1.0 / 255.0), params["factors"]) * 255.0
    x = tf.where(params["jitter"][:, None, None, None], jittered, x)
    gray = tf.broadcast_to(_gray(x), tf.shape(x))
    x = tf.where(params["gray"][:, None, None, None], gray, x)
    return tf.clip_by_value(x, 0.0, 255.0)


def apply_tda(images, params):
    """Applies :func:`sample_tda_params` decisions to float [B, H, W, 3] images in [0, 255].

    Images whose colour ops do not fire are exactly the resized (and flipped) crops.
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    x = resized_crops(images, params["box"], params["flip"])
    return _color_distort(x, params)


def tda_view(image, image_size, seed):
    """TDA of one decoded image, as NoFrost's reference input pipeline makes it.

    Random resized crop of the *original* image (scale (0.64, 1), aspect ratio (3/4, 4/3),
    torchvision's attempts and fallback), resized to ``image_size`` x ``image_size``
    (bilinear, antialiased), random flip, colour distortion; the decisions are those of
    ``sample_tda_params(1, h, w, seed)`` (module docstring).

    Args:
      image: [h, w, 3] uint8 or float in [0, 255], any (dynamic) h and w.
      image_size: output side (Python int).
      seed: shape-[2] integer tensor.

    Returns:
      float32 [image_size, image_size, 3] in [0, 255].
    """
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [h, w, 3], got {image.shape}")
    image_size = int(image_size)
    shape = tf.shape(image)
    params = sample_tda_params(1, shape[0], shape[1], seed)
    top, left, crop_h, crop_w = tf.unstack(params["box"][0])
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, 3]))
    x = tf.image.resize(tf.cast(crop, tf.float32), [image_size, image_size],
                        method=tf.image.ResizeMethod.BILINEAR, antialias=True)
    x = tf.clip_by_value(x, 0.0, 255.0)
    x = tf.where(params["flip"][0], tf.reverse(x, axis=[1]), x)
    out = _color_distort(x[tf.newaxis], params)[0]
    out.set_shape([image_size, image_size, 3])
    return out


def texture_debiased_augment(images, seed):
    """TDA (random resized crop, flip, colour distortion) of float32 [B, H, W, 3] images
    in [0, 255]; returns float32 [B, H, W, 3] in [0, 255].  See the module docstring."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
        raise ValueError(f"texture_debiased_augment needs static H and W, got {images.shape}")
    params = sample_tda_params(tf.shape(images)[0], height, width, seed)
    return apply_tda(images, params)
