"""Verdicts, tables and plots from the claims suite's result files.

Each claim is tested on the per-seed values of its runs. A comparison "a > b" *holds*
when mean(a) - sd(a) > mean(b) + sd(b) (the one-standard-deviation bars do not
overlap), *does not hold* when the bars do not overlap the other way, and is
*inconclusive* otherwise. With one seed there are no bars: the verdict then follows the
sign and says "(1 seed)". sd is the sample standard deviation over seeds.
"""

import glob
import json
import os

import numpy as np

HOLDS, FAILS, INCONCLUSIVE, MISSING = "holds", "does not hold", "inconclusive", "not run"
NOT_MEASURED = "not measured"
CORRUPTIONS_NOT_MEASURED = f"{NOT_MEASURED} (corruptions are TensorFlow-only)"


def load_results(results_dir, tier):
    """{run name: [result dicts, by seed]} of one tier."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(results_dir, tier, "*", "seed*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs.setdefault(record["run"], []).append(record)
    for records in runs.values():
        records.sort(key=lambda r: r["seed"])
    return runs


def values(runs, run, key):
    """Per-seed values of results[key] (a fraction) of `run`, or [] when not run
    (null values, the measurements an engine does not make, are left out)."""
    return [r["results"][key] for r in runs.get(run, [])
            if r["results"].get(key) is not None]


def corruptions_not_measured(runs, run):
    """Whether `run` has result files but none with corruption errors, because their
    engine does not measure them (the JAX engine's `corruptions_not_measured`)."""
    records = runs.get(run, [])
    return (bool(records) and not values(runs, run, "mean_corruption_error")
            and any(r["results"].get("corruptions_not_measured") for r in records))


def corruption_row(runs, run, test):
    """The row 'mean corruption error of `run` < vanilla's'."""
    c, v = values(runs, run, "mean_corruption_error"), values(runs, "vanilla",
                                                              "mean_corruption_error")
    verdict = greater(v, c)
    if verdict == MISSING and any(corruptions_not_measured(runs, name)
                                  for name in (run, "vanilla")):
        verdict = CORRUPTIONS_NOT_MEASURED
    return (test, f"{fmt(c)} vs {fmt(v)}", verdict)


def stats(xs):
    xs = np.asarray(xs, dtype=float)
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return float(np.mean(xs)), sd


def fmt(xs, scale=100.0, unit=""):
    """'mean ± sd (n)' in percent by default."""
    if not len(xs):
        return "–"
    mean, sd = stats(xs)
    return f"{scale * mean:.1f} ± {scale * sd:.1f}{unit} (n={len(xs)})"


def greater(a, b):
    """Verdict of 'a > b' from per-seed values (see the module docstring)."""
    if not len(a) or not len(b):
        return MISSING
    (ma, sa), (mb, sb) = stats(a), stats(b)
    if min(len(a), len(b)) < 2:
        return (HOLDS if ma > mb else FAILS) + " (1 seed)"
    if ma - sa > mb + sb:
        return HOLDS
    if mb - sb > ma + sa:
        return FAILS
    return INCONCLUSIVE


def combine(*verdicts):
    """One verdict of several required parts: missing if any is, else the weakest."""
    for v in (MISSING, NOT_MEASURED, FAILS, INCONCLUSIVE):
        if any(x.startswith(v) for x in verdicts):
            worst = [x for x in verdicts if x.startswith(v)][0]
            return worst
    return verdicts[0] if verdicts else MISSING


# --------------------------------------------------------------- the checks
def check_disentangled_bn(runs):
    a, b = values(runs, "advprop_eps4", "clean_accuracy"), values(runs, "sat_eps4", "clean_accuracy")
    return [("AdvProp main-BN clean > shared-BN AT clean (eps 4)",
             f"{fmt(a)} vs {fmt(b)}", greater(a, b))]


def check_aux_bn_worse(runs):
    rows = []
    for run in ("advprop_eps1", "advprop_eps4"):
        main, aux = values(runs, run, "clean_accuracy"), values(runs, run, "aux_clean_accuracy")
        rows.append((f"{run}: main-BN clean > aux-BN clean", f"{fmt(main)} vs {fmt(aux)}",
                     greater(main, aux)))
    return rows


def check_advprop_vs_vanilla(runs):
    a, v = values(runs, "advprop_eps1", "clean_accuracy"), values(runs, "vanilla", "clean_accuracy")
    return [("AdvProp (PGD-1 eps 1) clean > vanilla clean", f"{fmt(a)} vs {fmt(v)}",
             greater(a, v)),
            corruption_row(runs, "advprop_eps1", "AdvProp mean corruption error < vanilla's")]


def check_fast_advprop_cost(runs):
    f, v = values(runs, "fast_advprop", "clean_accuracy"), values(runs, "vanilla", "clean_accuracy")
    verdict = greater(f, v)
    if verdict.startswith(FAILS) and len(f) > 1:
        verdict = FAILS
    elif verdict == INCONCLUSIVE:
        verdict = INCONCLUSIVE + " (within the error bars of vanilla)"
    per_epoch = cost_ratio(runs, "fast_advprop", "vanilla")
    whole = cost_ratio(runs, "fast_advprop", "vanilla", per_epoch=False)
    cost = ("– (no two runs on the same processor yet)" if per_epoch is None else
            f"{per_epoch:.2f}x per epoch ({whole:.2f}x for the whole calibrated run)")
    return [("Fast AdvProp clean >= vanilla clean at 1x budget",
             f"{fmt(f)} vs {fmt(v)}", verdict),
            corruption_row(runs, "fast_advprop", "Fast AdvProp mean corruption error < "
                           "vanilla's"),
            ("Fast AdvProp cost per epoch within 1.3x of vanilla's (the paper's cost model "
             "says 1.2x; fastest seed of each)", cost,
             MISSING if per_epoch is None else (HOLDS if per_epoch <= 1.3 else FAILS))]


def whole_runs(records):
    """The records that trained from step 0 in one process: a run resumed after an
    interruption timed only its own part."""
    return [r for r in records if not r.get("start_step")]


def whole_train_seconds(records):
    return [r["train_seconds"] for r in whole_runs(records)]


def epoch_seconds(record):
    """Training seconds per epoch of the tier's training images (Fast AdvProp's
    calibrated budget trains fewer epochs than vanilla, so whole-run times differ from
    the per-epoch cost that the paper's cost model gives)."""
    return record["train_seconds"] * record["steps_per_epoch"] / record["train_steps"]


def cost_ratio(runs, run, baseline, per_epoch=True):
    """Training seconds (per epoch, or of the whole run) of `run` over `baseline`'s
    (same tier), each the fastest of its seeds trained in one go: on a shared machine
    other work only ever adds time, so the minimum is the estimate least disturbed by it.
    Only runs on the same processor are compared (a later session may run on another
    CPU): the processor of the latest of `run`'s seeds that `baseline` also ran on."""
    cost = epoch_seconds if per_epoch else (lambda r: r["train_seconds"])
    mine, theirs = whole_runs(runs.get(run, [])), whole_runs(runs.get(baseline, []))
    common = [cpu for cpu in dict.fromkeys(_cpu(r) for r in reversed(mine))
              if cpu in {_cpu(r) for r in theirs}]
    if not common:
        return None
    a = [cost(r) for r in mine if _cpu(r) == common[0]]
    b = [cost(r) for r in theirs if _cpu(r) == common[0]]
    return float(min(a) / min(b))


def _cpu(record):
    return (record.get("machine") or {}).get("cpu")


def check_bn_statistics(runs):
    rows = []
    fractions = [r["results"]["bn_statistics_summary"]["aux_larger_variance_layers"]
                 / r["results"]["bn_statistics_summary"]["layers"]
                 for r in runs.get("advprop_eps4", [])
                 if r["results"].get("bn_statistics_summary")]
    if fractions:
        verdict = HOLDS if min(fractions) > 0.5 else (FAILS if max(fractions) <= 0.5
                                                      else INCONCLUSIVE)
        if len(fractions) < 2:
            verdict += " (1 seed)"
        text = " / ".join(f"{100 * f:.0f}%" for f in fractions) + " of BN layers" + (
            " (one figure per seed)" if len(fractions) > 1 else "")
    else:
        verdict, text = MISSING, "–"
    rows.append(("aux-BN running variance > main's in most layers (advprop_eps4)", text,
                 verdict))
    sweeps = [r["results"]["mbn_sweep"] for r in runs.get("advprop_eps4", [])
              if r["results"].get("mbn_sweep")]
    if sweeps:
        gammas = [row["gamma"] for row in sweeps[0]]
        clean = np.mean([[row["clean_accuracy"] for row in s] for s in sweeps], axis=0)
        robust = np.mean([[row["pgd_accuracy"] for row in s] for s in sweeps], axis=0)
        # Every seed's own sweep must be monotone, not only their mean.
        monotone = all(
            np.all(np.diff([row["clean_accuracy"] for row in s]) <= 0)
            and np.all(np.diff([row["pgd_accuracy"] for row in s]) >= 0) for s in sweeps)
        verdict = HOLDS if monotone else FAILS
        if len(sweeps) < 2:
            verdict += " (1 seed)"
        text = "; ".join(f"g={g:g}: {100 * c:.1f}/{100 * r:.1f}"
                         for g, c, r in zip(gammas, clean, robust))
        rows.append(("MBN logit interpolation: clean falls, PGD accuracy rises with gamma "
                     "in every seed (clean/PGD-10 eps 4, mean over seeds)", text, verdict))
    else:
        rows.append(("MBN logit interpolation monotone", "–", MISSING))
    return rows


def check_nofrost(runs):
    nc, bc = values(runs, "nofrost_eps8", "clean_accuracy"), values(runs, "bn_sat_eps8", "clean_accuracy")
    nr, br = values(runs, "nofrost_eps8", "pgd_accuracy"), values(runs, "bn_sat_eps8", "pgd_accuracy")
    comparable = MISSING
    if nr and br:
        gap = stats(br)[0] - stats(nr)[0]
        comparable = HOLDS if gap <= 0.02 else FAILS
        if min(len(nr), len(br)) < 2:
            comparable += " (1 seed)"
    return [("NF-ResNet + SAT clean > BN-ResNet + SAT(BN) clean (eps 8)",
             f"{fmt(nc)} vs {fmt(bc)}", greater(nc, bc)),
            ("... at comparable PGD-10 robustness (NF at most 2 points lower)",
             f"{fmt(nr)} vs {fmt(br)}", comparable)]


# A curve has flattened when its last quarter of training gained less than this much
# held-out accuracy (mean over seeds). A claim compared on curves that still climb
# holds at that budget only.
FLAT_GAIN = 0.01


def late_gain(record):
    """Held-out clean accuracy gained over the last quarter of a run's training (from
    its last curve point at or before 3/4 of the run to its final point), or None
    when the curve has no such pair of points."""
    curve = record["results"].get("curve") or []
    if len(curve) < 2:
        return None
    end = curve[-1]
    earlier = [p for p in curve[:-1] if p["epoch"] <= 0.75 * end["epoch"]]
    if not earlier:
        return None
    return end["clean_accuracy"] - earlier[-1]["clean_accuracy"]


def mean_late_gain(runs, run):
    gains = [g for g in (late_gain(r) for r in runs.get(run, [])) if g is not None]
    return float(np.mean(gains)) if gains else None


def flattening_note(runs, run="nofrost_eps8"):
    """One line: whether `run`'s held-out curve had flattened when training ended."""
    gain = mean_late_gain(runs, run)
    if gain is None:
        return None
    if gain < FLAT_GAIN:
        return (f"`{run}`'s held-out curve has flattened: its last quarter of training "
                f"gained {100 * gain:+.1f} points (under {100 * FLAT_GAIN:g}).")
    return (f"`{run}`'s held-out curve has **not** flattened: its last quarter of "
            f"training gained {100 * gain:+.1f} points ({100 * FLAT_GAIN:g} or more), so "
            f"the comparison holds at this budget only.")


CHECKS = {
    "disentangled_bn": check_disentangled_bn,
    "aux_bn_worse": check_aux_bn_worse,
    "advprop_vs_vanilla": check_advprop_vs_vanilla,
    "fast_advprop_cost": check_fast_advprop_cost,
    "bn_statistics": check_bn_statistics,
    "nofrost": check_nofrost,
}


def verdicts(runs):
    """[(claim, [(test, ours, verdict)], overall verdict)] for every claim."""
    from efficientnet_advprop.claims.suite import CLAIMS

    out = []
    for claim in CLAIMS:
        rows = CHECKS[claim.key](runs)
        out.append((claim, rows, combine(*[v for _, _, v in rows])))
    return out


# ------------------------------------------------------------------ output
def runs_table(runs):
    lines = ["| run | model | seeds | clean (main BN) | clean (adv. BN) | PGD-10 (main BN) "
             "| PGD-10 (adv. BN) | mean corruption error | last-quarter gain | train s "
             "| train img/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, records in runs.items():
        eps = records[0]["eval_epsilon"]
        pgd = values(runs, name, "pgd_accuracy")
        lines.append(
            f"| {label(name)} | {records[0]['model_name']} x{records[0]['width_multiplier']:g} | "
            f"{len(records)} | {fmt(values(runs, name, 'clean_accuracy'))} | "
            f"{fmt(values(runs, name, 'aux_clean_accuracy'))} | "
            f"{fmt(pgd) + f' @ eps {eps:g}' if pgd else '–'} | "
            f"{fmt(values(runs, name, 'aux_pgd_accuracy'))} | "
            f"{corruption_cell(runs, name)} | {gain_cell(mean_late_gain(runs, name))} | "
            f"{mean_or_dash(whole_train_seconds(records))} | "
            f"{np.mean([r['train_images_per_second'] or 0 for r in records]):.0f} |")
    return "\n".join(lines)


def gain_cell(gain):
    return "–" if gain is None else f"{100 * gain:+.1f}"


def corruption_cell(runs, name):
    if corruptions_not_measured(runs, name):
        return NOT_MEASURED
    return fmt(values(runs, name, "mean_corruption_error"))


def label(name):
    """The run's name, marked when no claim reads it (suite.DIAGNOSTICS)."""
    from efficientnet_advprop.claims import suite

    claim_runs = {run for claim in suite.CLAIMS for run in claim.runs}
    return name if name in claim_runs else f"{name} (control)"


def mean_or_dash(xs):
    return f"{np.mean(xs):.0f}" if xs else "–"


def claims_table(results):
    lines = ["| claim | paper | test | ours (mean ± sd over seeds) | verdict |",
             "|---|---|---|---|---|"]
    for claim, rows, _ in results:
        for i, (test, ours, verdict) in enumerate(rows):
            first = i == 0
            lines.append(f"| {claim.title if first else ''} | {claim.paper if first else ''} "
                         f"| {test} | {ours} | **{verdict}** |")
    return "\n".join(lines)


def plot_curves(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20")  # more runs than the default cycle's 10 colours
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, (name, records) in enumerate(runs.items()):
        curves = [r["results"].get("curve") or [] for r in records]
        if not curves[0]:
            continue
        length = min(len(c) for c in curves)
        epochs = [p["epoch"] for p in curves[0][:length]]
        accs = np.mean([[p["clean_accuracy"] for p in c[:length]] for c in curves], axis=0)
        ax.plot(epochs, 100 * accs, marker="o", color=colors(index % 20),
                linestyle="-" if label(name) == name else "--", label=label(name))
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out clean accuracy, main BN (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, eps in zip(axes, (4.0, 8.0)):
        for name, records in runs.items():
            if records[0]["eval_epsilon"] != eps:
                continue
            clean = values(runs, name, "clean_accuracy")
            pgd = values(runs, name, "pgd_accuracy")
            if clean and pgd:
                ax.scatter(100 * np.mean(pgd), 100 * np.mean(clean), label=name)
            aux_c, aux_p = (values(runs, name, "aux_clean_accuracy"),
                            values(runs, name, "aux_pgd_accuracy"))
            if aux_c and aux_p:
                ax.scatter(100 * np.mean(aux_p), 100 * np.mean(aux_c), marker="x",
                           label=f"{name} (adv. BN)")
            sweeps = [r["results"].get("mbn_sweep") for r in records
                      if r["results"].get("mbn_sweep")]
            if sweeps:
                c = np.mean([[row["clean_accuracy"] for row in s] for s in sweeps], 0)
                p = np.mean([[row["pgd_accuracy"] for row in s] for s in sweeps], 0)
                ax.plot(100 * p, 100 * c, "--", marker=".", label=f"{name} MBN gamma 0..1")
        ax.set_xlabel(f"PGD-10 eps {eps:g} accuracy (%)")
        ax.set_ylabel("clean accuracy (%)")
        ax.set_title(f"clean vs robust, eps {eps:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START, README_END = "<!-- CLAIMS_START -->", "<!-- CLAIMS_END -->"


def readme_block(results_dir, tiers=("cpu", "gpu", "gpu_wide")):
    """The claims and runs tables of each tier that has results, for the top-level
    README (between README_START and README_END)."""
    parts = []
    for tier in tiers:
        runs = load_results(results_dir, tier)
        if runs:
            parts += [f"Tier `{tier}` (generated from `results/claims/{tier}/`):", "",
                      claims_table(verdicts(runs)), "", runs_table(runs), ""]
    return "\n".join(parts).strip()


def update_readme(path, block):
    """Replaces what stands between the README's claims markers with `block`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {README_START} ... {README_END} markers")
    text = (text[:start + len(README_START)] + "\n" + block + "\n" + text[end:])
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def engine_note(runs):
    """The engines of a tier's result files (files before the JAX runner: TensorFlow)."""
    engines = sorted({r.get("engine", "tensorflow") for rs in runs.values() for r in rs})
    note = ", ".join(engines)
    if "jax" in engines:
        note += " (the JAX engine does not measure the corruption errors)"
    return note


def write_report(results_dir, tiers=("cpu", "gpu", "gpu_wide", "smoke"),
                 out_name="README.md", header=""):
    """Writes results_dir/README.md (and each tier's plots); returns its text."""
    from efficientnet_advprop.utils.plots import plot_bn_statistics

    parts = [header.strip(), ""] if header else []
    for tier in tiers:
        runs = load_results(results_dir, tier)
        if not runs:
            continue
        tier_dir = os.path.join(results_dir, tier)
        results = verdicts(runs)
        parts += [f"## Tier `{tier}`", "", "### Claims", "", claims_table(results), ""]
        note = flattening_note(runs)
        if note:
            parts += [note, ""]
        parts += ["### Runs", "", runs_table(runs), "",
                  f"Last-quarter gain: held-out clean accuracy gained over the last "
                  f"quarter of training, in points (mean over seeds); under "
                  f"{100 * FLAT_GAIN:g}, the curve has flattened.", ""]
        first = next(iter(runs.values()))[0]
        split = first["data"].get("split") or {}
        parts.append(f"Data: {split.get('description', first['data']['dataset'])} "
                     f"({first['data']['num_train']} train / {first['data']['num_held_out']}"
                     f" held-out); git "
                     f"{sorted({r['git_revision'] for rs in runs.values() for r in rs})}; "
                     f"machine: {first['machine']['cpu']}, {first['machine']['cpu_count']} "
                     f"CPUs, GPUs {first['machine']['gpus'] or 'none'}; engine "
                     f"{engine_note(runs)}. Training times "
                     f"depend on what else ran: each result file records the load "
                     f"average at its start.")
        parts.append("")
        plot_curves(runs, os.path.join(tier_dir, "curves.png"))
        plot_frontier(runs, os.path.join(tier_dir, "frontier.png"))
        parts += [f"![held-out accuracy over training]({tier}/curves.png)",
                  f"![clean vs robust]({tier}/frontier.png)"]
        stats_runs = [r for r in runs.get("advprop_eps4", [])
                      if r["results"].get("bn_statistics")]
        if stats_runs:
            plot_bn_statistics(stats_runs[0]["results"]["bn_statistics"],
                               os.path.join(tier_dir, "bn_statistics.png"))
            parts.append(f"![BN statistics, main vs auxiliary]({tier}/bn_statistics.png)")
        parts.append("")
    text = "\n".join(parts)
    os.makedirs(results_dir, exist_ok=True)  # a first call may have no result yet
    with open(os.path.join(results_dir, out_name), "w") as f:
        f.write(text + "\n")
    return text
