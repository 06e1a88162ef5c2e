"""Per-layer running statistics of the main and auxiliary BN sets.

Xie & Yuille (2020) plot, per BN layer, the running mean and variance that clean
(main) and adversarial (auxiliary) images produce: adversarial images give larger
values, the reason one BN set cannot serve both. `bn_statistics` reads them from a
model (no data needed); `utils.plots.plot_bn_statistics` draws the scatter plots.
Backend-neutral: the robustness suite (TensorFlow) and the claims suite on either
engine read them.
"""

import numpy as np

from efficientnet_advprop.layers.split_batch_norm import AUX, MAIN, SplitBatchNorm


def split_bn_layers(model):
    """The SplitBatchNorm layers of `model` that have an auxiliary set, in call order."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, SplitBatchNorm) and layer.num_aux >= 1]


def bn_statistics(model, main_set=MAIN, aux_set=AUX):
    """One record per mixing BN layer, in call order.

    Each record: {"layer", "channels", "main_mean", "aux_mean", "main_var", "aux_var"}
    with the channel averages of the running mean and variance of each set, plus
    "aux_larger_var_fraction", the share of channels whose auxiliary variance exceeds
    the main one. Values are read in cross-replica context (mean over replicas).
    """
    records = []
    for layer in split_bn_layers(model):
        main_mean = np.asarray(layer.moving_means[main_set].value)
        aux_mean = np.asarray(layer.moving_means[aux_set].value)
        main_var = np.asarray(layer.moving_variances[main_set].value)
        aux_var = np.asarray(layer.moving_variances[aux_set].value)
        records.append({
            "layer": layer.name,
            "channels": int(main_mean.shape[0]),
            "main_mean": float(main_mean.mean()),
            "aux_mean": float(aux_mean.mean()),
            "main_var": float(main_var.mean()),
            "aux_var": float(aux_var.mean()),
            "aux_larger_var_fraction": float(np.mean(aux_var > main_var)),
        })
    return records


def summarize_bn_statistics(records):
    """Layer counts where the auxiliary set's mean |mu| and variance exceed the main's."""
    if not records:
        return {}
    n = len(records)
    return {
        "layers": n,
        "aux_larger_variance_layers": sum(r["aux_var"] > r["main_var"] for r in records),
        "aux_larger_abs_mean_layers": sum(abs(r["aux_mean"]) > abs(r["main_mean"])
                                          for r in records),
        "mean_variance_ratio_aux_over_main": float(np.mean(
            [r["aux_var"] / max(r["main_var"], 1e-12) for r in records])),
    }
