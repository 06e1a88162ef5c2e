"""In-graph batch mixing: Mixup and CutMix, stateless and XLA-compilable.

Public API::

  images, soft = mixup(images, labels, num_classes, alpha, seed)
  images, soft = cutmix(images, labels, num_classes, alpha, seed)
  images, soft = mix_batch(images, labels, num_classes, mixup_alpha=0.0,
                           cutmix_alpha=0.0, switch_prob=0.5, seed=seed)

plus the stateless random helpers the other batch augmentations share
(:func:`canonical_seed`, :func:`sub_seed`, :func:`stateless_uniform01`,
:func:`stateless_standard_normal`,
:func:`stateless_log_gamma`, :func:`stateless_beta`, :func:`stateless_permutation`).

Semantics
---------
``images`` is float [B, H, W, C] (pixel values in [0, 255] in this project; any range
works), ``labels`` int [B] (one-hot encoded with ``num_classes``) or soft float
[B, num_classes].  The returned labels are always float32 [B, num_classes] and sum to 1
per row when the input labels do.

* Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018): one
  ``lam ~ Beta(alpha, alpha)`` per batch; ``x' = lam * x + (1 - lam) * x[perm]`` and
  ``y' = lam * y + (1 - lam) * y[perm]``.
* CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features", ICCV 2019): one ``lam ~ Beta(alpha, alpha)`` and one box per
  batch.  The box has sides ``floor(H * sqrt(1 - lam))`` x ``floor(W * sqrt(1 - lam))``
  (area ratio ``1 - lam`` before clipping), its centre ``(cy, cx)`` is uniform over the
  integer pixel grid, its extent is ``[c - side // 2, c + side // 2)`` clipped to the
  image (as in the paper's reference implementation).  Inside the box the pixels come
  from ``x[perm]``.  Labels use the *actual* pasted area after clipping:
  ``lam_eff = 1 - box_area / (H * W)``, ``y' = lam_eff * y + (1 - lam_eff) * y[perm]``.
  The box is built as a mask from iotas (no dynamic slicing).
* Partner: ``perm`` is a stateless random permutation of the batch (the original Mixup
  and CutMix recipes use ``randperm``; timm's "flip" mode pairs with the reversed batch
  instead).  An image may be paired with itself (then it is unchanged and keeps its
  label).  The permutation is ``argsort`` of stateless random 32-bit keys, because
  ``tf.random.experimental.stateless_shuffle`` has no XLA kernel.
* ``mix_batch``: both alphas 0 -> no mixing (images returned as is, labels as float32
  one-hot/soft); one alpha > 0 -> that method; both > 0 -> per batch, a stateless coin
  chooses CutMix with probability ``switch_prob``, else Mixup (as timm's ``Mixup``
  with ``mode="batch"``).

Randomness: everything is drawn from the shape-[2] integer ``seed`` with the stateless
random ops of :mod:`efficientnet_advprop.seam` (on TensorFlow ``tf.random.stateless_*``
and ``stateless_fold_in`` sub-seeds, the streams this module always drew; the JAX engine
draws different numbers from the same seed), so the same seed gives the same output
(eager, ``tf.function`` and ``jit_compile=True`` agree up to float rounding; so do eager
and ``jax.jit``).  Under ``tf.distribute`` every replica gets the same result for the
same seed and the same inputs; fold the replica id into the seed where per-replica
randomness is wanted.

Backend-neutral: the arithmetic is ``keras.ops`` and the random draws go through the
seam, so the functions run on the TensorFlow and the JAX Keras backends (this module
imports neither).  The permutation keys are drawn as bounded int32 integers over the
whole int32 range and mapped back to the raw 32-bit words TensorFlow's full-range draw
gives (the seam has no full-range integer draw); the order is that of the full-range
keys (it could differ only for a key of 0xFFFFFFFF tying with a key of 0).

XLA notes (TF 2.21, CPU): ``stateless_gamma`` (StatelessRandomGammaV3) and
``stateless_shuffle`` have no XLA kernel, and float ``stateless_uniform`` /
``stateless_normal`` give different numbers under XLA than in eager mode (integer draws
agree), and the two derive different Philox keys from seeds with negative 32-bit words.
So every seed is first reduced to non-negative 31-bit words (:func:`canonical_seed`),
floats here are made from integer draws (24 random bits per uniform;
Box-Muller for normals) and Gamma variates use the Marsaglia-Tsang method ("A simple
method for generating gamma variables", ACM TOMS 2000) with a fixed number of
vectorised proposals (shape < 1 via the ``U ** (1 / alpha)`` boost), in log space so
that Beta(alpha, alpha) with small alpha stays exact near 0 and 1.
"""

