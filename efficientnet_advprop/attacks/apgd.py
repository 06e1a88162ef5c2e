"""Auto-PGD (APGD) under an L-inf budget: APGD-CE, APGD-DLR and the targeted APGD-T.

Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1 and §3-4, L-inf only.

Pixel convention as in `pgd`: images are float RGB in [0, 255]; `epsilon` is in the
same units. Every iterate is clipped to the eps-ball and to [0, 255].

The algorithm, for N = `num_iter` iterations and per image:

  x0      uniform random start in the eps-ball (clipped to the pixel range)
  x1      = P(x0 + eta * sign(grad f(x0)))                       (no momentum)
  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})),
            z = P(x_k + eta * sign(grad f(x_k)))                 (k = 1 .. N-1)

with P the projection onto ball and pixel range, eta = 2 eps at the start, alpha = 0.75.
Checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} -
0.03, 0.06). At a checkpoint w_j an image halves its step and restarts from the
highest-loss point so far when (1) fewer than rho * (w_j - w_{j-1}) of the steps of the
segment increased the loss (f(x_{i+1}) > f(x_i) for w_{j-1} <= i < w_j), or (2) its step
was not halved at w_{j-1} and its best loss has not grown since w_{j-1}.

Choices the paper leaves open, made here:

  * Checkpoints are computed exactly in integer hundredths (no float round-up of
    0.41 * 100) and duplicates (possible when N < 17) are dropped; the last checkpoint is
    the largest w_j <= N.
  * At the first checkpoint condition (2) compares against w_0 = 0 (the step is
    trivially unchanged, the best loss is that of x0). The public reference code instead
    never fires (2) at the first checkpoint.
  * After a restart from the best point, that point's loss and gradient are used for the
    next step and for the next "did the loss increase" comparison; the momentum term is
    x_max - x_{k-1} (the previous iterate), as the algorithm reads literally.
  * The random start is uniform per coordinate in [-eps, eps] (a point of the cube,
    not rescaled onto its surface as in the reference code).
  * Result per image: an image is broken as soon as one evaluated point (random start
    included) is misclassified, and the FIRST such point is returned; an image the
    model misclassifies when clean is returned unchanged (it stays counted wrong);
    otherwise the highest-loss point over all restarts (or target classes) is
    returned. Success is always "argmax != true label", also for targeted losses.
  * Restarts and target classes run on the whole batch (static shapes) with fresh
    random starts; they only replace the points of images not broken yet. A run stops
    early once every image of the batch is broken, which cannot change the output.
  * Gradients: sign of the gradient of the summed per-image losses (a model without
    batch interaction in `logits_fn`, e.g. BN in inference mode, makes them per image).

Everything runs in float32. The iterations run in a tf.while_loop over runs (restarts or
target classes) around a tf.while_loop over iterations, so the model is traced a few
times whatever `num_iter`, the restarts or the targets. Called eagerly, each call traces
its own graph; call the functions inside your own tf.function to reuse one trace over
many batches of the same shape.
"""

import tensorflow as tf

from efficientnet_advprop.attacks.iterative import as_graph, check_targets
from efficientnet_advprop.attacks.pgd import PIXEL_MAX, PIXEL_MIN

LOSSES = ("ce", "dlr")
_DLR_EPS = 1e-12


def _num_classes(logits):
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError("logits need a static class dimension for the DLR loss")
    return int(num_classes)


def dlr_loss(logits, labels):
    """Untargeted Difference-of-Logits-Ratio loss of Croce & Hein (2020), per sample.

    DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), pi the classes by
    decreasing logit. Positive exactly when the sample is misclassified; invariant to
    shifting and scaling the logits. Needs >= 3 classes.
    """
    logits = tf.cast(logits, tf.float32)
    if _num_classes(logits) < 3:
        raise ValueError(f"dlr_loss needs logits with >= 3 classes, got "
                         f"{_num_classes(logits)}")
    labels = tf.cast(labels, tf.int32)
    true_logit = tf.gather(logits, labels, batch_dims=1)
    is_label = tf.one_hot(labels, _num_classes(logits), on_value=True, off_value=False)
    best_other = tf.reduce_max(tf.where(is_label, -float("inf"), logits), axis=-1)
    top = tf.math.top_k(logits, k=3).values
    return -(true_logit - best_other) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def targeted_dlr_loss(logits, labels, targets):
    """Targeted DLR loss of Croce & Hein (2020), per sample, to be maximised.

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), pi the classes by decreasing
    logit, t the target. Needs >= 4 classes.
    """
    logits = tf.cast(logits, tf.float32)
    if _num_classes(logits) < 4:
        raise ValueError(f"targeted_dlr_loss needs logits with >= 4 classes, got "
                         f"{_num_classes(logits)}")
    true_logit = tf.gather(logits, tf.cast(labels, tf.int32), batch_dims=1)
    target_logit = tf.gather(logits, tf.cast(targets, tf.int32), batch_dims=1)
    top = tf.math.top_k(logits, k=4).values
    return -(true_logit - target_logit) / (
        top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS)


