"""DeepAugment-style augmentation: images through a randomly perturbed image-to-image net.

This is *DeepAugment-style*, not DeepAugment as released.  DeepAugment (Hendrycks et
al., "The Many Faces of Robustness: A Critical Analysis of Out-of-Distribution
Generalization", ICCV 2021) passes each image through a pretrained image-to-image network
(EDSR super-resolution or a convolutional auto-encoder, CAE) whose weights and
activations are distorted at random (noise added, weights negated or zeroed, ...), and
trains on the resulting, semantically intact but visually altered images, precomputed
offline.  The pretrained EDSR/CAE checkpoints are not available offline here and running
them per training step would be expensive, so this module perturbs, on the fly, a small
fixed-architecture network instead:

  x_c = x / 255 - 0.5                                       (x: [B, H, W, 3] in [0, 255])
  h1  = relu(conv3x3(x_c; W1) + b1)                          3 -> 16 channels
  h2  = relu(conv3x3(h1;  W2) + b2)                          16 -> 16 channels
  out = clip(x + 255 * conv3x3(h2; W3), 0, 255)               16 -> 3 channels, residual

All convolutions are stride 1, SAME padding.  Base weights: ``W1``, ``W2`` are He-normal
draws from the fixed seed ``BASE_SEED`` (the same in every run and process); ``W3`` is
zero (zero-initialised residual branch), so the unperturbed network is exactly the
identity.  Each call draws a new random network from ``seed`` with perturbation
``strength`` ``s``:

* ``W1``, ``W2``: multiplicative noise ``W * (1 + s * n)``, ``n ~ N(0, 1)`` per weight;
  then each output filter is independently negated with probability ``FLIP_PROB`` and
  zeroed with probability ``ZERO_PROB`` (cf. DeepAugment's weight negation/zeroing);
  then the layer is rescaled to the Frobenius norm of its base weights (the structure
  changes, the activation scale stays put).
* ``b1``, ``b2``: additive noise ``s * BIAS_STD * n``.
* ``W3``: additive noise ``s * OUT_GAIN * n / rms(n) / sqrt(fan_in)`` (``W3`` base is 0;
  normalising the noise to unit RMS keeps the change's magnitude steadier across calls).

So ``strength=0`` returns the input unchanged (exactly, up to the final clip) and the
change grows about linearly with ``strength``.  The default ``DEFAULT_STRENGTH = 1.0``
gives a mean absolute change of about 7-30 pixel units (of 255): over 200 seeds on 40
CIFAR-10 images, median 15, 1st-99th percentile 7-28 (strength 0.5: median 8, 4-15;
1.5: median 22, 10-43) -- visible colour casts plus local edge/texture artefacts, objects
still recognisable.  The tests check 5-40 on smooth, natural-like synthetic images for
several seeds.

One random network per call: every image of the batch goes through the same network
(each batch, i.e. each call with a different seed, gets a different network); per-image
networks would need grouped convolutions, one network per call keeps the cost at three
small convolutions.  The weights are plain tensors
computed in-graph from the seeds, not variables, so nothing is tracked by Keras models or
checkpoints.  Randomness is stateless (the integer-based draws of
:mod:`efficientnet_advprop.data.mixing`, which make eager and XLA agree); written in
keras.ops, it runs on both engines and compiles under ``jit_compile=True`` and
``jax.jit``.  Under ``tf.distribute`` fold the replica id into the seed for
per-replica networks.
"""

import math

import keras
from keras import ops

from efficientnet_advprop.data.mixing import canonical_seed
from efficientnet_advprop.data.mixing import stateless_standard_normal
from efficientnet_advprop.data.mixing import stateless_uniform01
from efficientnet_advprop.data.mixing import sub_seed

__all__ = ["deep_augment", "random_network", "DEFAULT_STRENGTH", "BASE_SEED"]