import math

import keras
from keras import ops

from efficientnet_advprop import seam

__all__ = [
    "mixup",
    "cutmix",
    "mix_batch",
    "canonical_seed",
    "sub_seed",
    "stateless_uniform01",
    "stateless_standard_normal",
    "stateless_log_gamma",
    "stateless_beta",
    "stateless_permutation",
]

# Marsaglia-Tsang proposals drawn per variate; the acceptance rate is >= 0.95 for the
# boosted shape (>= 1), so all proposals are rejected with probability < 1e-20.
_GAMMA_PROPOSALS = 16

# Odd constant that mixes the sign / high bits of a seed word into its low 31 bits.
_SEED_MIX = 0x5BD1E995

# Sub-seed tags.
_TAG_LAM, _TAG_PERM, _TAG_BOX = 1, 2, 3
_TAG_COIN, _TAG_MIXUP, _TAG_CUTMIX = 11, 12, 13


# ---------------------------------------------------------------------------
# Stateless random helpers (identical in eager mode and under XLA).
# ---------------------------------------------------------------------------
def canonical_seed(seed):
    """``seed`` (integer, shape [2]) as int32 words in [0, 2**31).

    TF 2.21's eager CPU kernels and its XLA kernels derive different Philox keys from
    seeds with negative words, so every seed is reduced to non-negative 31-bit words
    before any random op sees it: ``(v ^ ((v >> 31) * K)) & (2**31 - 1)`` per word (int64
    arithmetic, ``K`` an odd constant).  Non-negative int32 words are kept as they are;
    negative words and the high bits of int64 words are mixed in, so e.g. [0, 1],
    [-1, 1] and [2**40, 1] stay different seeds.  (32-bit words are computed in their own
    width, which gives the same low 31 bits as int64 arithmetic: int32 words sign-extend,
    uint32 words -- JAX's raw keys -- are non-negative; narrower words widen to int32.)
    """
    seed = ops.convert_to_tensor(seed)
    dtype = keras.backend.standardize_dtype(seed.dtype)
    if "int" not in dtype:
        raise ValueError(f"seed must be an integer tensor of shape [2], got {dtype}")
    if len(seed.shape) != 1 or seed.shape[0] not in (None, 2):
        raise ValueError(f"seed must be an integer tensor of shape [2], got shape "
                         f"{tuple(seed.shape)}")
    if dtype == "uint64":
        dtype = "int64"
    elif dtype not in ("int64", "uint32"):
        dtype = "int32"
    seed = ops.cast(seed, dtype)
    high = ops.right_shift(seed, 31)
    mixed = ops.bitwise_xor(seed, high * ops.convert_to_tensor(_SEED_MIX, dtype))
    return ops.cast(ops.bitwise_and(mixed, ops.convert_to_tensor(0x7FFFFFFF, dtype)),
                    "int32")


_seed = canonical_seed


def sub_seed(seed, tag):
    """A shape-[2] seed derived from ``seed`` and the integer ``tag`` (canonical)."""
    return canonical_seed(seam.fold_in(canonical_seed(seed), tag))


def stateless_uniform01(shape, seed):
    """float32 uniform in [0, 1) on a 2**-24 grid, built from integer draws."""
    bits = seam.uniform(shape, _seed(seed), 0, 1 << 24, dtype="int32")
    return ops.cast(bits, "float32") * (1.0 / (1 << 24))


def _box_muller(u1, u2):
    """N(0, 1) from u1 in (0, 1] and u2 in [0, 1)."""
    return ops.sqrt(-2.0 * ops.log(u1)) * ops.cos((2.0 * math.pi) * u2)


def stateless_standard_normal(shape, seed):
    """float32 N(0, 1) samples (Box-Muller on :func:`stateless_uniform01` draws)."""
    u = stateless_uniform01([2] + list(shape), seed)
    return _box_muller(1.0 - u[0], u[1])


