"""Evaluation: clean and adversarial accuracy, and the robustness suite.

`evaluate` measures clean and PGD accuracy during training runs; `evaluate_robustness`
is the full suite behind `main.py --mode=eval_robustness` (strong attacks, the
iteration curve, MBN modes, model properties, corruptions, distribution shift, BN
statistics) and `write_report` turns its result into robustness.json/.md and plots.
"""

from efficientnet_advprop.evaluation.accuracy import eval_attack_config, evaluate, main_logits_fn
from efficientnet_advprop.evaluation.autoattack import AutoAttackResult, autoattack
from efficientnet_advprop.layers.bn_statistics import bn_statistics
from efficientnet_advprop.evaluation.distribution_shift import (class_subset_logits,
                                                                mean_corruption_error)
from efficientnet_advprop.evaluation.mbn import MBN_MODES, mbn_logits_fn
from efficientnet_advprop.evaluation.properties import (boundary_thickness,
                                                        decision_margin, kl_smoothness)
from efficientnet_advprop.evaluation.report import write_report
from efficientnet_advprop.evaluation.robustness import (ATTACK_NAMES, RobustnessConfig,
                                                        evaluate_robustness)

__all__ = ["ATTACK_NAMES", "AutoAttackResult", "MBN_MODES", "RobustnessConfig", "autoattack",
           "bn_statistics", "boundary_thickness", "class_subset_logits", "decision_margin",
           "eval_attack_config", "evaluate", "evaluate_robustness", "kl_smoothness",
           "main_logits_fn", "mbn_logits_fn", "mean_corruption_error", "write_report"]
