"""robustness.json, robustness.md and PNG plots from a robustness-suite result dict.

The plots use matplotlib's non-interactive Agg backend (no display needed):

  attack_iterations.png   accuracy vs PGD iterations (log axis), Xie & Yuille's curve
  mbn_frontier.png        clean vs robust accuracy over the MBN gamma sweep, per mode
  bn_statistics.png       per-layer running mean and variance, main vs auxiliary BN
  corruptions.png         error vs severity for each corruption (line style: noise,
                          blur, weather, digital)
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from efficientnet_advprop.data.corruptions import BLUR, DIGITAL, NOISE, WEATHER  # noqa: E402
from efficientnet_advprop.utils.plots import plot_bn_statistics  # noqa: E402


def _pct(value):
    return "n/a" if value is None else f"{100.0 * value:.2f}"


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=False)


def markdown_report(result):
    """The result as Markdown tables (accuracies in %)."""
    lines = [f"# Robustness report: {result.get('model', {}).get('name', 'model')}", ""]
    model = result.get("model", {})
    if model:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in model.items()]
        lines.append("")
    lines += [f"{result['num_images']} images, L-inf epsilon {result['epsilon']:g} (0..255 "
              f"units), seed {result['seed']}, {result['seconds']['total']:.0f} s.", ""]
    lines += ["## Accuracy under attack", "", "| attack | accuracy (%) |", "|---|---|",
              f"| clean | {_pct(result['clean_accuracy'])} |"]
    for name, entry in result.get("attacks", {}).items():
        lines.append(f"| {name} | {_pct(entry['accuracy'])} |")
    worst = result.get("worst_case_accuracy")
    if worst is not None:
        lines.append(f"| **worst case over all attacks (per image)** | **{_pct(worst)}** |")
    lines.append("")
    aa = result.get("autoattack")
    if aa:
        lines += [f"AutoAttack ({aa['version']}): members {', '.join(aa['members'])}; "
                  "each member alone: " + ", ".join(
                      f"{k} {_pct(v)}" for k, v in aa["member_accuracy"].items()) + ".", ""]
    curve = result.get("iteration_curve")
    if curve:
        kind = "targeted" if curve["targeted"] else "untargeted"
        lines += [f"## Accuracy vs PGD iterations ({kind}, eps {curve['epsilon']:g}, step "
                  f"{curve['step_size']:g}, random start)", "",
                  "| iterations | " + " | ".join(str(n) for n in curve["iterations"]) + " |",
                  "|---" * (len(curve["iterations"]) + 1) + "|",
                  "| accuracy (%) | " + " | ".join(_pct(a) for a in curve["accuracy"]) + " |",
                  ""]
    mbn = result.get("mbn")
    if mbn:
        lines += [f"## MBN inference modes (robust: {mbn['attack']})", "",
                  "| mode | gamma | clean (%) | robust (%) |", "|---|---|---|---|"]
        for mode, points in mbn["modes"].items():
            for p in points:
                lines.append(f"| {mode} | {p['gamma']:g} | {_pct(p['clean_accuracy'])} | "
                             f"{_pct(p['robust_accuracy'])} |")
        lines.append("")
    props = result.get("properties")
    if props:
        lines += ["## Model properties (mean over images)", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in props.items() if isinstance(v, float)]
        lines.append("")
    corr = result.get("corruptions")
    if corr:
        sev = corr["severities"]
        lines += ["## Common corruptions (error %)", "",
                  "| corruption | " + " | ".join(f"s{s}" for s in sev) + " | mean |",
                  "|---" * (len(sev) + 2) + "|"]
        for name, errors in corr["errors"].items():
            lines.append(f"| {name} | " + " | ".join(_pct(e) for e in errors)
                         + f" | {_pct(sum(errors) / len(errors))} |")
        lines.append("")
        lines.append(f"Mean corruption error (unnormalised): "
                     f"{_pct(corr['mce_unnormalized'])}%.")
        if corr.get("mce") is not None:
            lines.append(f"mCE normalised by {corr['baseline']}: {corr['mce']:.2f}.")
        lines.append("")
    shifts = result.get("distribution_shift")
    if shifts:
        lines += ["## Distribution shift", "", "| dataset | images | accuracy (%) |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['num_images']} | {_pct(v['accuracy'])} |"
                  for k, v in shifts.items()]
        lines.append("")
    bn = result.get("bn_statistics")
    if bn and bn.get("summary"):
        s = bn["summary"]
        lines += ["## BN statistics (main vs auxiliary)", "",
                  f"The auxiliary set has the larger running variance in "
                  f"{s['aux_larger_variance_layers']} of {s['layers']} layers and the larger "
                  f"|mean| in {s['aux_larger_abs_mean_layers']}; mean variance ratio aux/main "
                  f"{s['mean_variance_ratio_aux_over_main']:.3f}.", ""]
    plots = result.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plot_iteration_curve(curve, path, clean_accuracy=None):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["iterations"], [100 * a for a in curve["accuracy"]], "o-",
            label="under attack")
    if clean_accuracy is not None:
        ax.axhline(100 * clean_accuracy, color="k", linestyle="--", linewidth=0.8,
                   label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("PGD iterations")
    ax.set_ylabel("accuracy on the true label (%)")
    kind = "targeted" if curve["targeted"] else "untargeted"
    ax.set_title(f"{kind} PGD, eps {curve['epsilon']:g}, step {curve['step_size']:g}")
    ax.set_ylim(0, 100 * max([clean_accuracy or 0.0] + curve["accuracy"]) + 5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_mbn_frontier(mbn, path):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for mode, points in mbn["modes"].items():
        xs = [100 * p["clean_accuracy"] for p in points]
        ys = [100 * p["robust_accuracy"] for p in points]
        if len(points) == 1:  # main / aux alone: a marker on top of the sweeps' ends
            ax.plot(xs, ys, "*" if mode == "main" else "X", markersize=13, zorder=5,
                    label=f"{mode} BN alone", markeredgecolor="k")
            continue
        ax.plot(xs, ys, "o-", label=mode, markersize=4)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p['gamma']:g}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%), {mbn['attack']}")
    ax.set_title("MBN accuracy-robustness frontier (labels: gamma)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_corruptions(corr, path, clean_accuracy=None):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = plt.get_cmap("tab20").colors
    style = {name: line for group, line in ((NOISE, "-"), (BLUR, "--"), (WEATHER, ":"),
                                            (DIGITAL, "-.")) for name in group}
    for i, (name, errors) in enumerate(corr["errors"].items()):
        ax.plot(corr["severities"], [100 * e for e in errors], marker=".", linewidth=1.2,
                color=colours[i % len(colours)], linestyle=style.get(name, "-"), label=name)
    if clean_accuracy is not None:
        ax.axhline(100 * (1 - clean_accuracy), color="k", linewidth=0.8, label="clean")
    ax.set_xlabel("severity")
    ax.set_ylabel("error (%)")
    ax.set_xticks(corr["severities"])
    ax.set_title("Common corruptions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result, eval_dir):
    """Writes the plots, robustness.json and robustness.md into `eval_dir`; returns
    the list of written paths."""
    os.makedirs(eval_dir, exist_ok=True)
    plots = []
    if result.get("iteration_curve"):
        plots.append("attack_iterations.png")
        plot_iteration_curve(result["iteration_curve"], os.path.join(eval_dir, plots[-1]),
                             result.get("clean_accuracy"))
    if result.get("mbn"):
        plots.append("mbn_frontier.png")
        plot_mbn_frontier(result["mbn"], os.path.join(eval_dir, plots[-1]))
    if result.get("bn_statistics", {}).get("layers"):
        plots.append("bn_statistics.png")
        plot_bn_statistics(result["bn_statistics"]["layers"],
                           os.path.join(eval_dir, plots[-1]))
    if result.get("corruptions"):
        plots.append("corruptions.png")
        plot_corruptions(result["corruptions"], os.path.join(eval_dir, plots[-1]),
                         result.get("clean_accuracy"))
    result = dict(result, plots=plots)
    write_json(result, os.path.join(eval_dir, "robustness.json"))
    with open(os.path.join(eval_dir, "robustness.md"), "w") as f:
        f.write(markdown_report(result))
    return [os.path.join(eval_dir, name) for name in
            ("robustness.json", "robustness.md", *plots)]
