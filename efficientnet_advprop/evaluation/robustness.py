"""The robustness suite: one pass over an evaluation set, every measurement per batch.

`evaluate_robustness(logits_fn, dataset, config, ...)` returns a JSON-able dict (see
`report.write_report` for the files made from it). Sections, each switched by
`RobustnessConfig`:

  attacks          white-box and black-box L-inf attacks at `epsilon` (names in
                   ATTACK_NAMES); an image counts as robust under an attack when it is
                   classified correctly both clean and at the attack's point, so no
                   attack can report more than the clean accuracy. The per-image worst
                   case over all attacks run is reported as `worst_case_accuracy`.
  iteration_curve  Xie & Yuille's accuracy vs PGD iterations (targeted, random
                   non-true target, eps 16, step 1 in the paper) from one run that
                   tracks the running worst case, so the curve never rises.
  mbn              for models with auxiliary BNs: clean and PGD accuracy of each MBN
                   inference mode over a gamma sweep (the attack targets the mixed
                   model itself).
  properties       decision margin (clean and under PGD), boundary thickness (endpoint:
                   targeted PGD-20) and KL smoothness (against the PGD point).
  corruptions      the 15 common corruptions x severities generated on the fly from the
                   evaluation images (seeded), with mean corruption error, normalised
                   by a baseline when one is given.
  distribution_shift  accuracy on extra datasets (ImageNet-A/R/Sketch/Stylized or
                   folders), optionally keeping a subset of the logits (200 classes).
  bn_statistics    main vs auxiliary running statistics per layer (no data needed).

Randomness: batch b of the evaluation set uses the seed pair (seed, b), folded with a
fixed index per measurement, so a rerun with the same seed gives the same numbers and
adding or removing a section does not change the others.

Everything runs on one device (the attacks' inner loops are sequential anyway); the
model is evaluated in inference mode (BN moving statistics).
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf

from efficientnet_advprop.attacks.apgd import apgd, apgd_targeted
from efficientnet_advprop.attacks.iterative import cw_linf, mi_fgsm, pgd_curve
from efficientnet_advprop.attacks.pgd import linf_attack, random_targets
from efficientnet_advprop.attacks.square import square_attack
from efficientnet_advprop.data.corruptions import CORRUPTIONS, corrupt
from efficientnet_advprop.evaluation.autoattack import autoattack
from efficientnet_advprop.layers.bn_statistics import bn_statistics, summarize_bn_statistics
from efficientnet_advprop.evaluation.distribution_shift import (class_subset_logits,
                                                                mean_corruption_error)
from efficientnet_advprop.evaluation.mbn import MBN_MODES, has_auxiliary_bn, mbn_logits_fn
from efficientnet_advprop.evaluation.properties import (boundary_thickness,
                                                        decision_margin, kl_smoothness)
from efficientnet_advprop.utils.progress import Progress

ATTACK_NAMES = ("pgd", "pgd-targeted", "apgd-ce", "apgd-dlr", "apgd-t", "mi-fgsm", "cw",
                "square", "autoattack")
# Fixed stream per measurement, so sections are independent of each other.
_STREAMS = {name: index for index, name in enumerate(
    ATTACK_NAMES + ("curve", "mbn", "thickness", "corruptions"))}


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    """What the suite measures.

    Attributes:
      epsilon: L-inf radius of every attack, 0..255 units.
      attacks: names from ATTACK_NAMES, run in that order.
      pgd_iterations: PGD-N (step 2.5 eps / N, random start), also the MBN sweep's attack.
      apgd_iterations: APGD iterations (100 as AutoAttack).
      mi_fgsm_iterations, cw_iterations: MI-FGSM (decay 1) and CW-L-inf (PGD on the
        margin loss, confidence 50) steps.
      square_queries: Square attack query budget (NoFrost: 400).
      autoattack_version: "fast" (APGD-CE, APGD-DLR) or "standard" (plus APGD-T, Square).
      curve_iterations: iteration counts of the accuracy-vs-iterations curve; () skips.
      curve_targeted, curve_epsilon, curve_step_size: the curve's attack (Xie & Yuille:
        targeted, eps 16, step 1); curve_epsilon None uses `epsilon`.
      mbn_modes, mbn_gammas, mbn_layer_fraction: the MBN sweep (models with auxiliary
        BNs only); "main" and "aux" are single points.
      properties: measure margin, boundary thickness and KL smoothness.
      thickness_points: points on each segment of the boundary-thickness integral.
      corruptions, severities: generated corruptions; () skips.
      mce_baseline: None, "alexnet" (ImageNet-C constants, 1000-class ImageNet only) or
        {corruption: [error per severity]} from a baseline run.
      seed: base seed of every random choice.
    """

    epsilon: float = 8.0
    attacks: tuple = ("pgd", "apgd-ce", "apgd-dlr", "mi-fgsm", "cw", "square", "autoattack")
    pgd_iterations: int = 20
    apgd_iterations: int = 100
    mi_fgsm_iterations: int = 20
    cw_iterations: int = 20
    square_queries: int = 400
    autoattack_version: str = "fast"
    curve_iterations: tuple = (10, 20, 50, 100, 200)
    curve_targeted: bool = True
    curve_epsilon: float = None
    curve_step_size: float = 1.0
    mbn_modes: tuple = MBN_MODES
    mbn_gammas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    mbn_layer_fraction: float = 0.5
    properties: bool = True
    thickness_points: int = 64
    corruptions: tuple = CORRUPTIONS
    severities: tuple = (1, 2, 3, 4, 5)
    mce_baseline: object = None
    seed: int = 0

    def __post_init__(self):
        if not self.epsilon > 0:
            raise ValueError(f"robustness epsilon must be > 0 (0..255 units), got "
                             f"{self.epsilon}")
        for kind, values, choices in (("attack", self.attacks, ATTACK_NAMES),
                                      ("corruption", self.corruptions, CORRUPTIONS),
                                      ("MBN mode", self.mbn_modes, MBN_MODES)):
            unknown = [v for v in values if v not in choices]
            if unknown:
                raise ValueError(f"unknown {kind}(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(choices)}")
        if any(not 1 <= int(s) <= 5 for s in self.severities):
            raise ValueError(f"corruption severities must be in 1..5, got "
                             f"{self.severities}")
        if any(not 0.0 <= g <= 1.0 for g in self.mbn_gammas):
            raise ValueError(f"MBN gammas must be in [0, 1], got {self.mbn_gammas}")
        if any(int(n) < 1 for n in self.curve_iterations):
            raise ValueError(f"curve iterations must be >= 1, got {self.curve_iterations}")
        if self.autoattack_version not in ("fast", "standard"):
            raise ValueError(f"autoattack_version must be 'fast' or 'standard', got "
                             f"{self.autoattack_version!r}")

    @property
    def pgd_step(self):
        return 2.5 * self.epsilon / self.pgd_iterations


def _attack_label(name, config):
    return {"pgd": f"pgd{config.pgd_iterations}",
            "pgd-targeted": f"pgd{config.pgd_iterations}-targeted",
            "apgd-ce": "apgd-ce", "apgd-dlr": "apgd-dlr", "apgd-t": "apgd-t",
            "mi-fgsm": f"mi-fgsm{config.mi_fgsm_iterations}",
            "cw": f"cw-linf{config.cw_iterations}",
            "square": f"square{config.square_queries}",
            "autoattack": f"autoattack-{config.autoattack_version}"}[name]


def _correct(logits, labels):
    return tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32))


class _Suite:
    """Traced per-batch functions of one suite run (built once, reused per batch)."""

    def __init__(self, logits_fn, config, num_classes):
        self.logits_fn = logits_fn
        self.config = config
        self.num_classes = num_classes
        self.attack_fns = {name: tf.function(self._attack_fn(name))
                           for name in config.attacks}

    @staticmethod
    def seed_for(batch_seed, stream, k=0):
        seed = tf.random.experimental.stateless_fold_in(batch_seed, _STREAMS[stream])
        return tf.random.experimental.stateless_fold_in(seed, k)

    def _attack_fn(self, name):
        c, f = self.config, self.logits_fn
        eps = float(c.epsilon)

        def pgd(x, y, seed, targeted):
            targets = random_targets(y, self.num_classes, seed) if targeted else None
            return linf_attack(f, x, y, epsilon=eps, step_size=c.pgd_step,
                               num_iter=c.pgd_iterations, targets=targets,
                               seed=tf.random.experimental.stateless_fold_in(seed, 1))

        def run(x, y, seed):
            if name in ("pgd", "pgd-targeted"):
                adv = pgd(x, y, seed, name == "pgd-targeted")
            elif name in ("apgd-ce", "apgd-dlr"):
                adv = apgd(f, x, y, epsilon=eps, num_iter=c.apgd_iterations,
                           loss=name[5:], seed=seed)
            elif name == "apgd-t":
                adv = apgd_targeted(f, x, y, epsilon=eps, num_classes=self.num_classes,
                                    num_iter=c.apgd_iterations, seed=seed)
            elif name == "mi-fgsm":
                adv = mi_fgsm(f, x, y, epsilon=eps, num_iter=c.mi_fgsm_iterations)
            elif name == "cw":
                adv = cw_linf(f, x, y, epsilon=eps, num_iter=c.cw_iterations, seed=seed)
            elif name == "square":
                adv = square_attack(f, x, y, epsilon=eps, num_queries=c.square_queries,
                                    seed=seed)
            else:
                result = autoattack(f, x, y, epsilon=eps, num_classes=self.num_classes,
                                    version=c.autoattack_version, seed=seed,
                                    num_iter=c.apgd_iterations)
                members = {k: v for k, v in result.per_attack.items() if v is not None}
                return result.adversarial_images, result.robust, members
            return adv, _correct(f(adv), y), {}

        return run


def _as_float(images):
    return tf.cast(images, tf.float32)


def _pad(values, size):
    """`values` with its first rows repeated at the end up to `size` rows."""
    missing = size - int(values.shape[0])
    if missing <= 0:
        return values
    reps = -(-missing // int(values.shape[0]))
    return tf.concat([values, tf.tile(values, [reps] + [1] * (len(values.shape) - 1))[
        :missing]], axis=0)


def evaluate_robustness(logits_fn, dataset, config, *, num_classes, model=None,
                        shift_datasets=None, metadata=None, show_progress=True,
                        num_batches=None):
    """Runs the suite; see the module docstring.

    Args:
      logits_fn: x in [0, 255] -> logits of the deployed network (main BN set).
      dataset: finite tf.data.Dataset of (images, labels) batches (eval preprocessing).
      config: RobustnessConfig.
      num_classes: number of logits.
      model: the Keras model, for the MBN sweep and BN statistics (None: skipped, e.g.
        for a SavedModel).
      shift_datasets: {name: (dataset, logit_indices or None)} extra datasets to
        measure accuracy on; with indices only those logits are compared (ImageNet-A/R).
      metadata: dict stored under "model" in the result.
      show_progress: a progress bar on stderr (one line per batch off a terminal).
      num_batches: the progress bar's total when the dataset's cardinality is unknown.
    Returns:
      the result dict (JSON-able).
    """
    c = config
    suite = _Suite(logits_fn, c, num_classes)
    mbn_modes = c.mbn_modes if model is not None and has_auxiliary_bn(model) else ()
    started = time.perf_counter()
    seconds = {}

    correct_fn = tf.function(lambda x, y: _correct(logits_fn(x), y))  # clean, corrupted
    curve_fn = tf.function(lambda x, y, seed: pgd_curve(
        logits_fn, x, y, epsilon=float(c.curve_epsilon or c.epsilon),
        step_size=float(c.curve_step_size), iterations=tuple(int(n) for n in
                                                             c.curve_iterations),
        targets=(random_targets(y, num_classes, seed) if c.curve_targeted else None),
        seed=tf.random.experimental.stateless_fold_in(seed, 1))["correct_at"])
    mbn_fns = {mode: tf.function(_mbn_fn(model, mode, c)) for mode in mbn_modes}
    props_fn = tf.function(_properties_fn(logits_fn, c, num_classes))

    clean, worst = [], []
    attacked = {name: [] for name in c.attacks}
    members = {}
    curve = []
    mbn = {mode: {g: ([], []) for g in _gammas(mode, c)} for mode in mbn_modes}
    props = {"margin_clean": [], "margin_pgd": [], "thickness": [], "kl": []}
    corr = {(n, s): [] for n in c.corruptions for s in c.severities}

    total = int(dataset.cardinality().numpy())
    total = total if total >= 0 else (num_batches or 0)
    progress = Progress(total, unit="img") if show_progress else None
    batch_size = None
    for index, (images, labels) in enumerate(dataset):
        # A short last batch is padded to the first batch's size and the padding
        # dropped from every result: the traced functions are reused, not retraced
        # (every measurement is per image, the model runs in inference mode).
        count = int(images.shape[0])
        batch_size = batch_size or count
        images, labels = _pad(images, batch_size), _pad(labels, batch_size)
        x, y = _as_float(images), tf.cast(labels, tf.int32)
        batch_seed = tf.constant([int(c.seed), index], tf.int64)

        def timed(key, fn, *args):
            t0 = time.perf_counter()
            out = tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
            return out

        def cut(values):  # per-image results (batch on the last axis) without padding
            return values[..., :count]

        ok = cut(timed("clean", correct_fn, x, y))
        clean.append(ok)
        batch_worst = ok.copy()
        pgd_point = None
        for name, fn in suite.attack_fns.items():
            adv, correct, per_member = timed(name, fn, x, y,
                                             suite.seed_for(batch_seed, name))
            robust = np.logical_and(ok, cut(correct))
            attacked[name].append(robust)
            batch_worst &= robust
            for member, values in per_member.items():
                members.setdefault(member, []).append(np.logical_and(ok, cut(values)))
            if name == "pgd":
                pgd_point = adv
        worst.append(batch_worst)
        if c.curve_iterations:
            correct_at = timed("curve", curve_fn, x, y, suite.seed_for(batch_seed, "curve"))
            curve.append(np.logical_and(ok[None, :], cut(correct_at)))
        for mode, fn in mbn_fns.items():
            for gamma, (cl, rb) in mbn[mode].items():
                c_ok, r_ok = timed("mbn", fn, x, y, suite.seed_for(batch_seed, "mbn"),
                                   tf.constant(gamma, tf.float32))
                cl.append(cut(c_ok))
                rb.append(np.logical_and(cut(c_ok), cut(r_ok)))
        if c.properties:
            out = timed("properties", props_fn, x, y, suite.seed_for(batch_seed, "thickness"),
                        pgd_point if pgd_point is not None else x)
            for key, value in zip(("margin_clean", "margin_pgd", "thickness", "kl"), out):
                props[key].append(cut(value))
        for ci, name in enumerate(c.corruptions):
            for s in c.severities:
                seed = suite.seed_for(batch_seed, "corruptions", ci * 8 + int(s))
                t0 = time.perf_counter()
                corrupted = corrupt(images, name, int(s), seed)
                seconds["corruptions"] = seconds.get("corruptions", 0.0) + (
                    time.perf_counter() - t0)
                corr[(name, s)].append(cut(timed("corruptions", correct_fn,
                                                 _as_float(corrupted), y)))
        if progress:
            n = sum(len(b) for b in clean)
            progress.update(1, len(ok), postfix=(
                f"clean {np.mean(np.concatenate(clean)):.3f} worst "
                f"{np.mean(np.concatenate(worst)):.3f} ({n} img)"))

    if not clean:
        raise ValueError("the evaluation dataset is empty")
    mean = lambda parts: float(np.mean(np.concatenate(parts)))  # noqa: E731
    result = {"model": dict(metadata or {}), "num_images": int(sum(len(b) for b in clean)),
              "epsilon": float(c.epsilon), "seed": int(c.seed),
              "clean_accuracy": mean(clean)}
    if c.attacks:
        result["attacks"] = {_attack_label(name, c): {"accuracy": mean(parts)}
                             for name, parts in attacked.items()}
        result["worst_case_accuracy"] = mean(worst)
    if "autoattack" in c.attacks:
        result["autoattack"] = {
            "version": c.autoattack_version, "members": list(members),
            "member_accuracy": {k: mean(v) for k, v in members.items()}}
    if curve:
        correct = np.concatenate(curve, axis=1)
        result["iteration_curve"] = {
            "targeted": bool(c.curve_targeted),
            "epsilon": float(c.curve_epsilon or c.epsilon),
            "step_size": float(c.curve_step_size),
            "iterations": [int(n) for n in c.curve_iterations],
            "accuracy": [float(v) for v in correct.mean(axis=1)]}
    if mbn:
        result["mbn"] = {
            "attack": f"pgd{c.pgd_iterations}", "layer_fraction": c.mbn_layer_fraction,
            "modes": {mode: [{"gamma": g, "clean_accuracy": mean(cl),
                              "robust_accuracy": mean(rb)}
                             for g, (cl, rb) in points.items()]
                      for mode, points in mbn.items()}}
    if c.properties:
        result["properties"] = {
            "decision_margin_clean": mean(props["margin_clean"]),
            "boundary_thickness": mean(props["thickness"]),
            "boundary_thickness_alpha": 0.0, "boundary_thickness_beta": 0.75}
        if "pgd" in c.attacks:
            result["properties"].update({
                "decision_margin_pgd": mean(props["margin_pgd"]),
                "kl_smoothness_pgd": mean(props["kl"])})
    if c.corruptions:
        errors = {n: [1.0 - mean(corr[(n, s)]) for s in c.severities]
                  for n in c.corruptions}
        baseline = c.mce_baseline
        mce = mean_corruption_error(errors, baseline=baseline) if baseline else None
        result["corruptions"] = {
            "severities": [int(s) for s in c.severities], "errors": errors,
            "mce_unnormalized": float(np.mean([np.mean(e) for e in errors.values()])),
            "baseline": (baseline if isinstance(baseline, str) else
                         "user baseline" if baseline else None),
            "mce": None if mce is None else float(mce["mce"])}
    if shift_datasets:
        result["distribution_shift"] = {
            name: _shift_accuracy(logits_fn, ds, indices)
            for name, (ds, indices) in shift_datasets.items()}
    if model is not None and has_auxiliary_bn(model):
        records = bn_statistics(model)
        result["bn_statistics"] = {"layers": records,
                                   "summary": summarize_bn_statistics(records)}
    seconds["total"] = time.perf_counter() - started
    result["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return result


def _gammas(mode, config):
    if mode == "main":
        return (0.0,)
    if mode == "aux":
        return (1.0,)
    return tuple(float(g) for g in config.mbn_gammas)


def _mbn_fn(model, mode, config):
    def run(x, y, seed, gamma):
        f = mbn_logits_fn(model, mode, gamma, layer_fraction=config.mbn_layer_fraction,
                          seed=config.seed)
        adv = linf_attack(f, x, y, epsilon=float(config.epsilon),
                          step_size=config.pgd_step, num_iter=config.pgd_iterations,
                          seed=seed)
        return _correct(f(x), y), _correct(f(adv), y)
    return run


def _properties_fn(logits_fn, config, num_classes):
    def run(x, y, seed, pgd_point):  # pgd_point is x itself when PGD was not run
        margin_clean = decision_margin(logits_fn(x), y)
        margin_pgd = decision_margin(logits_fn(pgd_point), y)
        kl = kl_smoothness(logits_fn, x, pgd_point)
        targets = random_targets(y, num_classes, seed)
        eps = float(config.epsilon)
        endpoint = linf_attack(logits_fn, x, y, epsilon=eps, step_size=2.5 * eps / 20,
                               num_iter=20, targets=targets,
                               seed=tf.random.experimental.stateless_fold_in(seed, 1))
        thickness = boundary_thickness(logits_fn, x, endpoint, y, targets,
                                       num_points=config.thickness_points)
        return margin_clean, margin_pgd, thickness, kl
    return run


def _shift_accuracy(logits_fn, dataset, indices):
    @tf.function
    def correct(x, y):
        logits = logits_fn(tf.cast(x, tf.float32))
        if indices is not None:
            logits = class_subset_logits(logits, indices)
        return _correct(logits, y)

    parts = [correct(x, y).numpy() for x, y in dataset]
    if not parts:
        raise ValueError("a distribution-shift dataset is empty")
    values = np.concatenate(parts)
    return {"num_images": int(len(values)), "accuracy": float(values.mean())}
