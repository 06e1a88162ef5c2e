"""L-inf gradient attacks used to make adversarial examples during training.

Pixel convention: images are float RGB in [0, 255]; `epsilon` and `step_size` are in
the same units (epsilon 4 means 4/255 of the range), as the AdvProp paper writes them.
Every attack clips to [0, 255] after each step.

The family (AdvProp §5.1 studies all of them):

  pgd     random start uniform in the eps-ball, signed steps, projection onto the ball
  ifgsm   pgd without the random start
  gd      pgd without the projection onto the ball (only clipped to the pixel range)
  fgsm    one signed step of size epsilon from the clean image

Targeted attacks draw a random target uniformly among the classes other than the true
one (an offset in 1..num_classes-1 added modulo num_classes, so it is never the label)
and descend the target's cross-entropy instead of ascending the true label's.

Options used by the follow-up papers:

  clean_start_prob   Xie & Yuille (2020): each image starts from the clean image with
                     this probability (a uniform coin per image), else uniformly in the
                     eps-cube.
  early_stop_tau     FAT (Zhang et al. 2020): an image stops moving tau steps after it
                     is first misclassified (tau = 0: as soon as it is).
  loss_fn            any per-sample objective to ascend (TRADES ascends a KL term).

Randomness is stateless: the same seed gives the same perturbation on every run and
device of one backend (the TensorFlow and JAX engines draw different numbers from the
same seed, `efficientnet_advprop.seam`). Perturbations, losses and gradients are
computed in float32, in keras.ops: the same code runs on both engines.
"""

import dataclasses

from keras import ops

from efficientnet_advprop import seam

ATTACKERS = ("pgd", "ifgsm", "gd", "fgsm")
PIXEL_MIN = 0.0
PIXEL_MAX = 255.0


def advprop_num_iter(epsilon):
    """AdvProp's iteration count for PGD with step 1: n = eps + 1, except eps = 1 -> 1."""
    eps = float(epsilon)
    if eps <= 1.0:
        return 1
    return int(round(eps)) + 1


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """How a training attack is run.

    Attributes:
      attacker: one of ATTACKERS.
      epsilon: L-inf radius in 0..255 pixel units.
      step_size: step in 0..255 pixel units (AdvProp: 1).
      num_iter: iterations; None gives AdvProp's n = eps + 1 (1 for eps = 1). fgsm
        always takes one step of size epsilon.
      targeted: attack towards a random class other than the true one.
      bn_mode: "inference" runs the model with training=False (moving statistics, as
        the Fast AdvProp reference code does without --attack_in_train,
        meijieru/fast_advprop; no AdvProp training code was released); "batch" runs
        it with training=True and batch statistics, with moving statistics frozen
        (SplitBatchNorm models only).
      clean_start_prob: pgd/gd only: per-image probability of starting from the clean
        image instead of a uniform point of the eps-cube (Xie & Yuille: 0.2).
      early_stop_tau: FAT's early stop: None (off) or the extra steps an image may take
        after it is first misclassified.
    """

    attacker: str = "pgd"
    epsilon: float = 4.0
    step_size: float = 1.0
    num_iter: int = None
    targeted: bool = False
    bn_mode: str = "inference"
    clean_start_prob: float = 0.0
    early_stop_tau: int = None

    def __post_init__(self):
        if self.attacker not in ATTACKERS:
            raise ValueError(f"unknown attacker {self.attacker!r}; choose from "
                             f"{', '.join(ATTACKERS)}")
        if not self.epsilon > 0:
            raise ValueError(f"attack epsilon must be > 0 (0..255 units), got {self.epsilon}")
        if not self.step_size > 0:
            raise ValueError(f"attack step size must be > 0, got {self.step_size}")
        if self.num_iter is not None and self.num_iter < 1:
            raise ValueError(f"attack iterations must be >= 1, got {self.num_iter}")
        if not 0.0 <= self.clean_start_prob <= 1.0:
            raise ValueError(f"attack clean_start_prob must be in [0, 1], got "
                             f"{self.clean_start_prob}")
        if self.early_stop_tau is not None and self.early_stop_tau < 0:
            raise ValueError(f"attack early_stop_tau must be >= 0, got "
                             f"{self.early_stop_tau}")
        if self.bn_mode not in ("inference", "batch"):
            raise ValueError(f"attack bn_mode must be 'inference' or 'batch', "
                             f"got {self.bn_mode!r}")

    @property
    def iterations(self):
        if self.attacker == "fgsm":
            return 1
        return self.num_iter if self.num_iter is not None else advprop_num_iter(self.epsilon)

    @property
    def cost(self):
        """Forward-backward passes per image spent on the attack."""
        return self.iterations


def eval_attack_config(epsilon, num_iter=10, step_size=None, attacker="pgd"):
    """The evaluation PGD: random start, `num_iter` steps of 2.5 * eps / num_iter.

    The 2.5 eps / n step (Madry et al.) lets the iterate cross the ball and come back;
    training attacks use AdvProp's step 1 instead.
    """
    step = step_size if step_size else 2.5 * float(epsilon) / num_iter
    return AttackConfig(attacker=attacker, epsilon=float(epsilon), step_size=step,
                        num_iter=num_iter, bn_mode="inference")


def random_targets(labels, num_classes, seed):
    """Uniform random classes, never equal to `labels`."""
    labels = ops.cast(labels, "int32")
    offsets = seam.uniform(ops.shape(labels), seed, 1, num_classes, dtype="int32")
    return (labels + offsets) % num_classes


