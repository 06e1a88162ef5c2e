"""Training attacks: the L-inf PGD family in 0..255 pixel units."""

from efficientnet_advprop.attacks.model_attack import attack_model, float32_compute, logits_fn_for
from efficientnet_advprop.attacks.pgd import (ATTACKERS, AttackConfig, advprop_num_iter, attack,
                                              linf_attack, random_targets)

__all__ = ["ATTACKERS", "AttackConfig", "advprop_num_iter", "attack", "attack_model",
           "float32_compute", "linf_attack", "logits_fn_for", "random_targets"]
