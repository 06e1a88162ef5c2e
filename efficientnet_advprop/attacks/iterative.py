"""Evaluation attacks built on signed gradient steps: MI-FGSM, CW-L-inf, the PGD-N curve.

Same conventions as `attacks.pgd`: images are float RGB in [0, 255] (NHWC), `epsilon` and
step sizes are in the same units, every iterate is clipped to the eps-ball and to
[0, 255], and all arithmetic is float32. `logits_fn(x) -> logits` is the model as the
caller wants it attacked (BN routing and training mode are the caller's business).

  mi_fgsm     momentum iterative FGSM (Dong et al. 2018, "MIA" in NoFrost's tables)
  cw_linf     PGD on the Carlini-Wagner margin loss (the CW-L-inf of Madry/TRADES evals)
  pgd_curve   accuracy after 10, 20, ..., 2000 PGD iterations from one run
              (Xie & Yuille 2020's robustness-versus-attack-iterations curve)

Targeted variants take explicit `targets`; draw them with `attacks.pgd.random_targets`,
which never returns the true class. Passing a target equal to its label is an error.
"""

import tensorflow as tf

from efficientnet_advprop.attacks.pgd import (PIXEL_MAX, PIXEL_MIN, _cross_entropy,
                                              _loss_gradient, linf_attack)


def check_targets(labels, targets):
    """Returns `targets` as int32 (or None), refusing any target equal to its label.

    With concrete values (eager execution, constants) a clash raises ValueError; inside a
    graph with values unknown until run time it adds an assertion that fails at run time
    with tf.errors.InvalidArgumentError instead.
    """
    if targets is None:
        return None
    targets = tf.cast(targets, tf.int32)
    clash = tf.reduce_any(tf.equal(targets, tf.cast(labels, tf.int32)))
    known = tf.get_static_value(clash)
    if known is None:
        with tf.control_dependencies([tf.debugging.assert_equal(
                clash, False, message="targets: a target equals the true label")]):
            return tf.identity(targets)
    if known:
        raise ValueError("targets: a target equals the true label; draw targets with "
                         "attacks.pgd.random_targets")
    return targets


def class_margin(logits, classes):
    """z_c - max_{i != c} z_i per sample (float32 [B]); positive when c wins the argmax."""
    logits = tf.cast(logits, tf.float32)
    classes = tf.cast(classes, tf.int32)
    is_class = tf.cast(tf.one_hot(classes, tf.shape(logits)[-1]), tf.bool)
    own = tf.reduce_sum(tf.where(is_class, logits, 0.0), axis=-1)
    others = tf.reduce_max(tf.where(is_class, float("-inf"), logits), axis=-1)
    return own - others


def as_graph(fn, *args):
    """Calls `fn(*args)` as a traced graph: loops written with tf.while_loop then run as
    graph loops (traced once) even when the caller is eager."""
    if tf.executing_eagerly():
        return tf.function(fn, autograph=False)(*args)
    return fn(*args)


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (0..255 pixel units), got {value}")


