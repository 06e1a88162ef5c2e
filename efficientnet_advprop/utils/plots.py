"""Plots shared by the robustness report (TensorFlow) and the claims report (either
engine); matplotlib's non-interactive Agg backend, no engine imported."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_bn_statistics(records, path):
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, title in ((axes[0], "mean", "running mean"),
                           (axes[1], "var", "running variance")):
        main = [r[f"main_{key}"] for r in records]
        aux = [r[f"aux_{key}"] for r in records]
        ax.scatter(main, aux, s=12, c=range(len(records)), cmap="viridis")
        lo, hi = min(main + aux), max(main + aux)
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="aux = main")
        ax.set_xlabel(f"main BN {title} (channel mean)")
        ax.set_ylabel(f"auxiliary BN {title}")
        ax.set_title(f"{title} per layer (colour: depth)")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
