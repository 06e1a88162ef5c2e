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
     The pass runs in training mode and updates the auxiliary BN's moving statistics,
     as the reference's attack does ("--attack_in_train": `model.train()` before the
     attack iterations, meijieru/fast_advprop imagenet.py).
  3. x_adv = x2 + clip(delta + step * sign(g), -eps, eps), clipped to [0, 255]. With
     K > 1 attack steps every step is such a pass through the auxiliary BN whose
     parameter gradient is kept with weight beta (the reference's "--reuse_mid_grad":
     each attack iteration is a forward-backward over the shared and auxiliary
     parameters, counted with weight 0.5).
  4. adversarial pass: x_adv through the auxiliary BN, weight beta = 0.5, after
     "shuffle BN": the paper's "batch statistics for the images with random noise and
     the adversarial images come from different subsets".
  5. "synchronise update speed": each parameter's gradient is divided by the weighted
     number of samples that touched it (per 256 clean, K = 1: shared weights 256 +
     0.5 * 64 + 0.5 * 64 = 320, main BN 256, auxiliary BN 64; each further attack step
     adds 0.5 * 64 to the shared and auxiliary counts); returned as `sample_weights`.

BN batches, as the reference's GPUs hold them. The reference (scripts/run_fastadvprop.sh)
trains on 4 GPUs: 320 drawn images, per GPU 64 clean and 16 adversarial, each GPU's BN
normalising its own share. Here the adversarial share of every replica is cut into
ghost-BN groups of `shuffle_bn_group_size` (16) images, and the clean share into as
many equal groups: one device holding 320 drawn images normalises like the reference's
4 GPUs (4 groups of 64 clean, 4 of 16 adversarial). Across replicas the groups of all
replicas together play the GPUs' part.

Shuffle BN (`derangement_mix`): the adversarial images of all groups (gathered from
every replica when there are several) are permuted so that *no image returns to its
own group* and every new group takes its images as evenly as possible from the other
groups; each replica then takes its slice. The reference draws a plain random
permutation (torch.randperm), which leaves each GPU about 1/G of its own images; the
paper's sentence asks for different subsets, and this permutation gives it with none.
It needs at least 3 groups in all: with 2, moving every image out of its group only
swaps the two groups, and each adversarial BN batch would be a noisy-pass BN batch
again (one device therefore needs 48 adversarial images, a drawn batch of 240).

Cost per drawn image (one forward+backward = 1): (1 - p) + p * (K + 1) = 1 + p * K;
`budget_factor` is that number, and the config divides the epochs and the learning-
rate milestones by it so the run costs what vanilla training does (105 -> 88 epochs).