def _cross_entropy(logits, labels):
    return ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _loss_gradient(logits_fn, x, labels, loss_fn):
    def objective(x):
        logits = ops.cast(logits_fn(x), "float32")
        return ops.sum(loss_fn(logits, labels)), logits

    return seam.input_gradient(objective, x)


def _per_image(values, like):
    """[B] -> [B, 1, 1, ...] broadcastable against `like`."""
    return ops.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def linf_attack(logits_fn, images, labels, *, epsilon, step_size, num_iter,
                random_start=True, project=True, targets=None, seed=None,
                clean_start_prob=0.0, early_stop_tau=None, loss_fn=None, x_init=None):
    """Iterated signed-gradient attack under an L-inf budget.

    Args:
      logits_fn: x -> logits; the caller decides BN routing and training mode.
      images: float [B, H, W, C] in [0, 255].
      labels: int [B] true labels.
      epsilon, step_size: in pixel units (0..255).
      num_iter: number of steps (a Python int).
      random_start: start uniformly inside the eps-ball (needs `seed`).
      project: project onto the eps-ball after each step (False = GD variant).
      targets: int [B] target classes for a targeted attack, or None (untargeted).
      seed: a [2] seed (`seam.make_seed`) for the random start.
      clean_start_prob: with a random start, the per-image probability of starting
        from the clean image instead.
      early_stop_tau: None, or FAT's early stop: an image takes at most tau more steps
        once the model misclassifies it (checked before every step).
      loss_fn: (logits, labels) -> per-sample loss to *ascend*; default: the
        cross-entropy of the true label, or minus that of the target.
      x_init: optional starting point (projected onto the ball and the pixel range);
        replaces the random start.

    Returns:
      float32 adversarial images with no gradient attached.
    """
    x0 = ops.stop_gradient(ops.cast(images, "float32"))
    labels = ops.cast(labels, "int32")
    eps = float(epsilon)
    step = float(step_size)
    if loss_fn is not None:
        objective_labels = labels
    elif targets is not None:
        objective_labels = ops.cast(targets, "int32")
        loss_fn = lambda logits, y: -_cross_entropy(logits, y)  # noqa: E731
    else:
        objective_labels, loss_fn = labels, _cross_entropy
    if x_init is not None:
        x = ops.clip(ops.cast(x_init, "float32"), x0 - eps, x0 + eps)
        x = ops.stop_gradient(ops.clip(x, PIXEL_MIN, PIXEL_MAX))
    elif random_start:
        if seed is None:
            raise ValueError("a random start needs a seed")
        noise = seam.uniform(ops.shape(x0), seed, -eps, eps)
        if clean_start_prob > 0:
            coin = seam.uniform(ops.shape(x0)[:1], seam.fold_in(seed, 1))
            keep = ops.cast(coin >= clean_start_prob, "float32")
            noise = noise * _per_image(keep, x0)
        x = ops.clip(x0 + noise, PIXEL_MIN, PIXEL_MAX)
    else:
        x = x0
    budget = None
    if early_stop_tau is not None:
        budget = ops.full(ops.shape(labels), int(early_stop_tau), dtype="int32")
    for _ in range(int(num_iter)):
        grad, logits = _loss_gradient(logits_fn, x, objective_labels, loss_fn)
        move = step * ops.sign(grad)
        if budget is not None:
            wrong = ops.not_equal(ops.cast(ops.argmax(logits, -1), "int32"), labels)
            active = budget >= 0  # still allowed to move at this step
            budget = budget - ops.cast(wrong, "int32") * ops.cast(active, "int32")
            still = ops.logical_and(active, ops.logical_or(ops.logical_not(wrong),
                                                           budget >= 0))
            move = move * _per_image(ops.cast(still, "float32"), x0)
        x = x + move
        if project:
            x = ops.clip(x, x0 - eps, x0 + eps)
        x = ops.stop_gradient(ops.clip(x, PIXEL_MIN, PIXEL_MAX))
    return x


def attack(logits_fn, images, labels, config, *, num_classes=None, seed=None,
           loss_fn=None):
    """Runs the attack an `AttackConfig` describes; see `linf_attack`.

    `seed` is a [2] seed (`seam.make_seed`); the random start and the random target
    use independent streams folded from it.
    """
    if seed is not None:
        start_seed = seam.fold_in(seed, 0)
        target_seed = seam.fold_in(seed, 1)
    else:
        start_seed = target_seed = None
    targets = None
    if config.targeted:
        if num_classes is None or target_seed is None:
            raise ValueError("a targeted attack needs num_classes and a seed")
        targets = random_targets(labels, num_classes, target_seed)
    if config.attacker == "fgsm":
        return linf_attack(logits_fn, images, labels, epsilon=config.epsilon,
                           step_size=config.epsilon, num_iter=1, random_start=False,
                           project=True, targets=targets,
                           early_stop_tau=config.early_stop_tau, loss_fn=loss_fn)
    return linf_attack(
        logits_fn, images, labels, epsilon=config.epsilon, step_size=config.step_size,
        num_iter=config.iterations, random_start=config.attacker in ("pgd", "gd"),
        project=config.attacker != "gd", targets=targets, seed=start_seed,
        clean_start_prob=config.clean_start_prob, early_stop_tau=config.early_stop_tau,
        loss_fn=loss_fn)
