"""Square attack, L-inf (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

A score-based black-box attack: it only reads logits (no gradients), so it is blind to
gradient masking, which is why NoFrost (and AutoAttack) report it next to gradient
attacks. Random search over perturbations on the corners of the eps-cube:

  1. Start at vertical stripes: every (column, channel) of the image gets +eps or -eps,
     the same down the whole column.
  2. Each iteration proposes, per image, one square window of side s at a random
     position filled with a random +-eps per channel, and keeps it only if it lowers the
     margin loss (`class_margin` of the true class, or minus that of the target).
  3. The square shrinks with the published schedule of the fraction p of pixels.

Images are float RGB in [0, 255], epsilon in the same units; all float32; randomness is
stateless (same seed, same batch -> bit-identical result).
"""

import tensorflow as tf

from efficientnet_advprop.attacks.iterative import as_graph, check_targets, class_margin
from efficientnet_advprop.attacks.pgd import PIXEL_MAX, PIXEL_MIN

# Iteration indices (on a 10,000-query budget) after which p halves (the authors' code).
P_HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# A window proposal that changes no pixel is redrawn (it would waste a query). A draw is
# a no-op with probability at most 1/2, so this cap is hit with probability < 1e-9.
MAX_REDRAWS = 32


def square_p(p_init, iteration, num_queries):
    """Fraction of pixels p at 0-based `iteration` of a `num_queries` budget.

    The published schedule is written for 10,000 queries; the iteration index is first
    rescaled to floor(iteration * 10000 / num_queries), then p = p_init halved once for
    each of P_HALVING_POINTS strictly below that index.
    """
    scaled = (tf.cast(iteration, tf.int64) * 10000) // num_queries
    halvings = tf.reduce_sum(tf.cast(scaled > tf.constant(P_HALVING_POINTS, tf.int64),
                                     tf.float32))
    return p_init * tf.pow(0.5, halvings)


def _margin(logits, labels, targets):
    """Loss the search lowers; <= 0 means success (misclassified / classified as target)."""
    if targets is None:
        return class_margin(logits, labels)
    return -class_margin(logits, targets)


def _random_signs(shape, seed):
    return tf.cast(tf.random.stateless_uniform(shape, seed=seed, minval=0, maxval=2,
                                               dtype=tf.int32) * 2 - 1, tf.float32)


