"""Evaluation: clean and adversarial accuracy."""

from efficientnet_advprop.evaluation.accuracy import eval_attack_config, evaluate

__all__ = ["eval_attack_config", "evaluate"]
