"""L-inf attacks in 0..255 pixel units.

Training attacks: the PGD family (`pgd`, `model_attack`). Evaluation attacks: APGD-CE,
APGD-DLR and APGD-T (`apgd`), MI-FGSM, CW-L-inf and the PGD-N iteration curve
(`iterative`), and the black-box Square attack (`square`). The AutoAttack-style
ensemble lives in `efficientnet_advprop.evaluation.autoattack`.
"""

from efficientnet_advprop.attacks.apgd import (apgd, apgd_targeted, dlr_loss, targeted_dlr_loss,
                                               top_k_targets)
from efficientnet_advprop.attacks.iterative import class_margin, cw_linf, mi_fgsm, pgd_curve
from efficientnet_advprop.attacks.model_attack import attack_model, float32_compute, logits_fn_for
from efficientnet_advprop.attacks.pgd import (ATTACKERS, AttackConfig, advprop_num_iter, attack,
                                              linf_attack, random_targets)
from efficientnet_advprop.attacks.square import square_attack

__all__ = ["ATTACKERS", "AttackConfig", "advprop_num_iter", "apgd", "apgd_targeted", "attack",
           "attack_model", "class_margin", "cw_linf", "dlr_loss", "float32_compute",
           "linf_attack", "logits_fn_for", "mi_fgsm", "pgd_curve", "random_targets",
           "square_attack", "targeted_dlr_loss", "top_k_targets"]