def stateless_log_gamma(shape, alpha, seed):
    """log of Gamma(alpha, 1) samples, float32 of ``shape``; ``alpha`` a Python float > 0.

    Marsaglia-Tsang with ``_GAMMA_PROPOSALS`` vectorised proposals (the first accepted
    one is used; if none is accepted -- probability < 1e-20 -- the mode ``d`` is used);
    for alpha < 1, ``G(alpha) = G(alpha + 1) * U ** (1 / alpha)``.  All uniforms come
    from one random op (fewer ops compile faster under XLA).
    """
    alpha = float(alpha)
    if not alpha > 0.0:
        raise ValueError(f"alpha={alpha}: the Gamma shape must be > 0")
    p = _GAMMA_PROPOSALS
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    uniforms = stateless_uniform01(list(shape) + [3 * p + 1], seed)
    z = _box_muller(1.0 - uniforms[..., :p], uniforms[..., p:2 * p])
    u = 1.0 - uniforms[..., 2 * p:3 * p]  # (0, 1]
    v = (1.0 + c * z) ** 3
    log_v = ops.log(ops.maximum(v, 1e-30))
    accept = ops.logical_and(v > 0.0, ops.log(u) < 0.5 * z * z + d - d * v + d * log_v)
    index = ops.arange(p, dtype="int32")
    first = ops.min(ops.where(accept, index, p), axis=-1)
    chosen = ops.sum(ops.where(ops.equal(index, first[..., None]), log_v, 0.0), axis=-1)
    log_g = math.log(d) + chosen  # chosen is 0 (v = 1) when nothing was accepted
    if alpha < 1.0:
        boost = 1.0 - uniforms[..., 3 * p]  # (0, 1]
        log_g = log_g + ops.log(boost) / alpha
    return log_g


def stateless_beta(shape, alpha, beta, seed):
    """float32 Beta(alpha, beta) samples in [0, 1] via two Gamma variates (log space):
    ``sigmoid(log G_alpha - log G_beta) = G_alpha / (G_alpha + G_beta)``."""
    if float(alpha) == float(beta):
        log_g = stateless_log_gamma([2] + list(shape), alpha, seed)
        return ops.sigmoid(log_g[0] - log_g[1])
    log_x = stateless_log_gamma(shape, alpha, sub_seed(seed, 1))
    log_y = stateless_log_gamma(shape, beta, sub_seed(seed, 2))
    return ops.sigmoid(log_x - log_y)


_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def stateless_permutation(n, seed):
    """int32 random permutation of ``range(n)`` (argsort of random 32-bit keys, in
    descending order, ties in index order).

    The keys are TensorFlow's full-range int32 draw: a bounded draw over
    [-2**31, 2**31 - 1) is ``-2**31 + bits % (2**32 - 1)`` of the same 32 random bits,
    so flipping its sign bit gives the raw bits back (except 0xFFFFFFFF, which becomes 0).
    An ascending (stable) argsort of ``~key`` is the descending one of ``key``.
    """
    drawn = seam.uniform([n], _seed(seed), _INT32_MIN, _INT32_MAX, dtype="int32")
    keys = ops.bitwise_xor(drawn, ops.convert_to_tensor(_INT32_MIN, "int32"))
    return ops.cast(ops.argsort(ops.bitwise_invert(keys)), "int32")


# ---------------------------------------------------------------------------
# Mixing.
# ---------------------------------------------------------------------------
def _soft_labels(labels, num_classes):
    labels = ops.convert_to_tensor(labels)
    if len(labels.shape) == 1:
        if keras.backend.is_float_dtype(labels.dtype):
            raise ValueError("labels of rank 1 must be integer class ids")
        return ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype="float32")
    if len(labels.shape) == 2:
        if labels.shape[1] not in (None, num_classes):
            raise ValueError(f"soft labels must be [B, {num_classes}], got "
                             f"{tuple(labels.shape)}")
        return ops.cast(labels, "float32")
    raise ValueError(f"labels must be int [B] or soft [B, num_classes], got "
                     f"{tuple(labels.shape)}")


def _check_images(images):
    images = ops.convert_to_tensor(images)
    if len(images.shape) != 4:
        raise ValueError(f"images must be [B, H, W, C], got {tuple(images.shape)}")
    if not keras.backend.is_float_dtype(images.dtype):
        raise ValueError(f"images must be floating point, got {images.dtype}")
    return images


def _check_alpha(name, alpha):
    alpha = float(alpha)
    if not alpha >= 0.0:  # also rejects NaN
        raise ValueError(f"{name}={alpha}: must be >= 0")
    return alpha


def _check_positive_alpha(alpha):
    alpha = _check_alpha("alpha", alpha)
    if alpha == 0.0:
        raise ValueError("alpha=0: Beta(0, 0) is degenerate; use mix_batch to disable mixing")
    return alpha