def top_k_targets(logits, labels, k):
    """int32 [B, k]: the k classes with the highest logits other than the true label.

    Ordered by decreasing logit (ties: lower class index first). The true label is
    sorted after every other class before the cut, so it is never returned (k must be
    at most num_classes - 1). APGD-T targets these classes of the clean logits.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = _num_classes(logits)
    if not 1 <= k <= num_classes - 1:
        raise ValueError(f"top_k_targets k must be in [1, {num_classes - 1}], got {k}")
    by_logit = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    is_label = tf.cast(tf.equal(by_logit, tf.cast(labels, tf.int32)[:, None]), tf.int32)
    label_last = tf.argsort(is_label, axis=-1, direction="ASCENDING", stable=True)
    order = tf.gather(by_logit, label_last, batch_dims=1)
    return order[:, :k]


def checkpoints(num_iter):
    """APGD's checkpoint iterations w_1 < w_2 < ... <= num_iter (w_0 = 0 not listed)."""
    points, prev, cur = [], 0, 22  # p_j in hundredths
    while True:
        w = -(-cur * num_iter // 100)  # ceil(p_j * N)
        if w > num_iter:
            return points
        if not points or w > points[-1]:
            points.append(w)
        prev, cur = cur, cur + max(cur - prev - 3, 6)


def _objective(loss, targeted):
    """(logits, labels, targets) -> per-sample loss to ascend."""
    if loss == "ce":
        if targeted:
            return lambda z, y, t: -tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=t, logits=z)
        return lambda z, y, t: tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y, logits=z)
    if targeted:
        return targeted_dlr_loss
    return lambda z, y, t: dlr_loss(z, y)


def _per_image(mask, rank):
    return tf.reshape(mask, [-1] + [1] * (rank - 1))


