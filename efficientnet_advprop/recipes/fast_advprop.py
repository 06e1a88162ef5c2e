"""Fast AdvProp (Mei et al., "Fast AdvProp", ICLR 2022).

AdvProp at (almost) the cost of vanilla training. Each replica's batch of D drawn
images is split: the first D - n_adv are the clean share (main BN), the last
n_adv = round(p_adv * D) the adversarial share (auxiliary BN); the reference draws 320
per 256 clean, p_adv = 0.2. Then:

  1. clean pass: the clean share through the main BN, CE summed, weight 1 (Mixup or
     CutMix, when enabled, are applied to this share only).
  2. noisy pass, *in the same forward*: x_noisy = x2 + U(-eps, eps) (clipped to the
     pixel range) through the auxiliary BN with batch statistics, untargeted CE on the
     true label, weight beta = 0.5. ONE backward of the sum gives the parameter
     gradient (kept: it is training signal) and the input gradient g (gradient reuse).
  3. x_adv = x2 + clip(delta + step * sign(g), -eps, eps), clipped to [0, 255];
     K > 1 adds K - 1 ordinary PGD steps through the auxiliary BN (batch statistics,
     frozen moving statistics, the noisy pass's grouping).
  4. adversarial pass: x_adv through the auxiliary BN, weight beta = 0.5, after
     "shuffle BN": the adversarial images are shuffled with ONE random permutation
     across BN batches, so no BN batch normalises the group it was attacked in
     (else the network reads labels through batch statistics). BN batches keep the
     reference's size, 16 adversarial images (its per-GPU share):
       - one device: ghost BN in groups of `shuffle_bn_group_size` (16); the noisy
         pass normalises consecutive groups, the adversarial pass the same group
         sizes after a random permutation of all n_adv images. At least two groups
         are required: with one group the permutation changes no BN batch.
       - several replicas: every replica's n_adv images form its BN batch; the
         adversarial images and labels are gathered from all replicas, permuted by
         ONE permutation drawn from the step's shared seed, and each replica takes
         its slice: every image is used exactly once.
  5. "synchronise update speed": each parameter's gradient is divided by the weighted
     number of samples that touched it (per 256 clean: shared weights 256 + 0.5 * 64 +
     0.5 * 64 = 320, main BN 256, auxiliary BN 64); returned as `sample_weights`.

Cost per drawn image (one forward+backward = 1): (1 - p) + p * (K + 1) = 1 + p * K;
`budget_factor` is that number, and the config divides the epochs and the learning-
rate milestones by it so the run costs what vanilla training does (105 -> 88 epochs).

Attack step: with eps != 1 the step is max(step, eps / K), the reference attacker's
rule (K = 1 then steps by eps, FGSM's size from the random start); eps = 1 keeps 1.

Only an untargeted attack is valid (the reused gradient must be the training loss).
Moving statistics of the auxiliary BN are updated by the adversarial pass only (the
noisy images are not adversarial yet); the main BN's by the clean pass.
"""

import dataclasses

import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig
from efficientnet_advprop.attacks.pgd import PIXEL_MAX, PIXEL_MIN
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import (SHARED, Cite, Option, Recipe, RecipeGradients,
                                               as_context, batch_metrics)


def ghost_groups(num_adv, group_size, num_replicas=1):
    """Ghost-BN groups of the noisy pass on one replica: num_adv // group_size groups.

    One device needs at least two groups (the shuffle must change BN batches); several
    replicas normalise each replica's num_adv images together (the group is the
    replica's share) and exchange images instead. Raises ValueError otherwise.
    """
    if num_replicas > 1:
        return 1
    m = int(group_size)
    if num_adv % m:
        raise ValueError(f"the {num_adv} adversarial images per replica are not a "
                         f"multiple of the shuffle-BN group size {m}")
    if num_adv // m < 2:
        raise ValueError(f"shuffle BN on one device needs at least two ghost-BN groups "
                         f"of {m}, and there are {num_adv} adversarial images")
    return num_adv // m


def _argsort_uniform(shape, seed):
    """Random permutations along the last axis (XLA-friendly)."""
    return tf.argsort(tf.random.stateless_uniform(shape, seed=seed), axis=-1)


def shared_permutation(num, seed):
    """One random permutation of range(num), equal on every replica for a shared seed."""
    return _argsort_uniform([num], seed)


REFERENCE = "meijieru/fast_advprop"
PAPER = "Mei et al. 2022"