Attack step: with eps != 1 the step is max(step, eps / K), the reference attacker's
rule (K = 1 then steps by eps, FGSM's size from the random start); eps = 1 keeps 1.

Only an untargeted attack is valid (the reused gradient must be the training loss).
"""

import dataclasses

from keras import ops

from efficientnet_advprop import seam
from efficientnet_advprop.attacks import AttackConfig
from efficientnet_advprop.attacks.pgd import PIXEL_MAX, PIXEL_MIN
from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, bn_route
from efficientnet_advprop.recipes.base import (SHARED, Cite, Option, Recipe, RecipeGradients,
                                               as_context, batch_metrics)


MIN_SHUFFLE_GROUPS = 3


def ghost_groups(num_adv, group_size, num_replicas=1):
    """Ghost-BN groups of one replica's adversarial share: num_adv // group_size.

    The shuffle needs at least MIN_SHUFFLE_GROUPS groups over all replicas (with two,
    a permutation that moves every image out of its group only swaps the groups).
    Raises ValueError otherwise.
    """
    m = int(group_size)
    if num_adv % m:
        raise ValueError(f"the {num_adv} adversarial images per replica are not a "
                         f"multiple of the shuffle-BN group size {m}")
    groups = num_adv // m
    if groups * num_replicas < MIN_SHUFFLE_GROUPS:
        raise ValueError(
            f"shuffle BN needs at least {MIN_SHUFFLE_GROUPS} BN groups of {m} adversarial "
            f"images over all replicas, and {num_replicas} replica(s) x {num_adv} images "
            f"give {groups * num_replicas}")
    return groups


def _argsort_uniform(shape, seed):
    """Random permutations along the last axis (XLA-friendly)."""
    return ops.argsort(seam.uniform(shape, seed), axis=-1)


def derangement_mix(num_groups, group_size, seed):
    """The shuffle-BN permutation: `perm` with new[k] = old[perm[k]] for
    num_groups * group_size images in consecutive groups, such that no image lands
    in its own group and every new group draws its images from the other groups as
    evenly as possible (counts differ by at most one).

    Image i of old group g (in a random order within the group) goes to group
    (g + 1 + i mod (G - 1)) mod G under a random relabelling of the groups; each
    group then receives exactly group_size images. Needs G >= 2 (G >= 3 for the
    groups to change: see `ghost_groups`). Stateless, the same for the same seed.
    """
    g_count, m = int(num_groups), int(group_size)
    if g_count < 2:
        raise ValueError(f"a derangement needs at least 2 groups, got {g_count}")
    fold = seam.fold_in
    # A random rank of every image inside its group, and a random relabelling of groups.
    order = _argsort_uniform([g_count, m], fold(seed, 0))
    rank = ops.reshape(ops.argsort(order, axis=-1), [-1])
    relabel = _argsort_uniform([g_count], fold(seed, 1))
    unlabel = ops.argsort(relabel)
    group = ops.repeat(ops.arange(g_count, dtype="int32"), m)
    target = ops.take(unlabel, (ops.take(relabel, group, axis=0) + 1 + rank % (g_count - 1))
                      % g_count, axis=0)
    ties = seam.uniform([g_count * m], fold(seed, 2))
    return ops.argsort(ops.cast(target, "float32") + ties)


def _static_like(x, like):
    """`x` with the (fully known) static shape of `like`, which it has at run time."""
    shape = tuple(like.shape)
    if any(d is None for d in shape):
        return x
    return ops.reshape(x, shape)


def _add(a, b):
    """Elementwise sum of two gradient lists (None where a variable got none)."""
    return [y if x is None else (x if y is None else x + y) for x, y in zip(a, b)]


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
        "weight_decay": Cite(1e-4, f"{REFERENCE} imagenet.py: --weight-decay 1e-4"),
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
                                                 "GPU (64 over 4 GPUs)"), "Adversarial "
               "images per ghost-BN group (at least three groups over all replicas).", 1,
               None),
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
        groups = self.groups(local_batch, num_replicas)
        return {"clean share, main BN": clean // groups,
                "adversarial BN group": num_adv // groups}

    def groups(self, local_batch, num_replicas=1):
        """BN groups per replica: the adversarial share in groups of the shuffle-BN
        size, the clean share in as many equal groups (ValueError when it does not
        divide)."""
        clean, num_adv = self.split(local_batch)
        groups = ghost_groups(num_adv, self.shuffle_bn_group_size, num_replicas)
        if clean % groups:
            raise ValueError(f"the {clean} clean images per replica do not split into the "
                             f"{groups} BN groups of the adversarial share")
        return groups

    def smallest_local_batch(self, min_bn_batch, num_replicas=1, start=1):
        """The smallest replica batch >= start whose BN groups are whole and hold at
        least min_bn_batch images, with at least three groups over all replicas."""
        for groups in range(1, 4096):
            num_adv = groups * self.shuffle_bn_group_size
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
        """Weighted samples per parameter group (Fast AdvProp's update-speed sync): the
        K attack passes and the adversarial pass each count beta * num_adv."""
        adv = (self.steps + 1) * self.beta * num_adv
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
        images, labels = ops.convert_to_tensor(images), ops.convert_to_tensor(labels)
        batch = images.shape[0]
        num_clean, num_adv = self.split(batch)
        groups = self.groups(batch, ctx.num_replicas)
        eps = float(self.attack.epsilon)
        step = eps if self.attack.attacker == "fgsm" else float(self.attack.step_size)
        variables = list(variables)

        clean, clean_labels = self._mix(images[:num_clean], labels[:num_clean], ctx.fold(3))
        x2 = ops.cast(images[num_clean:], "float32")
        adv_labels = ops.cast(labels[num_clean:], "int32")

        def noisy_pass(clean, clean_labels, x2, adv_labels):
            """Steps 1-3: K forward-backward passes; the first also carries the clean
            share. Each backward gives the parameter gradient (kept) and the input
            gradient (the attack step)."""
            if self.attack.attacker == "fgsm":
                x = x2
            else:
                noise = seam.uniform(ops.shape(x2), ctx.fold(0), -eps, eps)
                x = ops.clip(x2 + noise, PIXEL_MIN, PIXEL_MAX)

            def first_pass(x):
                joint = ops.concatenate([ops.cast(clean, "float32"), x], axis=0)
                with bn_route([MAIN, AUX], [num_clean, num_adv], groups=groups):
                    logits = model(joint, training=True)
                clean_loss = self.loss(clean_labels, logits[:num_clean])
                noisy_logits = logits[num_clean:]
                noisy_loss = self.loss(adv_labels, noisy_logits)
                loss = ops.sum(clean_loss) + self.beta * ops.sum(noisy_loss)
                metrics = batch_metrics("clean", clean_labels, logits[:num_clean],
                                        clean_loss)
                metrics.update(batch_metrics("noisy", adv_labels, noisy_logits, noisy_loss))
                return loss, metrics

            def later_pass(x):
                with bn_route(AUX, groups=groups):
                    logits = model(x, training=True)
                return self.beta * ops.sum(self.loss(adv_labels, logits)), {}

            param_grads, total, metrics = None, 0.0, {}
            for k in range(self.steps):
                # One backward: the parameter gradient and the input gradient together.
                loss, aux, grads, (g,) = seam.value_and_grad(
                    first_pass if k == 0 else later_pass, variables, (x,))
                if k == 0:
                    metrics = aux
                param_grads = grads if param_grads is None else _add(param_grads, grads)
                total += loss
                x = x2 + ops.clip(x - x2 + step * ops.sign(g), -eps, eps)
                x = ops.stop_gradient(ops.clip(x, PIXEL_MIN, PIXEL_MAX))
            return param_grads, total, x, metrics

        def adversarial_pass(x_adv, adv_labels):
            """Step 4 on images already shuffled across BN groups."""
            def adversarial_loss():
                with bn_route(AUX, groups=groups):
                    logits = model(x_adv, training=True)
                adv_loss = self.loss(adv_labels, logits)
                return (self.beta * ops.sum(adv_loss),
                        batch_metrics("adversarial", adv_labels, logits, adv_loss))

            loss, metrics, grads, _ = seam.value_and_grad(adversarial_loss, variables)
            return grads, loss, metrics

        grads1, loss1, x_adv, metrics = ctx.compile(noisy_pass)(
            clean, clean_labels, x2, adv_labels)
        x_adv, adv_labels = self.shuffle(x_adv, adv_labels, groups, ctx)
        grads2, loss2, adv_metrics = ctx.compile(adversarial_pass)(x_adv, adv_labels)
        metrics.update(adv_metrics)
        return RecipeGradients(grads=_add(grads1, grads2), loss_sum=loss1 + loss2,
                               metrics=metrics,
                               sample_weights=self.sample_weights(num_clean, num_adv))

    def shuffle(self, x_adv, adv_labels, groups, ctx):
        """Shuffle BN: `derangement_mix` over the BN groups of every replica (gathered
        when there are several, one permutation from the step's shared seed, each
        replica takes its slice)."""
        num_adv = x_adv.shape[0]
        size = num_adv // groups
        if ctx.num_replicas > 1:
            _, replica_id = seam.replica_position()
            everyone = seam.all_gather(x_adv)
            everyone_labels = seam.all_gather(adv_labels)
            perm = derangement_mix(groups * ctx.num_replicas, size,
                                   ctx.fold(5, shared=True))
            start = ops.cast(replica_id, "int32") * num_adv
            mine = ops.slice(perm, [start], [num_adv])
            # all_gather forgets the static image shape that ghost BN reshapes by.
            return (_static_like(ops.take(everyone, mine, axis=0), x_adv),
                    _static_like(ops.take(everyone_labels, mine, axis=0), adv_labels))
        perm = derangement_mix(groups, size, ctx.fold(4))
        return ops.take(x_adv, perm, axis=0), ops.take(adv_labels, perm, axis=0)

    def describe(self):
        a = self.attack
        return (f"fast_advprop (p_adv {self.adv_fraction:g}, {a.attacker} eps "
                f"{a.epsilon:g} step {a.step_size:g} K={self.steps}, beta {self.beta:g}, "
                f"BN groups of {self.shuffle_bn_group_size} adversarial images, shuffled "
                f"by a derangement, budget "
                f"x{self.budget_factor:.2f}{'' if self.budget_calibration else ' (not calibrated)'})")