class _Apgd:
    """The APGD iteration for one batch; `run_all` loops over runs (restarts/targets)."""

    def __init__(self, logits_fn, images, labels, *, epsilon, num_iter, objective,
                 rho, alpha):
        self.logits_fn = logits_fn
        self.x_clean = tf.cast(images, tf.float32)
        self.labels = tf.cast(labels, tf.int32)
        self.eps = tf.constant(float(epsilon), tf.float32)
        self.num_iter = int(num_iter)
        self.objective = objective
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.rank = len(self.x_clean.shape)
        self.lower = tf.maximum(self.x_clean - self.eps, PIXEL_MIN)
        self.upper = tf.minimum(self.x_clean + self.eps, PIXEL_MAX)
        # Checkpoint table padded with a sentinel never reached.
        points = checkpoints(self.num_iter)
        self.checks = tf.constant(points + [self.num_iter + 1], tf.int32)
        self.previous_checks = tf.constant([0] + points, tf.int32)

    def project(self, x):
        return tf.clip_by_value(x, self.lower, self.upper)

    def evaluate(self, x, targets):
        """(loss [B], gradient, misclassified [B]) at x."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(self.logits_fn(x), tf.float32)
            loss = self.objective(logits, self.labels, targets)
            total = tf.reduce_sum(loss)
        grad = tape.gradient(total, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        wrong = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), self.labels)
        return tf.stop_gradient(loss), tf.stop_gradient(grad), wrong

    def single_run(self, targets, seed, done):
        """One APGD run from a random start; images in `done` may stop early.

        Returns (first misclassified point, broken [B], highest-loss point, its loss).
        """
        x0 = tf.random.stateless_uniform(tf.shape(self.x_clean), seed=seed,
                                         minval=-self.eps, maxval=self.eps,
                                         dtype=tf.float32)
        x0 = self.project(self.x_clean + x0)
        loss0, grad0, wrong0 = self.evaluate(x0, targets)
        batch = tf.shape(self.labels)
        state = dict(
            t=tf.constant(1, tf.int32), j=tf.constant(0, tf.int32),
            x=x0, x_prev=x0, grad=grad0, loss=loss0,
            step=tf.fill(batch, 2.0 * self.eps),
            x_max=x0, grad_max=grad0, loss_max=loss0,
            x_adv=x0, broken=wrong0,
            increases=tf.zeros(batch, tf.int32),
            loss_max_at_check=loss0, halved_at_check=tf.zeros(batch, tf.bool))

        def cond(s):
            return tf.logical_and(s["t"] <= self.num_iter,
                                  tf.logical_not(tf.reduce_all(s["broken"] | done)))

        def body(s):
            s = dict(s)
            alpha = tf.where(tf.equal(s["t"], 1), 1.0, self.alpha)  # x1: no momentum
            step = _per_image(s["step"], self.rank)
            z = self.project(s["x"] + step * tf.sign(s["grad"]))
            x_new = self.project(s["x"] + alpha * (z - s["x"])
                                 + (1.0 - alpha) * (s["x"] - s["x_prev"]))
            loss, grad, wrong = self.evaluate(x_new, targets)
            s["increases"] += tf.cast(loss > s["loss"], tf.int32)
            better = _per_image(loss > s["loss_max"], self.rank)
            s["x_max"] = tf.where(better, x_new, s["x_max"])
            s["grad_max"] = tf.where(better, grad, s["grad_max"])
            s["loss_max"] = tf.maximum(loss, s["loss_max"])
            first = wrong & tf.logical_not(s["broken"])
            s["x_adv"] = tf.where(_per_image(first, self.rank), x_new, s["x_adv"])
            s["broken"] = s["broken"] | wrong
            s["x_prev"], s["x"], s["grad"], s["loss"] = s["x"], x_new, grad, loss

            # Checkpoint: halve the step and restart from the best point where needed.
            at_check = tf.equal(s["t"], self.checks[s["j"]])
            segment = tf.cast(self.checks[s["j"]] - self.previous_checks[s["j"]],
                              tf.float32)
            few_increases = tf.cast(s["increases"], tf.float32) < self.rho * segment
            stalled = (tf.logical_not(s["halved_at_check"])
                       & tf.equal(s["loss_max"], s["loss_max_at_check"]))
            halve = at_check & (few_increases | stalled)
            s["step"] = tf.where(halve, 0.5 * s["step"], s["step"])
            halve_x = _per_image(halve, self.rank)
            s["x"] = tf.where(halve_x, s["x_max"], s["x"])
            s["grad"] = tf.where(halve_x, s["grad_max"], s["grad"])
            s["loss"] = tf.where(halve, s["loss_max"], s["loss"])
            s["halved_at_check"] = tf.where(at_check, halve, s["halved_at_check"])
            s["loss_max_at_check"] = tf.where(at_check, s["loss_max"],
                                              s["loss_max_at_check"])
            s["increases"] = tf.where(at_check, 0, s["increases"])
            s["j"] += tf.cast(at_check, tf.int32)
            s["t"] += 1
            return (s,)

        (state,) = tf.while_loop(cond, body, (state,))
        return state["x_adv"], state["broken"], state["x_max"], state["loss_max"]

    def run_all(self, run_targets, run_seeds):
        """Runs APGD once per row of `run_targets` [R, B] / `run_seeds` [R, 2].

        Keeps per image the first misclassified point over the runs (the clean image
        for clean-misclassified images), else the highest-loss point.
        """
        clean_logits = tf.cast(self.logits_fn(self.x_clean), tf.float32)
        clean_wrong = tf.not_equal(tf.argmax(clean_logits, -1, output_type=tf.int32),
                                   self.labels)
        num_runs = tf.shape(run_seeds)[0]
        init = (tf.constant(0, tf.int32), self.x_clean, clean_wrong,
                tf.fill(tf.shape(self.labels), -float("inf")))

        def cond(r, x_out, broken, loss_out):
            return tf.logical_and(r < num_runs, tf.logical_not(tf.reduce_all(broken)))

        def body(r, x_out, broken, loss_out):
            x_adv, run_broken, x_max, loss_max = self.single_run(
                run_targets[r], run_seeds[r], broken)
            newly = run_broken & tf.logical_not(broken)
            higher = (tf.logical_not(broken) & tf.logical_not(run_broken)
                      & (loss_max > loss_out))
            x_out = tf.where(_per_image(newly, self.rank), x_adv, x_out)
            x_out = tf.where(_per_image(higher, self.rank), x_max, x_out)
            loss_out = tf.where(higher, loss_max, loss_out)
            return r + 1, x_out, broken | run_broken, loss_out

        _, x_out, _, _ = tf.while_loop(cond, body, init)
        return tf.stop_gradient(x_out)


def _check_common(epsilon, num_iter, seed):
    if not epsilon > 0:
        raise ValueError(f"apgd epsilon must be > 0 (0..255 units), got {epsilon}")
    if int(num_iter) < 1:
        raise ValueError(f"apgd num_iter must be >= 1, got {num_iter}")
    if seed is None:
        raise ValueError("apgd seed must be an int tensor of shape [2], got None")


def apgd(logits_fn, images, labels, *, epsilon, num_iter=100, loss="ce", targets=None,
         num_restarts=1, seed, rho=0.75, alpha=0.75):
    """APGD-CE / APGD-DLR (untargeted) or targeted APGD under an L-inf budget.

    Croce & Hein (2020), Algorithm 1; the module docstring lists the choices made where
    the paper is silent.

    Args:
      logits_fn: x -> logits; the caller handles BN routing and training mode.
      images: float [B, ...] in [0, 255].
      labels: int [B] true labels.
      epsilon: L-inf radius in 0..255 units; the step starts at 2 * epsilon.
      num_iter: iterations per restart (a Python int): num_iter + 1 forward-backward
        passes per image and restart, plus one clean forward pass.
      loss: "ce" (cross-entropy) or "dlr"; with `targets`, the targeted version
        (minus the target's cross-entropy, or the targeted DLR, which needs >= 4
        classes; the untargeted DLR needs >= 3).
      targets: int [B] target classes (targeted attack), never the true label, or
        None. Success is still "not the true label".
      num_restarts: random restarts; restart r starts from a point drawn with
        fold_in(seed, r) and only replaces images not broken yet.
      seed: int tensor of shape [2]; the same seed gives bit-identical output.
      rho: step-halving threshold on the fraction of loss-increasing steps (0.75).
      alpha: momentum weight of the new step (0.75).

    Returns:
      float32 images: per image the first misclassified point found, the clean image
      if it is misclassified already, else the highest-loss point.
    """
    _check_common(epsilon, num_iter, seed)
    if loss not in LOSSES:
        raise ValueError(f"apgd loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if int(num_restarts) < 1:
        raise ValueError(f"apgd num_restarts must be >= 1, got {num_restarts}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"apgd rho must be in (0, 1], got {rho}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"apgd alpha must be in (0, 1], got {alpha}")
    targets = check_targets(labels, targets)
    objective = _objective(loss, targets is not None)

    def run(images, labels, run_targets, seed):
        attack = _Apgd(logits_fn, images, labels, epsilon=epsilon, num_iter=num_iter,
                       objective=objective, rho=rho, alpha=alpha)
        seeds = tf.stack([tf.random.experimental.stateless_fold_in(seed, r)
                          for r in range(int(num_restarts))])
        return attack.run_all(tf.stack([run_targets] * int(num_restarts)), seeds)

    labels = tf.cast(labels, tf.int32)
    run_targets = labels if targets is None else targets
    return as_graph(run, tf.cast(images, tf.float32), labels, run_targets,
                    tf.cast(seed, tf.int64))


def apgd_targeted(logits_fn, images, labels, *, epsilon, num_classes, num_target_classes=9,
                  num_iter=100, seed):
    """AutoAttack's APGD-T: targeted-DLR APGD towards each of the top wrong classes.

    For i = 0 .. k-1, k = min(num_target_classes, num_classes - 1), runs one targeted-DLR
    APGD (as `apgd(..., loss="dlr", targets=top_k_targets(clean_logits, labels, k)[:, i],
    seed=fold_in(seed, i))`, one restart) on the images not broken yet; keeps per
    image the first misclassified point (targets are ranked by the clean logits and
    never include the true label), else the highest targeted-DLR point over the
    targets. Needs num_classes >= 4.
    """
    _check_common(epsilon, num_iter, seed)
    if int(num_classes) < 4:
        raise ValueError(f"apgd_targeted num_classes must be >= 4 (targeted DLR), got "
                         f"{num_classes}")
    if int(num_target_classes) < 1:
        raise ValueError(f"apgd_targeted num_target_classes must be >= 1, got "
                         f"{num_target_classes}")
    k = min(int(num_target_classes), int(num_classes) - 1)

    def run(images, labels, seed):
        attack = _Apgd(logits_fn, images, labels, epsilon=epsilon, num_iter=num_iter,
                       objective=targeted_dlr_loss, rho=0.75, alpha=0.75)
        targets = top_k_targets(logits_fn(images), labels, k)
        fold = tf.random.experimental.stateless_fold_in
        seeds = tf.stack([fold(fold(seed, i), 0) for i in range(k)])
        return attack.run_all(tf.transpose(targets), seeds)

    return as_graph(run, tf.cast(images, tf.float32), tf.cast(labels, tf.int32),
                    tf.cast(seed, tf.int64))
