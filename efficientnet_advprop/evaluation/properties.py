"""Model-property metrics NoFrost (Wang et al., ICML 2022) reports next to accuracy.

All functions take a `logits_fn(x) -> logits` on float RGB in [0, 255] and return
per-image float32 values; the caller averages them.

  decision_margin      p_y(x) - max_{i != y} p_i(x) on softmax probabilities; > 0 exactly
                       when the image is classified correctly.
  boundary_thickness   Yang et al. (NeurIPS 2020): for a clean image x (class i) and an
                       endpoint x* (found by a targeted attack towards class j),
                       ||x - x*||_2 times the fraction of the segment x -> x* on which
                       alpha < p_i - p_j < beta (alpha 0, beta 0.75 as NoFrost uses).
  kl_smoothness        KL(p(x) || p(x*)) between the predictions on the clean image and
                       on an adversarial one: small for a locally smooth model.

Choices the papers leave open, made here:
- Distances are measured on images scaled to [0, 1] (pixel values / 255), the scale the
  PyTorch references work in, so figures are comparable to published ones.
- The segment integral is a Riemann sum over `num_points` evenly spaced points, both
  ends included (NoFrost's reference samples the segment the same way).
- Class i is the true label; images the model already misclassifies still get a value
  (a thickness near 0 when p_i < p_j at x), so callers can choose the subset; the suite
  reports the mean over all evaluated images.
"""

import tensorflow as tf


def _probabilities(logits_fn, x):
    return tf.nn.softmax(tf.cast(logits_fn(x), tf.float32), axis=-1)


def decision_margin(logits, labels):
    """p_y - max_{i != y} p_i per image, from logits [B, K] and int labels [B]."""
    probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    labels = tf.cast(labels, tf.int32)
    true = tf.gather(probs, labels, batch_dims=1)
    others = probs - tf.one_hot(labels, tf.shape(probs)[-1], on_value=2.0, off_value=0.0)
    return true - tf.reduce_max(others, axis=-1)


def boundary_thickness(logits_fn, images, endpoints, labels, targets, *, alpha=0.0,
                       beta=0.75, num_points=128):
    """||x - x*|| * |{t : alpha < p_i(x_t) - p_j(x_t) < beta}| along x_t = x + t (x* - x).

    Args:
      images, endpoints: float [B, H, W, C] in [0, 255]: the clean images and the attack
        endpoints x* (NoFrost: targeted PGD-20 towards `targets`).
      labels, targets: int [B]: class i (true) and class j (the attack's target).
      alpha, beta: the band of p_i - p_j counted as "inside the boundary".
      num_points: points on the segment (the integral's resolution).
    Returns:
      float32 [B] thickness in [0, 1]-pixel L2 units.
    """
    if not alpha < beta:
        raise ValueError(f"boundary thickness needs alpha < beta, got {alpha}, {beta}")
    if num_points < 2:
        raise ValueError(f"boundary thickness needs num_points >= 2, got {num_points}")
    x = tf.cast(images, tf.float32)
    end = tf.cast(endpoints, tf.float32)
    labels = tf.cast(labels, tf.int32)
    targets = tf.cast(targets, tf.int32)

    def inside(t):
        probs = _probabilities(logits_fn, x + t * (end - x))
        gap = (tf.gather(probs, labels, batch_dims=1)
               - tf.gather(probs, targets, batch_dims=1))
        return tf.cast(tf.logical_and(gap > alpha, gap < beta), tf.float32)

    ts = tf.linspace(0.0, 1.0, num_points)
    fraction = tf.reduce_mean(tf.map_fn(inside, ts, fn_output_signature=tf.float32), 0)
    distance = tf.norm(tf.reshape((end - x) / 255.0, [tf.shape(x)[0], -1]), axis=-1)
    return distance * fraction


def kl_smoothness(logits_fn, images, adversarial_images):
    """KL(p(x) || p(x*)) per image (nats)."""
    p = _probabilities(logits_fn, tf.cast(images, tf.float32))
    log_p = tf.math.log(tf.maximum(p, 1e-12))
    log_q = tf.nn.log_softmax(tf.cast(logits_fn(tf.cast(adversarial_images, tf.float32)),
                                      tf.float32), axis=-1)
    return tf.reduce_sum(p * (log_p - log_q), axis=-1)