class FastAdvProp(Recipe):
    name = "fast_advprop"
    title = "Fast AdvProp (Mei et al., ICLR 2022)"
    num_aux = 1
    attack_bn_set = AUX
    exchanges_across_replicas = True
    calibrates_budget = True
    # The reference trains ResNet-50 with the torchvision recipe.
    paper = {
        "optimizer": Cite("momentum", f"{PAPER}, training setup: SGD, momentum 0.9"),
        "momentum": Cite(0.9, f"{PAPER}, training setup"),
        "nesterov": Cite(False, f"{REFERENCE} (torch.optim.SGD default)"),
        "base_learning_rate": Cite(0.1, f"{PAPER}, training setup: lr 0.1 per 256 clean images"),
        "weight_decay": Cite(1e-4, f"{PAPER}, training setup"),
        "lr_schedule": Cite("step", f"{PAPER}, training setup: step decay"),
        "lr_milestones": Cite((30 / 105, 60 / 105, 90 / 105, 100 / 105),
                              f"{PAPER}, training setup: epochs 30/60/90/100 of 105"),
        "lr_decay_factor": Cite(0.1, f"{PAPER}, training setup"),
        "lr_warmup_epochs": Cite(0.0, f"{REFERENCE}: no warm-up"),
        "train_epochs": Cite(105.0, f"{PAPER}, training setup: 105 epochs (/ 1.2 by the budget "
                                    "calibration -> 88)"),
        "train_batch_size": Cite(320, f"{PAPER}, method: 320 drawn = 256 clean + 64 "
                                      "adversarial"),
        "label_smoothing": Cite(0.0, f"{REFERENCE}: label smoothing off by default"),
        "moving_average_decay": Cite(0.0, f"{REFERENCE}: no weight EMA"),
        "batch_norm_momentum": Cite(0.9, f"{REFERENCE}: PyTorch BN momentum 0.1"),
        "batch_norm_epsilon": Cite(1e-5, f"{REFERENCE}: PyTorch BN eps 1e-5"),
        "epsilon": Cite(1.0, f"{PAPER}, training setup: eps 1"),
        "attack_iterations": Cite(1, f"{PAPER}, training setup: K = 1"),
        "attack_step_size": Cite(1.0, f"{PAPER}, training setup: step 1"),
    }
    options = (
        Option("p_adv", Cite(0.2, f"{PAPER}, method: p_adv 0.2"), "Share of each drawn batch "
               "used adversarially; train_batch_size counts drawn images.", 0.0, 1.0,
               low_open=True, high_open=True, arg="adv_fraction"),
        Option("fast_advprop_beta", Cite(0.5, f"{PAPER}, method: beta 0.5"), "Weight of the "
               "noisy and of the adversarial pass.", 0.0, None, low_open=True, arg="beta"),
        Option("shuffle_bn_group_size", Cite(16, f"{REFERENCE}: 16 adversarial images per "
                                                 "GPU"), "One device: images per ghost-BN "
               "group of the adversarial share (at least two groups).", 1, None),
        Option("budget_calibration", Cite(True, f"{PAPER}, budget: epochs and milestones "
                                                "/ (1 + p_adv K)"), "Divide the epochs and "
               "the learning-rate milestones by 1 + p_adv * K (vanilla's cost)."),
        Option("sync_update_speed", Cite(True, f"{PAPER}, method"), "Divide each parameter's "
               "gradient by the weighted samples that touched it."),
        Option("mixup_alpha", Cite(0.0, f"{PAPER}: off unless combined"), "Mixup alpha "
               "on the clean share (0 = off).", 0.0, None),
        Option("cutmix_alpha", Cite(0.0, f"{PAPER}: off unless combined"), "CutMix "
               "alpha on the clean share (0 = off).", 0.0, None),
    )

    def __init__(self, num_classes, attack=None, label_smoothing=0.0, adv_fraction=0.2,
                 beta=0.5, shuffle_bn_group_size=16, mixup_alpha=0.0, cutmix_alpha=0.0,
                 sync_update_speed=True, budget_calibration=True):
        super().__init__(num_classes, label_smoothing)
        attack = attack or AttackConfig(attacker="pgd", epsilon=1.0, step_size=1.0,
                                        num_iter=1)
        if attack.epsilon != 1.0:  # the reference attacker's step rule
            attack = dataclasses.replace(
                attack, step_size=max(attack.step_size, attack.epsilon / attack.iterations))
        self.attack = attack
        if self.attack.targeted:
            raise ValueError("fast_advprop reuses the training gradient, so its attack "
                             "must be untargeted")
        if self.attack.attacker not in ("pgd", "fgsm"):
            raise ValueError(f"fast_advprop supports the pgd (random start) and fgsm "
                             f"attackers, got {self.attack.attacker}")
        if not 0.0 < adv_fraction < 1.0:
            raise ValueError(f"adversarial fraction p_adv must be in (0, 1), got "
                             f"{adv_fraction}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup and cutmix alphas must be >= 0")
        if int(shuffle_bn_group_size) < 1:
            raise ValueError(f"shuffle-BN group size must be >= 1, got "
                             f"{shuffle_bn_group_size}")
        self.adv_fraction = float(adv_fraction)
        self.beta = float(beta)
        self.shuffle_bn_group_size = int(shuffle_bn_group_size)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.sync_update_speed = bool(sync_update_speed)
        self.budget_calibration = bool(budget_calibration)
        self.calibrates_budget = self.budget_calibration

    # --------------------------------------------------------------- accounting
    @property
    def steps(self):
        return self.attack.iterations

    @property
    def budget_factor(self):
        """Cost of one drawn image relative to vanilla: 1 + p_adv * K."""
        return 1.0 + self.adv_fraction * self.steps

    def passes_per_image(self):
        return self.budget_factor

    def lr_batch_size(self, global_batch):
        """The reference's learning rate is per 256 *clean* images."""
        clean, _ = self.split(global_batch)
        return clean

    def bn_batches(self, local_batch, num_replicas=1):
        clean, num_adv = self.split(local_batch)
        group = num_adv // ghost_groups(num_adv, self.shuffle_bn_group_size, num_replicas)
        return {"clean share, main BN": clean, "adversarial BN group": group}

    def smallest_local_batch(self, min_bn_batch, num_replicas=1, start=1):
        """The smallest replica batch >= start whose adversarial share is a whole
        number of groups of max(min_bn_batch, group size) (two on one device)."""
        group = max(int(min_bn_batch), self.shuffle_bn_group_size if num_replicas == 1
                    else 1)
        for num_adv in range(group * (2 if num_replicas == 1 else 1), 4096 * group, group):
            batch = int(round(num_adv / self.adv_fraction))
            if batch < start:
                continue
            try:
                if min(self.bn_batches(batch, num_replicas).values()) >= min_bn_batch:
                    return batch
            except ValueError:
                continue
        return None

    def split(self, batch):
        """(clean, adversarial) images per replica for a local batch of `batch`."""
        num_adv = int(round(self.adv_fraction * batch))
        if num_adv < 1 or num_adv >= batch:
            raise ValueError(
                f"fast_advprop: p_adv={self.adv_fraction} of a {batch}-image replica "
                f"batch leaves {num_adv} adversarial and {batch - num_adv} clean images; "
                "both must be >= 1")
        return batch - num_adv, num_adv

    def sample_weights(self, num_clean, num_adv):
        """Weighted samples per parameter group (Fast AdvProp's update-speed sync)."""
        adv = 2.0 * self.beta * num_adv  # the noisy pass and the adversarial pass
        if not self.sync_update_speed:  # plain normalisation by the drawn batch
            return None
        return {SHARED: num_clean + adv, MAIN: float(num_clean), AUX: adv}

    # ------------------------------------------------------------------ the step
    def _mix(self, clean, labels, seed):
        if not (self.mixup_alpha or self.cutmix_alpha):
            return clean, labels
        from efficientnet_advprop.data.mixing import mix_batch

        return mix_batch(clean, labels, self.num_classes, mixup_alpha=self.mixup_alpha,
                         cutmix_alpha=self.cutmix_alpha, seed=seed)

    def gradients(self, model, variables, images, labels, ctx):
        ctx = as_context(ctx)
        images, labels = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)
        batch = images.shape[0]
        num_clean, num_adv = self.split(batch)
        replicas = ctx.num_replicas
        noisy_groups = ghost_groups(num_adv, self.shuffle_bn_group_size, replicas)
        eps = float(self.attack.epsilon)
        step = eps if self.attack.attacker == "fgsm" else float(self.attack.step_size)

        clean, clean_labels = self._mix(images[:num_clean], labels[:num_clean], ctx.fold(3))
        x2 = tf.cast(images[num_clean:], tf.float32)
        adv_labels = tf.cast(labels[num_clean:], tf.int32)

        def noisy_pass(clean, clean_labels, x2, adv_labels):
            """Steps 1-3: one forward of [clean; noisy], one backward for both."""
            if self.attack.attacker == "fgsm":
                noise = tf.zeros_like(x2)
            else:
                noise = tf.random.stateless_uniform(tf.shape(x2), seed=ctx.fold(0),
                                                    minval=-eps, maxval=eps)
            x_noisy = tf.clip_by_value(x2 + noise, PIXEL_MIN, PIXEL_MAX)
            with tf.GradientTape() as tape:
                tape.watch(x_noisy)
                joint = tf.concat([tf.cast(clean, tf.float32), x_noisy], axis=0)
                with bn_route([MAIN, AUX], [num_clean, num_adv], update_stats=(True, False),
                              groups=(1, noisy_groups)):
                    logits = model(joint, training=True)
                clean_loss = self.loss(clean_labels, logits[:num_clean])
                noisy_loss = self.loss(adv_labels, logits[num_clean:])
                loss = tf.reduce_sum(clean_loss) + self.beta * tf.reduce_sum(noisy_loss)
            grads = tape.gradient(loss, list(variables) + [x_noisy])
            param_grads, g = grads[:-1], grads[-1]
            x_adv = x2 + tf.clip_by_value(x_noisy - x2 + step * tf.sign(g), -eps, eps)
            x_adv = tf.clip_by_value(x_adv, PIXEL_MIN, PIXEL_MAX)
            for _ in range(self.steps - 1):  # PGD-K: the remaining K - 1 steps
                with tf.GradientTape() as attack_tape:
                    attack_tape.watch(x_adv)
                    with bn_route(AUX, update_stats=False, groups=noisy_groups):
                        attack_logits = model(x_adv, training=True)
                    attack_loss = tf.reduce_sum(self.loss(adv_labels, attack_logits))
                g = attack_tape.gradient(attack_loss, x_adv)
                x_adv = x2 + tf.clip_by_value(x_adv - x2 + step * tf.sign(g), -eps, eps)
                x_adv = tf.clip_by_value(x_adv, PIXEL_MIN, PIXEL_MAX)
            metrics = batch_metrics("clean", clean_labels, logits[:num_clean], clean_loss)
            metrics.update(batch_metrics("noisy", adv_labels, logits[num_clean:], noisy_loss))
            return param_grads, loss, tf.stop_gradient(x_adv), metrics

        def adversarial_pass(x_adv, adv_labels):
            """Step 4 on images already regrouped (or exchanged) for shuffle BN."""
            groups = 1 if replicas > 1 else noisy_groups
            with tf.GradientTape() as tape:
                with bn_route(AUX, groups=groups):
                    logits = model(x_adv, training=True)
                adv_loss = self.loss(adv_labels, logits)
                loss = self.beta * tf.reduce_sum(adv_loss)
            grads = tape.gradient(loss, list(variables))
            return grads, loss, batch_metrics("adversarial", adv_labels, logits, adv_loss)

        grads1, loss1, x_adv, metrics = ctx.compile(noisy_pass)(
            clean, clean_labels, x2, adv_labels)
        x_adv, adv_labels = self.shuffle(x_adv, adv_labels, num_adv, ctx)
        grads2, loss2, adv_metrics = ctx.compile(adversarial_pass)(x_adv, adv_labels)
        metrics.update(adv_metrics)
        grads = [a if b is None else (b if a is None else a + b)
                 for a, b in zip(grads1, grads2)]
        return RecipeGradients(grads=grads, loss_sum=loss1 + loss2, metrics=metrics,
                               sample_weights=self.sample_weights(num_clean, num_adv))

    def shuffle(self, x_adv, adv_labels, num_adv, ctx):
        """Shuffle BN: one random permutation of the adversarial images, within the
        replica (one device: its ghost-BN groups then hold other images) or across
        all replicas (each takes its slice)."""
        if ctx.num_replicas > 1:
            replica = tf.distribute.get_replica_context()
            everyone = replica.all_gather(x_adv, axis=0)
            everyone_labels = replica.all_gather(adv_labels, axis=0)
            perm = shared_permutation(num_adv * ctx.num_replicas, ctx.fold(5, shared=True))
            start = tf.cast(replica.replica_id_in_sync_group, tf.int32) * num_adv
            mine = tf.slice(perm, [start], [num_adv])
            return tf.gather(everyone, mine), tf.gather(everyone_labels, mine)
        perm = shared_permutation(num_adv, ctx.fold(4))
        return tf.gather(x_adv, perm), tf.gather(adv_labels, perm)

    def describe(self):
        a = self.attack
        return (f"fast_advprop (p_adv {self.adv_fraction:g}, {a.attacker} eps "
                f"{a.epsilon:g} step {a.step_size:g} K={self.steps}, beta {self.beta:g}, "
                f"shuffle-BN groups of {self.shuffle_bn_group_size} on one device, budget "
                f"x{self.budget_factor:.2f}{'' if self.budget_calibration else ' (not calibrated)'})")
