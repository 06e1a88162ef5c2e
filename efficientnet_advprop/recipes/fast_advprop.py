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
     "shuffle BN" so that no BN batch sees the images it saw in the noisy pass (else
     the network reads labels through batch statistics):
       - one device: ghost BN. The noisy pass normalises the n_adv images in G groups
         of m (m * m <= n_adv); the adversarial pass regroups them so every new group
         takes at most one image from each old group (a random Latin arrangement).
       - several replicas: the adversarial images and labels are gathered from all
         replicas, permuted by ONE permutation drawn from the step's shared seed, and
         each replica takes its slice: every image is used exactly once.
  5. "synchronise update speed": each parameter's gradient is divided by the weighted
     number of samples that touched it (per 256 clean: shared weights 256 + 0.5 * 64 +
     0.5 * 64 = 320, main BN 256, auxiliary BN 64); returned as `sample_weights`.

Cost per drawn image (one forward+backward = 1): (1 - p) + p * (K + 1) = 1 + p * K;
`budget_factor` is that number, and main.py divides the epochs and the learning-rate
milestones by it so the run costs what vanilla training does (105 -> 88 epochs).

Only an untargeted attack is valid (the reused gradient must be the training loss).
Moving statistics of the auxiliary BN are updated by the adversarial pass only (the
noisy images are not adversarial yet); the main BN's by the clean pass.
"""

import math

import tensorflow as tf

from efficientnet_advprop.attacks import AttackConfig
from efficientnet_advprop.attacks.pgd import PIXEL_MAX, PIXEL_MIN
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import (SHARED, Recipe, RecipeGradients, as_context,
                                               batch_metrics)


def ghost_group_size(num_adv, requested=None):
    """Ghost-BN group size m for the one-device shuffle BN: m divides num_adv and
    m * m <= num_adv (so a regrouping with at most one image per old group exists).
    Default: the largest such m."""
    if requested:
        m = int(requested)
        if num_adv % m or m * m > num_adv:
            raise ValueError(
                f"shuffle-BN group size {m} must divide the {num_adv} adversarial images "
                f"per replica and satisfy size^2 <= {num_adv}")
        return m
    best = 1
    for m in range(1, int(math.isqrt(num_adv)) + 1):
        if num_adv % m == 0:
            best = m
    return best


def _argsort_uniform(shape, seed):
    """Random permutations along the last axis (XLA-friendly)."""
    return tf.argsort(tf.random.stateless_uniform(shape, seed=seed), axis=-1)


def regroup_permutation(num, group_size, seed):
    """perm [num]: the adversarial pass's j-th image is perm[j]. Images i and i' share a
    noisy-pass group when i // m == i' // m; after the permutation, consecutive groups
    of m hold at most one image of each noisy-pass group (needs m * m <= num)."""
    m = int(group_size)
    groups = num // m
    seed = tf.cast(seed, tf.int64)
    ranks = _argsort_uniform([groups, m], tf.random.experimental.stateless_fold_in(seed, 0))
    g = tf.range(groups)[:, None]
    p = tf.range(m)[None, :]
    block = (g - p) % groups  # new group g, slot p <- old group (g - p) mod G
    slot = tf.broadcast_to(p, [groups, m])
    image = block * m + tf.gather_nd(ranks, tf.stack([block, slot], axis=-1))
    order = _argsort_uniform([groups], tf.random.experimental.stateless_fold_in(seed, 1))
    return tf.reshape(tf.gather(image, order), [num])


def shared_permutation(num, seed):
    """One random permutation of range(num), equal on every replica for a shared seed."""
    return _argsort_uniform([num], seed)


class FastAdvProp(Recipe):
    name = "fast_advprop"
    num_aux = 1
    attack_bn_set = AUX
    exchanges_across_replicas = True

    def __init__(self, num_classes, attack=None, label_smoothing=0.1, adv_fraction=0.2,
                 beta=0.5, shuffle_bn_group_size=None, mixup_alpha=0.0, cutmix_alpha=0.0,
                 sync_update_speed=True):
        super().__init__(num_classes, label_smoothing)
        self.attack = attack or AttackConfig(attacker="pgd", epsilon=1.0, step_size=1.0,
                                             num_iter=1)
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
        self.adv_fraction = float(adv_fraction)
        self.beta = float(beta)
        self.shuffle_bn_group_size = shuffle_bn_group_size
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.sync_update_speed = bool(sync_update_speed)

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
        group = (num_adv if replicas > 1
                 else ghost_group_size(num_adv, self.shuffle_bn_group_size))
        noisy_groups = num_adv // group
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
        x_adv, adv_labels = self.shuffle(x_adv, adv_labels, num_adv, group, ctx)
        grads2, loss2, adv_metrics = ctx.compile(adversarial_pass)(x_adv, adv_labels)
        metrics.update(adv_metrics)
        grads = [a if b is None else (b if a is None else a + b)
                 for a, b in zip(grads1, grads2)]
        return RecipeGradients(grads=grads, loss_sum=loss1 + loss2, metrics=metrics,
                               sample_weights=self.sample_weights(num_clean, num_adv))

    def shuffle(self, x_adv, adv_labels, num_adv, group, ctx):
        """Shuffle BN: regroup (one device) or exchange (several replicas)."""
        if ctx.num_replicas > 1:
            replica = tf.distribute.get_replica_context()
            everyone = replica.all_gather(x_adv, axis=0)
            everyone_labels = replica.all_gather(adv_labels, axis=0)
            perm = shared_permutation(num_adv * ctx.num_replicas, ctx.fold(5, shared=True))
            start = tf.cast(replica.replica_id_in_sync_group, tf.int32) * num_adv
            mine = tf.slice(perm, [start], [num_adv])
            return tf.gather(everyone, mine), tf.gather(everyone_labels, mine)
        perm = regroup_permutation(num_adv, group, ctx.fold(4))
        return tf.gather(x_adv, perm), tf.gather(adv_labels, perm)

    def describe(self):
        a = self.attack
        return (f"fast_advprop (p_adv {self.adv_fraction:g}, {a.attacker} eps "
                f"{a.epsilon:g} K={self.steps}, beta {self.beta:g}, budget x"
                f"{self.budget_factor:.2f})")