DEFAULT_STRENGTH = 1.0
BASE_SEED = (20210, 8241)  # fixed: the base weights are the same everywhere
CHANNELS = (3, 16, 16, 3)
KERNEL = 3
FLIP_PROB = 0.1
ZERO_PROB = 0.1
BIAS_STD = 0.1
OUT_GAIN = 0.3


def _shapes():
    return [[KERNEL, KERNEL, CHANNELS[i], CHANNELS[i + 1]] for i in range(3)]


def _split(flat, shapes):
    sizes = [math.prod(shape) for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [ops.reshape(flat[offsets[i]:offsets[i + 1]], shape) for i, shape in enumerate(shapes)]


def _base_weights():
    """He-normal W1, W2 drawn from BASE_SEED (float32 [k, k, c_in, c_out])."""
    shapes = _shapes()[:2]
    normal = stateless_standard_normal([sum(math.prod(s) for s in shapes)],
                                       ops.convert_to_tensor(BASE_SEED, "int32"))
    return [math.sqrt(2.0 / (KERNEL * KERNEL * shape[2])) * w
            for shape, w in zip(shapes, _split(normal, shapes))]


def random_network(seed, strength=DEFAULT_STRENGTH):
    """The perturbed network's parameters for ``seed``: [(W1, b1), (W2, b2), (W3, b3)]."""
    seed = canonical_seed(seed)
    if isinstance(strength, (int, float)) and not strength >= 0:
        raise ValueError(f"strength={strength}: must be >= 0")
    strength = ops.cast(strength, "float32")
    shapes = _shapes()
    c1, c2 = CHANNELS[1], CHANNELS[2]
    # Two random ops per call: all normals, and the uniforms for the filter signs.
    noise_shapes = shapes + [[c1], [c2]]
    normal = stateless_standard_normal([sum(math.prod(s) for s in noise_shapes)], seed)
    n1, n2, n3, nb1, nb2 = _split(normal, noise_shapes)
    u = stateless_uniform01([c1 + c2], sub_seed(seed, 1))
    sign = ops.where(u < FLIP_PROB, -1.0, ops.where(u < FLIP_PROB + ZERO_PROB, 0.0, 1.0))
    signs = [sign[:c1], sign[c1:c1 + c2]]
    params = []
    for base, noise, s, nb in zip(_base_weights(), (n1, n2), signs, (nb1, nb2)):
        w = base * (1.0 + strength * noise) * s
        # Keep the layer's overall scale (Frobenius norm) that of the base weights.
        w = w * ops.sqrt(ops.sum(ops.square(base))) / ops.maximum(ops.sqrt(ops.sum(ops.square(w))), 1e-12)
        params.append((w, strength * BIAS_STD * nb))
    n3 = n3 * ops.rsqrt(ops.mean(ops.square(n3)))  # unit RMS
    w3 = (strength * OUT_GAIN / math.sqrt(KERNEL * KERNEL * c2)) * n3
    params.append((w3, ops.zeros([CHANNELS[3]], "float32")))
    return params


def deep_augment(images, seed, strength=DEFAULT_STRENGTH):
    """Passes float [B, H, W, 3] images in [0, 255] through a random network drawn from
    ``seed`` (perturbation ``strength``, default ``DEFAULT_STRENGTH``); returns the same
    shape and dtype, clipped to [0, 255].  See the module docstring."""
    images = ops.convert_to_tensor(images)
    if len(images.shape) != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    if not keras.backend.is_float_dtype(images.dtype):
        raise ValueError(f"images must be floating point, got {images.dtype}")
    (w1, b1), (w2, b2), (w3, b3) = random_network(seed, strength)
    x = ops.cast(images, "float32")
    h = x * (1.0 / 255.0) - 0.5
    h = ops.relu(ops.conv(h, w1, 1, "same") + b1)
    h = ops.relu(ops.conv(h, w2, 1, "same") + b2)
    out = x + 255.0 * (ops.conv(h, w3, 1, "same") + b3)
    return ops.cast(ops.clip(out, 0.0, 255.0), images.dtype)
