"""One run of the claims suite on the JAX engine, for machines without TensorFlow.

The same contract and result file as `runner.run_one` (so `report` reads both): train
(or resume) with `jax_experiment` on the TF-free input path, the held-out curve at
every checkpoint, then the run's evaluations on the held-out images, all jitted:

- clean accuracy through the main BNs and through the adversarial BN set;
- PGD-10 (the evaluation attack of `attacks.pgd.eval_attack_config`) through either;
- the BN statistics of the two sets (`layers.bn_statistics`);
- the MBN logit interpolation sweep (1 - g) z_main + g z_aux, clean and PGD.

Data: the "split" tiers read the CIFAR-10 tarball itself (`data_dir` is the .tar.gz;
`data.numpy_input`'s "cifar_tar" source selects the suite's 45,000 / 5,000 split with
the same rule as the TFRecord split `claims.ensure_split` writes); the smoke tier the
embedded set. Not measured here: the corruption errors (`data/corruptions.py` is
TensorFlow-only): the result holds `corruption_errors` and `mean_corruption_error` as
null with `corruptions_not_measured` saying why, and the report marks them "not
measured".
The random draws (attack starts, targets) are jax.random's, so a run matches the TF
engine's in distribution, not bitwise.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import keras
import numpy as np

from efficientnet_advprop import config as config_lib
from efficientnet_advprop import jax_experiment, seam
from efficientnet_advprop.attacks.pgd import attack as run_attack
from efficientnet_advprop.attacks.pgd import eval_attack_config
from efficientnet_advprop.claims import split_description, suite
from efficientnet_advprop.claims.runner_common import (add_curve_point,
                                                       corruptions_not_measured,
                                                       finish_run, git_revision, host,
                                                       read_curve)
from efficientnet_advprop.data import numpy_input
from efficientnet_advprop.data.cifar_tar import names_digest
from efficientnet_advprop.layers.bn_statistics import bn_statistics, summarize_bn_statistics
from efficientnet_advprop.layers.split_batch_norm import MAIN, bn_route

_EVAL_TAG = 0xC1A1


def machine():
    """What the run ran on."""
    return dict(host(), engine="jax", jax=jax.__version__, keras=keras.__version__,
                gpus=[d.device_kind for d in jax.local_devices() if d.platform != "cpu"],
                devices=[f"{d.platform}:{d.device_kind}" for d in jax.local_devices()])


def held_out_arrays(run, count):
    images, labels, have = [], [], 0
    for x, y in run.eval_batches():
        images.append(x)
        labels.append(y)
        have += len(y)
        if have >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def split_record(tarball):
    """split.json's fields (the rule, the counts, each list's digest) of the split that
    `numpy_input` reads from the tarball, as the TF runner records the TFRecord one."""
    _, train, evals = numpy_input.cifar_split(tarball)
    return {"description": split_description(), "num_train": len(train),
            "num_held_out": len(evals), "train_sha256": names_digest(train),
            "held_out_sha256": names_digest(evals), "source": tarball,
            "reader": "data.numpy_input cifar_tar"}


class Evaluator:
    """Jitted counts over held-out arrays for one model (values passed per call).

    Every call sees batches of one shape (the last, partial one padded and masked), so
    each evaluation kind compiles once, whatever the number of images it is given."""

    def __init__(self, model, num_classes, batch):
        self.model = model
        self.variables = list(model.variables)
        self.num_classes = num_classes
        self.batch = int(batch)

    def values(self):
        return [v.value for v in self.variables]

    def _logits(self, images, bn_set, gamma, aux_set):
        if gamma is None:
            with bn_route(bn_set):
                return self.model(images, training=False)
        with bn_route(MAIN):
            main = self.model(images, training=False)
        with bn_route(aux_set):
            aux = self.model(images, training=False)
        return (1.0 - gamma) * main + gamma * aux

    @functools.lru_cache(maxsize=None)
    def _fn(self, bn_set, attack, mbn_aux_set):
        def correct(labels, logits, mask):
            predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return jnp.sum(jnp.where(predictions == labels, mask, 0.0))

        def count(values, images, labels, mask, seed, gamma):
            with keras.StatelessScope(state_mapping=list(zip(self.variables, values))):
                g = gamma if mbn_aux_set is not None else None

                def logits_fn(x):
                    return self._logits(x, bn_set, g, mbn_aux_set)

                clean = correct(labels, logits_fn(images), mask)
                robust = jnp.float32(0.0)
                if attack is not None:
                    adv = run_attack(logits_fn, images, labels, attack,
                                     num_classes=self.num_classes, seed=seed)
                    robust = correct(labels, logits_fn(adv), mask)
            return clean, robust

        return jax.jit(count)

    def accuracy(self, images, labels, *, bn_set=MAIN, attack=None, seed=0,
                 mbn_aux_set=None, gamma=0.0):
        """(clean accuracy, adversarial accuracy or None)."""
        if not len(labels):
            raise ValueError("no held-out images to evaluate")
        fn = self._fn(bn_set, attack, mbn_aux_set)
        values = self.values()
        clean = robust = jnp.float32(0.0)
        for index, start in enumerate(range(0, len(labels), self.batch)):
            x, y, mask = numpy_input.pad_batch(
                np.asarray(images[start:start + self.batch], np.float32),
                np.asarray(labels[start:start + self.batch], np.int32), self.batch)
            step_seed = seam.fold_in(seam.make_seed(seed, index), _EVAL_TAG)
            c, r = fn(values, x, y, mask, step_seed, jnp.float32(gamma))
            clean, robust = clean + c, robust + r  # summed on the device: no sync
        n = float(len(labels))
        return float(clean) / n, (float(robust) / n if attack is not None else None)


def run_one(tier, spec, seed, *, data_dir, work_dir, results_dir, command, log=print):
    """Trains (or resumes) and evaluates one run on the JAX engine; writes and returns
    its result dict (the schema of `runner.run_one`)."""
    model_dir = os.path.join(work_dir, tier.name, f"{spec.name}-seed{seed}")
    overrides = suite.tier_overrides(tier, spec, seed, data_dir, model_dir)
    if overrides.get("nf_stage_gains") == suite.FIT_ON_TRAINING_BATCH:
        raise config_lib.ConfigError("runs", spec.name, "its stage gains are fitted on "
                                     "the TFRecord split: run this control on the "
                                     "TensorFlow engine")
    info = numpy_input.resolve_dataset(overrides.get("dataset"), overrides.get("data_dir"))
    cfg = config_lib.resolve(overrides, info)
    start_wall = time.time()
    info_machine = machine()
    revision = git_revision()
    run = jax_experiment.prepare(cfg, info=info, log=log, input_path="numpy")
    batch = cfg.data.eval_batch_size
    need = max(tier.curve_images, tier.eval_images, tier.attack_images, tier.mbn_images)
    images, labels = held_out_arrays(run, need)
    model = run.trainer.model
    # one batch shape for every evaluation: the configured size, or all of the
    # images when they are fewer (the smoke tier), padded where a count falls short
    evaluator = Evaluator(model, cfg.num_classes, min(batch, len(labels)))

    curve = read_curve(model_dir)
    steps_per_epoch = cfg.optim.steps_per_epoch

    def on_checkpoint(trainer):
        trainer.sync_to_model()  # the current weights, as the TF runner reads them
        acc = evaluator.accuracy(images[:tier.curve_images], labels[:tier.curve_images])[0]
        add_curve_point(model_dir, curve, trainer.step, steps_per_epoch, acc)
        log(f"{spec.name} seed {seed}: step {trainer.step} held-out clean {acc:.4f}")

    start_train = time.time()
    jax_experiment.train(run, on_checkpoint=on_checkpoint)
    train_seconds = time.time() - start_train
    run.trainer.sync_to_model()  # the tiers keep no EMA: the trained weights
    results = {"step": int(run.trainer.step), "curve": curve}
    ev = images[:tier.eval_images], labels[:tier.eval_images]
    at = images[:tier.attack_images], labels[:tier.attack_images]
    aux_set = run.recipe.attack_bn_set
    attack = eval_attack_config(spec.eval_epsilon, tier.eval_iterations)
    results["clean_accuracy"] = evaluator.accuracy(*ev)[0]
    if "aux" in spec.evals:
        results["aux_clean_accuracy"] = evaluator.accuracy(*ev, bn_set=aux_set)[0]
    if "pgd" in spec.evals:
        results["pgd_accuracy"] = evaluator.accuracy(*at, attack=attack, seed=seed)[1]
        if "aux" in spec.evals:
            results["aux_pgd_accuracy"] = evaluator.accuracy(
                *at, bn_set=aux_set, attack=attack, seed=seed)[1]
    if "corruptions" in spec.evals:  # the keys of runner's schema, null, and why
        results.update(corruptions_not_measured())
    if "bn_stats" in spec.evals:
        records = bn_statistics(model, MAIN, aux_set)
        results["bn_statistics"] = records
        results["bn_statistics_summary"] = summarize_bn_statistics(records)
    if "mbn" in spec.evals:
        rows = []
        for g in tier.mbn_gammas:
            clean, robust = evaluator.accuracy(
                images[:tier.mbn_images], labels[:tier.mbn_images], attack=attack,
                seed=seed, mbn_aux_set=aux_set, gamma=float(g))
            rows.append({"gamma": float(g), "clean_accuracy": clean, "pgd_accuracy": robust})
        results["mbn_sweep"] = rows
    return finish_run(tier, spec, seed, engine="jax", run=run, cfg=cfg,
                      overrides=overrides, data_dir=data_dir,
                      split=split_record(data_dir) if run.info.name == "cifar_tar" else None,
                      machine=info_machine, command=command, revision=revision,
                      train_seconds=train_seconds, start_wall=start_wall, results=results,
                      results_dir=results_dir)
