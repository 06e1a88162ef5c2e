"""AutoAttack-style ensemble evaluation (Croce & Hein 2020), L-inf.

Members, in the order they run:

  fast      apgd-ce, apgd-dlr
            APGD on cross-entropy, then APGD on the DLR loss, `num_iter` iterations and
            one random start each (NoFrost's "AutoAttack (fast)").
  standard  apgd-ce, apgd-t, square
            APGD-CE; APGD-T (targeted DLR towards each of the 9 highest wrong classes,
            `num_iter` iterations each); Square (`square_queries` queries, p_init 0.8).
            AutoAttack's standard version also runs FAB-T between APGD-T and Square;
            FAB-T is out of scope here and is replaced by nothing, so this "standard"
            ensemble can only report the same or a higher robust accuracy than the
            original.

Design (differs from the reference implementation, which attacks only the points
still robust after the previous members):

  * every member attacks the whole batch (static shapes, one trace per member), with
    member k seeded by fold_in(seed, k), so its output is bit-identical to running that
    member alone with that seed, and its standalone robust accuracy is reported too;
  * an image is robust when the model classifies it correctly clean and on every
    member's point; the ensemble keeps per image the first member's point that fools
    the model (re-checked with `logits_fn`), the clean image for images misclassified
    clean, and the clean image for robust images (as AutoAttack does);
  * since each member treats images independently, the robust accuracy is what the
    reference's sequential scheme would measure with the same random draws.
"""

import dataclasses

import tensorflow as tf

from efficientnet_advprop.attacks.apgd import apgd, apgd_targeted
from efficientnet_advprop.attacks.square import square_attack

MEMBERS = {"fast": ("apgd-ce", "apgd-dlr"), "standard": ("apgd-ce", "apgd-t", "square")}


@dataclasses.dataclass
class AutoAttackResult:
    """Outcome of `autoattack` on one batch.

    Attributes:
      adversarial_images: float32 [B, ...]: the first member's point that fools the
        model, else the clean image.
      clean_correct: bool [B], the clean image is classified correctly.
      robust: bool [B], correct on the clean image and on every member's point that ran.
      per_attack: member name -> bool [B] robust under that member alone (clean-wrong
        images count as not robust), or None for a member skipped because every image
        was already broken.
      members: member names in the order they ran.
    """

    adversarial_images: tf.Tensor
    clean_correct: tf.Tensor
    robust: tf.Tensor
    per_attack: dict
    members: tuple


def _member(name, *, epsilon, num_classes, num_iter, square_queries):
    """(logits_fn, images, labels, seed) -> adversarial images, for a member name."""
    if name == "apgd-ce":
        return lambda f, x, y, seed: apgd(f, x, y, epsilon=epsilon, num_iter=num_iter,
                                          loss="ce", seed=seed)
    if name == "apgd-dlr":
        return lambda f, x, y, seed: apgd(f, x, y, epsilon=epsilon, num_iter=num_iter,
                                          loss="dlr", seed=seed)
    if name == "apgd-t":
        return lambda f, x, y, seed: apgd_targeted(
            f, x, y, epsilon=epsilon, num_classes=num_classes, num_target_classes=9,
            num_iter=num_iter, seed=seed)
    return lambda f, x, y, seed: square_attack(f, x, y, epsilon=epsilon,
                                               num_queries=square_queries, p_init=0.8,
                                               seed=seed)


def _correct(logits_fn, images, labels):
    logits = tf.cast(logits_fn(images), tf.float32)
    return tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)


def autoattack(logits_fn, images, labels, *, epsilon, num_classes, version="fast", seed,
               num_iter=100, square_queries=5000, skip_when_all_broken=False):
    """Runs the `version` ensemble (see the module docstring) on one batch.

    Args:
      logits_fn: x -> logits; the caller handles BN routing and training mode.
      images: float [B, H, W, C] in [0, 255].
      labels: int [B] true labels.
      epsilon: L-inf radius in 0..255 units (8 means 8/255).
      num_classes: number of classes (>= 3 for "fast", >= 4 for "standard").
      version: "fast" or "standard".
      seed: int tensor of shape [2]; member k uses fold_in(seed, k).
      num_iter: APGD iterations per run.
      square_queries: Square's query budget per image ("standard" only).
      skip_when_all_broken: stop running members once no image of the batch is robust
        (needs eager execution; skipped members are reported as None).

    Returns:
      An `AutoAttackResult`.
    """
    if version not in MEMBERS:
        raise ValueError(f"autoattack version must be one of {', '.join(MEMBERS)}, got "
                         f"{version!r}")
    min_classes = 3 if version == "fast" else 4
    if int(num_classes) < min_classes:
        raise ValueError(f"autoattack num_classes must be >= {min_classes} for version "
                         f"{version!r} (DLR losses), got {num_classes}")
    if skip_when_all_broken and not tf.executing_eagerly():
        raise ValueError("autoattack skip_when_all_broken=True needs eager execution")
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    seed = tf.cast(seed, tf.int64)
    members = MEMBERS[version]
    clean_correct = _correct(logits_fn, images, labels)
    robust = clean_correct
    adversarial = images
    per_attack = {}
    for k, name in enumerate(members):
        if skip_when_all_broken and not bool(tf.reduce_any(robust)):
            per_attack[name] = None
            continue
        attack = _member(name, epsilon=epsilon, num_classes=num_classes,
                         num_iter=num_iter, square_queries=square_queries)
        points = attack(logits_fn, images, labels,
                        tf.random.experimental.stateless_fold_in(seed, k))
        member_robust = clean_correct & _correct(logits_fn, points, labels)
        fooled_first = robust & tf.logical_not(member_robust)
        mask = tf.reshape(fooled_first, [-1] + [1] * (len(images.shape) - 1))
        adversarial = tf.where(mask, points, adversarial)
        robust = robust & member_robust
        per_attack[name] = member_robust
    return AutoAttackResult(adversarial_images=adversarial, clean_correct=clean_correct,
                            robust=robust, per_attack=per_attack, members=members)


def ensemble_robust_accuracy(result):
    """Fraction of the batch robust to every member that ran (a Python float, eager)."""
    return float(tf.reduce_mean(tf.cast(result.robust, tf.float32)))


def member_robust_accuracies(result):
    """Member name -> its standalone robust accuracy (Python float), None if skipped."""
    return {name: None if robust is None else float(tf.reduce_mean(tf.cast(robust,
                                                                            tf.float32)))
            for name, robust in result.per_attack.items()}