def mixup(images, labels, num_classes, alpha, seed):
    """Mixup with one lam ~ Beta(alpha, alpha) per batch and a random partner permutation.

    Returns (lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]) with y the
    float32 [B, num_classes] one-hot / soft labels.  ``alpha`` is a Python float > 0.
    """
    images = _check_images(images)
    alpha = _check_positive_alpha(alpha)
    soft = _soft_labels(labels, num_classes)
    lam = stateless_beta([], alpha, alpha, sub_seed(seed, _TAG_LAM))
    perm = stateless_permutation(ops.shape(images)[0], sub_seed(seed, _TAG_PERM))
    lam_x = ops.cast(lam, images.dtype)
    mixed = lam_x * images + (1.0 - lam_x) * ops.take(images, perm, axis=0)
    return mixed, lam * soft + (1.0 - lam) * ops.take(soft, perm, axis=0)


def cutmix(images, labels, num_classes, alpha, seed):
    """CutMix with one lam ~ Beta(alpha, alpha) and one clipped box per batch.

    Pixels inside the box come from ``x[perm]``; labels are mixed with the actual kept
    area ratio ``1 - box_area / (H * W)`` after clipping.  ``alpha`` is a Python float > 0.
    """
    images = _check_images(images)
    alpha = _check_positive_alpha(alpha)
    soft = _soft_labels(labels, num_classes)
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
        raise ValueError(f"cutmix needs static image height and width, got "
                         f"{tuple(images.shape)}")
    lam = stateless_beta([], alpha, alpha, sub_seed(seed, _TAG_LAM))
    perm = stateless_permutation(ops.shape(images)[0], sub_seed(seed, _TAG_PERM))

    cut = ops.sqrt(1.0 - lam)
    half_h = ops.cast(ops.floor(height * cut), "int32") // 2
    half_w = ops.cast(ops.floor(width * cut), "int32") // 2
    centre = stateless_uniform01([2], sub_seed(seed, _TAG_BOX))
    cy = ops.cast(ops.floor(centre[0] * height), "int32")  # uniform over 0 .. H - 1
    cx = ops.cast(ops.floor(centre[1] * width), "int32")
    y0 = ops.clip(cy - half_h, 0, height)
    y1 = ops.clip(cy + half_h, 0, height)
    x0 = ops.clip(cx - half_w, 0, width)
    x1 = ops.clip(cx + half_w, 0, width)
    rows = ops.arange(height, dtype="int32")[:, None]
    cols = ops.arange(width, dtype="int32")[None, :]
    box = ops.logical_and(ops.logical_and(rows >= y0, rows < y1),
                          ops.logical_and(cols >= x0, cols < x1))  # [H, W]
    mixed = ops.where(box[None, :, :, None], ops.take(images, perm, axis=0), images)
    area = ops.cast((y1 - y0) * (x1 - x0), "float32")
    lam_eff = 1.0 - area / float(height * width)
    return mixed, lam_eff * soft + (1.0 - lam_eff) * ops.take(soft, perm, axis=0)


def mix_batch(images, labels, num_classes, *, mixup_alpha=0.0, cutmix_alpha=0.0,
              switch_prob=0.5, seed):
    """Mixup and/or CutMix for one batch; returns (images, float32 [B, num_classes] labels).

    Both alphas 0: no mixing (``images`` returned as is; labels one-hot / cast to
    float32).  One alpha > 0: that method.  Both > 0: CutMix with probability
    ``switch_prob`` (one stateless coin per batch), else Mixup.  Sub-seeds do not depend
    on which methods are enabled, so e.g. the Mixup branch of a batch is the same with or
    without CutMix enabled.
    """
    mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
    cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha)
    switch_prob = float(switch_prob)
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob={switch_prob}: must be in [0, 1]")
    images = _check_images(images)
    seed = _seed(seed)

    def do_mixup():
        return mixup(images, labels, num_classes, mixup_alpha, sub_seed(seed, _TAG_MIXUP))

    def do_cutmix():
        return cutmix(images, labels, num_classes, cutmix_alpha,
                      sub_seed(seed, _TAG_CUTMIX))

    if mixup_alpha == 0.0 and cutmix_alpha == 0.0:
        return images, _soft_labels(labels, num_classes)
    if cutmix_alpha == 0.0:
        return do_mixup()
    if mixup_alpha == 0.0:
        return do_cutmix()
    coin = stateless_uniform01([], sub_seed(seed, _TAG_COIN))
    return ops.cond(coin < switch_prob, do_cutmix, do_mixup)
