"""L-inf attacks in 0..255 pixel units.

Training attacks: the PGD family (`pgd`, `model_attack`), backend-neutral (keras.ops
and the seam): they run on the TensorFlow and the JAX engine. Evaluation attacks
(TensorFlow only): APGD-CE, APGD-DLR and APGD-T (`apgd`), MI-FGSM, CW-L-inf and the
PGD-N iteration curve (`iterative`), and the black-box Square attack (`square`); the
AutoAttack-style ensemble lives in `efficientnet_advprop.evaluation.autoattack`. The
evaluation attacks are imported when first used, so that importing this package does
not import TensorFlow.
"""

import importlib

from efficientnet_advprop.attacks.model_attack import attack_model, float32_compute, logits_fn_for
from efficientnet_advprop.attacks.pgd import (ATTACKERS, AttackConfig, advprop_num_iter, attack,
                                              eval_attack_config, linf_attack, random_targets)

_LAZY = {
    "apgd": "apgd", "apgd_targeted": "apgd", "dlr_loss": "apgd",
    "targeted_dlr_loss": "apgd", "top_k_targets": "apgd",
    "class_margin": "iterative", "cw_linf": "iterative", "mi_fgsm": "iterative",
    "pgd_curve": "iterative", "square_attack": "square",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"efficientnet_advprop.attacks.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATTACKERS", "AttackConfig", "advprop_num_iter", "apgd", "apgd_targeted", "attack",
           "attack_model", "class_margin", "cw_linf", "dlr_loss", "eval_attack_config", "float32_compute",
           "linf_attack", "logits_fn_for", "mi_fgsm", "pgd_curve", "random_targets",
           "square_attack", "targeted_dlr_loss", "top_k_targets"]