def _check_iterations(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _default_objective(labels, targets):
    """(objective labels, per-sample loss to ascend): CE of the label, or minus CE of the
    target (that is, descend the target's cross-entropy)."""
    if targets is None:
        return labels, _cross_entropy
    return targets, lambda logits, y: -_cross_entropy(logits, y)


def mi_fgsm(logits_fn, images, labels, *, epsilon, num_iter=10, decay=1.0, step_size=None,
            targets=None):
    """Momentum iterative FGSM (Dong et al., CVPR 2018), L-inf.

    From the clean image (no random start), for `num_iter` steps:
        g <- decay * g + grad / ||grad||_1        (L1 norm per image, over H, W, C)
        x <- clip_[0,255](clip_ball(x + step_size * sign(g)))
    where grad is the gradient of the cross-entropy of the true label (untargeted,
    ascended) or of minus the cross-entropy of `targets` (targeted, i.e. the target's
    cross-entropy is descended). With decay 0 this is exactly I-FGSM.

    Choices the paper leaves open: step_size defaults to epsilon / num_iter (the paper's
    alpha = eps / T); the iterate is also projected onto the eps-ball after every step
    (with the default step it never leaves it anyway); an all-zero gradient is divided by
    a 1e-12 floor rather than its zero norm.

    Args:
      logits_fn: x -> logits.
      images: float [B, H, W, C] in [0, 255].
      labels: int [B] true labels.
      epsilon: L-inf radius in pixel units.
      num_iter: number of steps (Python int).
      decay: momentum factor mu (paper: 1.0).
      step_size: alpha in pixel units; None gives epsilon / num_iter.
      targets: int [B] target classes (never the label), or None for untargeted.

    Returns:
      float32 adversarial images.
    """
    _check_positive("epsilon", epsilon)
    _check_iterations("num_iter", num_iter)
    if not decay >= 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    step_size = float(epsilon) / num_iter if step_size is None else step_size
    _check_positive("step_size", step_size)
    labels = tf.cast(labels, tf.int32)
    targets = check_targets(labels, targets)
    objective_labels, loss_fn = _default_objective(labels, targets)
    x0 = tf.stop_gradient(tf.cast(images, tf.float32))
    eps = tf.constant(float(epsilon), tf.float32)
    step = tf.constant(float(step_size), tf.float32)
    mu = tf.constant(float(decay), tf.float32)
    image_axes = list(range(1, len(x0.shape)))
    x, momentum = x0, tf.zeros_like(x0)
    for _ in range(num_iter):
        grad, _ = _loss_gradient(logits_fn, x, objective_labels, loss_fn)
        l1 = tf.reduce_sum(tf.abs(grad), axis=image_axes, keepdims=True)
        momentum = mu * momentum + grad / tf.maximum(l1, 1e-12)
        x = x + step * tf.sign(momentum)
        x = tf.clip_by_value(x, x0 - eps, x0 + eps)
        x = tf.stop_gradient(tf.clip_by_value(x, PIXEL_MIN, PIXEL_MAX))
    return x


def cw_linf(logits_fn, images, labels, *, epsilon, num_iter=30, step_size=None,
            confidence=50.0, seed=None, random_start=True, targets=None):
    """PGD on the Carlini-Wagner margin loss ("CW-L-inf", Carlini & Wagner 2017 as used
    in the Madry et al. 2018 and TRADES evaluations).

    Ascends, with signed L-inf steps projected onto the eps-ball and [0, 255]:
        untargeted: min(max_{i != y} z_i - z_y, confidence)
        targeted:   min(z_t - max_{i != t} z_i, confidence)
    on the logits z. Once an image's margin passes `confidence` its gradient is zero and
    it stops moving (sign(0) = 0).

    Choices: step_size defaults to 2.5 * epsilon / num_iter (Madry et al.'s rule, which
    lets a step sequence cross the ball 1.25 times; NoFrost-style evaluations instead
    use 20 steps of a fixed size, pass step_size for that); the start is uniform in the
    eps-cube (`random_start`, as Madry's PGD) and the final iterate is returned.

    Args:
      logits_fn, images, labels, epsilon: as in `mi_fgsm`.
      num_iter: steps (Python int).
      step_size: pixel units; None gives 2.5 * epsilon / num_iter.
      confidence: the clamp kappa of the margin (default 50).
      seed: int tensor of shape [2]; required with random_start.
      random_start: start uniformly in the eps-ball instead of at the clean image.
      targets: int [B] targets (never the label), or None.

    Returns:
      float32 adversarial images.
    """
    _check_positive("epsilon", epsilon)
    _check_iterations("num_iter", num_iter)
    step_size = 2.5 * float(epsilon) / num_iter if step_size is None else step_size
    _check_positive("step_size", step_size)
    _check_positive("confidence", confidence)
    if random_start and seed is None:
        raise ValueError("seed is required when random_start=True")
    labels = tf.cast(labels, tf.int32)
    targets = check_targets(labels, targets)
    kappa = tf.constant(float(confidence), tf.float32)
    if targets is None:
        def loss_fn(logits, y):
            return tf.minimum(-class_margin(logits, y), kappa)
    else:
        def loss_fn(logits, _):
            return tf.minimum(class_margin(logits, targets), kappa)
    return linf_attack(logits_fn, images, labels, epsilon=epsilon, step_size=step_size,
                       num_iter=num_iter, random_start=random_start, seed=seed,
                       loss_fn=loss_fn)


def pgd_curve(logits_fn, images, labels, *, epsilon, step_size,
              iterations=(10, 20, 50, 100, 200, 500, 1000, 2000), targets=None, seed,
              random_start=True):
    """Robust accuracy after each of `iterations` PGD steps, from one PGD run.

    The "accuracy versus attack iterations" curve of Xie & Yuille (ICLR 2020), whose
    protocol is targeted PGD towards a random class other than the true one
    (`random_targets`), eps 16, step 1, always a random start, accuracy on the TRUE
    label. One run of max(iterations) signed steps (ascending the label's cross-entropy,
    or descending the target's) happens inside a tf.while_loop, so 2000 steps trace the
    model once. The start is uniform in the eps-cube, the same draw from `seed` as
    `linf_attack`'s random start, so the trajectory is `linf_attack`'s (up to float
    rounding: this runs as a graph, bit-identical eager or inside a tf.function).

    Counting: an image is robust after n iterations if the model classifies the clean
    image, the start and every iterate 1..n correctly (running worst case). This makes
    the curve non-increasing by construction and is stronger than judging only the n-th
    iterate: an attack that fools the model and then drifts back still counts as a
    success, as in the standard "any restart, any step" evaluation. The loop stops early
    once every image is fooled (the remaining rows are then all False).

    Args:
      logits_fn, images, labels: as in `mi_fgsm`.
      epsilon, step_size: pixel units.
      iterations: strictly increasing positive ints; the points of the curve.
      targets: int [B] targets (never the label), or None for untargeted.
      seed: int tensor of shape [2] for the random start (unused without it).
      random_start: start uniformly in the eps-ball (Xie & Yuille: always).

    Returns:
      {"correct_at": bool [len(iterations), B], row k True where the image is still
       robust after iterations[k] steps,
       "adversarial_images": float32 [B, H, W, C], per image the first point (clean,
       start or iterate) that fooled the model, or the final iterate if none did}.
    """
    _check_positive("epsilon", epsilon)
    _check_positive("step_size", step_size)
    iterations = tuple(iterations)
    if not iterations:
        raise ValueError("iterations must not be empty")
    for n in iterations:
        _check_iterations("iterations", n)
    if any(b <= a for a, b in zip(iterations, iterations[1:])):
        raise ValueError(f"iterations must be strictly increasing, got {iterations}")
    if random_start and seed is None:
        raise ValueError("seed is required when random_start=True")
    labels = tf.cast(labels, tf.int32)
    targets = check_targets(labels, targets)
    objective_labels, loss_fn = _default_objective(labels, targets)
    x0 = tf.stop_gradient(tf.cast(images, tf.float32))
    eps = tf.constant(float(epsilon), tf.float32)
    step = tf.constant(float(step_size), tf.float32)
    seed = tf.cast(seed, tf.int64) if random_start else tf.zeros([2], tf.int64)
    total = iterations[-1]
    checkpoints = tf.constant(iterations, tf.int32)

    def record(i, x, logits, fooled, x_adv, correct_at):
        """Folds iterate i (logits at x) into the running worst case."""
        wrong = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        x_adv = tf.where(tf.reshape(fooled, [-1, 1, 1, 1]), x_adv, x)
        fooled = tf.logical_or(fooled, wrong)
        at_i = tf.reshape(tf.equal(checkpoints, i), [-1, 1])
        correct_at = tf.where(at_i, tf.logical_not(fooled)[tf.newaxis], correct_at)
        return fooled, x_adv, correct_at

    def run(x0, objective_labels, seed):
        start = x0
        if random_start:
            noise = tf.random.stateless_uniform(tf.shape(x0), seed=seed, minval=-eps,
                                                maxval=eps, dtype=tf.float32)
            start = tf.clip_by_value(x0 + noise, PIXEL_MIN, PIXEL_MAX)
        clean_logits = tf.cast(logits_fn(x0), tf.float32)
        fooled = tf.not_equal(tf.argmax(clean_logits, -1, output_type=tf.int32), labels)
        correct_at = tf.zeros([len(iterations), tf.shape(labels)[0]], tf.bool)

        def cond(i, x, fooled, x_adv, correct_at):
            return tf.logical_and(i < total, tf.logical_not(tf.reduce_all(fooled)))

        def body(i, x, fooled, x_adv, correct_at):
            grad, logits = _loss_gradient(logits_fn, x, objective_labels, loss_fn)
            fooled, x_adv, correct_at = record(i, x, logits, fooled, x_adv, correct_at)
            x = tf.clip_by_value(x + step * tf.sign(grad), x0 - eps, x0 + eps)
            x = tf.stop_gradient(tf.clip_by_value(x, PIXEL_MIN, PIXEL_MAX))
            return i + 1, x, fooled, x_adv, correct_at

        i, x, fooled, x_adv, correct_at = tf.while_loop(
            cond, body, (tf.constant(0), start, fooled, x0, correct_at))
        logits = tf.cast(logits_fn(x), tf.float32)
        _, x_adv, correct_at = record(i, x, logits, fooled, x_adv, correct_at)
        return {"correct_at": correct_at, "adversarial_images": x_adv}

    return as_graph(run, x0, objective_labels, seed)