def square_attack(logits_fn, images, labels, *, epsilon, num_queries=400, p_init=0.8, seed,
                  targets=None, return_queries=False):
    """L-inf Square attack (Andriushchenko et al., ECCV 2020), score-based.

    Procedure (per image, all images of the batch in parallel):
      * The clean image is classified first (one forward pass, not counted as a query,
        as in the authors' evaluation and AutoAttack): an image the model already gets
        wrong is returned unchanged with 0 queries.
      * Init (1 query): x = clip(x0 + eps * stripes), stripes = a random sign per
        (column, channel), constant along the height (authors' vertical stripes).
      * Iteration k = 0 .. num_queries - 2 (1 query each, only for active images):
        p = `square_p(p_init, k, num_queries)`, side s = round(sqrt(p * H * W)) clipped
        to [1, min(H, W) - 1] (the same s for every image); per image a uniform position
        with the square fully inside the image and a uniform +-eps per channel; the
        window's pixels become clip(x0 + sign * eps); a proposal that would leave the
        image unchanged is redrawn (no query spent). The proposal replaces the current
        image only if its margin is strictly lower.
      * An image stops (and stops spending queries) once its margin is <= 0:
        untargeted margin z_y - max_{i != y} z_i; targeted max_{i != t} z_i - z_t.
        So at most num_queries queries per image.

    Choices the paper leaves open, taken from the authors' code unless noted: stripes
    are per channel; the square position is uniform over all H - s + 1 placements (the
    authors' code omits the last row/column placement); the loss for targeted attacks is
    the target's margin (the authors use cross-entropy there); the loop ends early when
    no image is active. The iterations run in one tf.while_loop (traced once).

    Args:
      logits_fn: x -> logits (only its outputs are used).
      images: float [B, H, W, C] in [0, 255], H, W >= 2, static H, W, C.
      labels: int [B] true labels.
      epsilon: L-inf radius in pixel units (8 means 8/255).
      num_queries: query budget per image including the init (>= 1; 1 = init only).
      p_init: initial fraction of pixels in the square, in (0, 1] (0.8 for NoFrost's
        400-query evaluation, as AutoAttack).
      seed: int tensor of shape [2].
      targets: int [B] target classes (never the label; see `random_targets`) or None.
      return_queries: also return the queries spent per image.

    Returns:
      float32 adversarial images, and with return_queries an int32 [B] tensor of
      queries (0 for images misclassified from the start, else 1 + iterations run).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (0..255 pixel units), got {epsilon}")
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be an integer >= 1, got {num_queries!r}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if seed is None:
        raise ValueError("seed is required (an int tensor of shape [2])")
    x0 = tf.cast(images, tf.float32)
    if x0.shape.rank != 4 or None in x0.shape[1:]:
        raise ValueError(f"images must be [B, H, W, C] with static H, W, C, got {x0.shape}")
    _, height, width, channels = x0.shape
    if min(height, width) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {height}x{width}")
    labels = tf.cast(labels, tf.int32)
    targets = check_targets(labels, targets)
    seed = tf.cast(seed, tf.int64)
    eps = tf.constant(float(epsilon), tf.float32)
    rows = tf.reshape(tf.range(height), [1, height, 1, 1])
    cols = tf.reshape(tf.range(width), [1, 1, width, 1])

    def margin_of(x):
        return _margin(tf.cast(logits_fn(x), tf.float32), labels, targets)

    def propose(x0, x_best, active, k, it_seed):
        """Per image: a window of random +-eps per channel pasted on the current image
        (iteration k, randomness from `it_seed`)."""
        p = square_p(p_init, k, num_queries)
        side = tf.cast(tf.round(tf.sqrt(p * height * width)), tf.int32)
        side = tf.clip_by_value(side, 1, min(height, width) - 1)
        batch = tf.shape(x0)[0]
        seeds = [tf.random.experimental.stateless_fold_in(it_seed, j) for j in range(3)]
        top = tf.random.stateless_uniform([batch], seed=seeds[0], minval=0,
                                          maxval=height - side + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([batch], seed=seeds[1], minval=0,
                                           maxval=width - side + 1, dtype=tf.int32)
        top, left = tf.reshape(top, [-1, 1, 1, 1]), tf.reshape(left, [-1, 1, 1, 1])
        window = ((rows >= top) & (rows < top + side)) & ((cols >= left) & (cols < left + side))

        def draw(attempt):
            signs = _random_signs([batch, 1, 1, channels],
                                  tf.random.experimental.stateless_fold_in(seeds[2], attempt))
            corner = tf.clip_by_value(x0 + eps * signs, PIXEL_MIN, PIXEL_MAX)
            return tf.where(window, corner, x_best)

        def unchanged(candidate):
            same = tf.reduce_all(tf.equal(candidate, x_best), axis=[1, 2, 3])
            return tf.logical_and(same, active)

        def redraw_cond(attempt, candidate):
            return tf.logical_and(attempt < MAX_REDRAWS, tf.reduce_any(unchanged(candidate)))

        def redraw(attempt, candidate):
            again = tf.reshape(unchanged(candidate), [-1, 1, 1, 1])
            return attempt + 1, tf.where(again, draw(attempt + 1), candidate)

        _, candidate = tf.while_loop(redraw_cond, redraw, (tf.constant(0), draw(0)))
        return candidate

    def run(x0, seed):
        clean_correct = tf.equal(
            tf.argmax(tf.cast(logits_fn(x0), tf.float32), -1, output_type=tf.int32), labels)
        stripes = _random_signs([tf.shape(x0)[0], 1, width, channels],
                                tf.random.experimental.stateless_fold_in(seed, 0))
        x_best = tf.clip_by_value(x0 + eps * stripes, PIXEL_MIN, PIXEL_MAX)
        margin_best = margin_of(x_best)
        x_best = tf.where(tf.reshape(clean_correct, [-1, 1, 1, 1]), x_best, x0)
        active = tf.logical_and(clean_correct, margin_best > 0)
        queries = tf.cast(clean_correct, tf.int32)

        def cond(k, x_best, margin_best, active, queries):
            return tf.logical_and(k < num_queries - 1, tf.reduce_any(active))

        def body(k, x_best, margin_best, active, queries):
            it_seed = tf.random.experimental.stateless_fold_in(seed, k + 1)
            candidate = propose(x0, x_best, active, k, it_seed)
            margin = margin_of(candidate)
            better = tf.logical_and(active, margin < margin_best)
            x_best = tf.where(tf.reshape(better, [-1, 1, 1, 1]), candidate, x_best)
            margin_best = tf.where(better, margin, margin_best)
            queries = queries + tf.cast(active, tf.int32)
            active = tf.logical_and(active, margin_best > 0)
            return k + 1, x_best, margin_best, active, queries

        _, x_best, _, _, queries = tf.while_loop(
            cond, body, (tf.constant(0), x_best, margin_best, active, queries))
        return x_best, queries

    x_adv, queries = as_graph(run, x0, seed)
    return (x_adv, queries) if return_queries else x_adv
