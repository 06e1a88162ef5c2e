"""What both claims runners share (`runner`: TensorFlow; `jax_runner`: JAX): where a
run's result file lives, which runs are pending, the git revision, the atomic write.
Imports no engine."""

import json
import os
import platform
import subprocess
import time

from efficientnet_advprop.claims import suite

CURVE_FILE = "claims_curve.json"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORRUPTIONS_TF_ONLY = ("corruptions are TensorFlow-only (data/corruptions.py); not "
                       "measured on the JAX engine")


def corruptions_not_measured(reason=CORRUPTIONS_TF_ONLY):
    """The corruption results of a run whose engine cannot measure them: the keys of
    the schema, null, and why (`report` marks them "not measured")."""
    return {"corruption_errors": None, "mean_corruption_error": None,
            "corruptions_not_measured": reason}


def result_path(results_dir, tier, run_name, seed):
    return os.path.join(results_dir, tier, run_name, f"seed{seed}.json")


def pending(tier, results_dir, run_names=None):
    """(run, seed) pairs of the tier without a result file, seed by seed (every run of
    the first seed, in suite order, then the next seed's): a call cut short by
    --time_budget_s leaves every claim measured on as many seeds as it could."""
    wanted = run_names or [r.name for r in suite.RUNS
                           if tier.runs is None or r.name in tier.runs]
    return [(suite.RUNS_BY_NAME[name], seed) for seed in tier.seeds for name in wanted
            if not os.path.exists(result_path(results_dir, tier.name, name, seed))]


def git_revision(repo=REPO):
    """Short commit of the checkout, "+dirty" when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def write_record(path, record):
    """Writes a result file atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def host():
    """What every result file records of the host: processor name, cores, platform and
    the load average at the run's start (training times depend on it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "load_average_at_start": (list(os.getloadavg())
                                      if hasattr(os, "getloadavg") else None)}


def read_curve(model_dir):
    """The held-out curve written so far by an interrupted run ([] for a new one)."""
    path = os.path.join(model_dir, CURVE_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def add_curve_point(model_dir, curve, step, steps_per_epoch, accuracy):
    """Appends one checkpoint's held-out accuracy to `curve` and rewrites the run's
    curve file (so an interrupted run resumes with the points it has)."""
    curve.append({"step": int(step), "epoch": round(step / steps_per_epoch, 3),
                  "clean_accuracy": accuracy})
    with open(os.path.join(model_dir, CURVE_FILE), "w") as f:
        json.dump(curve, f)


def finish_run(tier, spec, seed, *, engine, run, cfg, overrides, data_dir, split, machine,
               command, revision, train_seconds, start_wall, results, results_dir):
    """Writes one run's result file (the schema `report` reads) and returns it."""
    trainer = run.trainer
    record = {
        "run": spec.name, "title": spec.title, "recipe": spec.recipe, "tier": tier.name,
        "seed": int(seed), "command": command, "git_revision": revision, "engine": engine,
        "data": {"dataset": run.info.name, "data_dir": data_dir,
                 "num_train": run.info.num_train, "num_held_out": run.info.num_eval,
                 "split": split},
        "machine": machine, "model_name": cfg.model.model_name,
        "width_multiplier": cfg.model.width_multiplier,
        "train_steps": cfg.optim.train_steps, "steps_per_epoch": cfg.optim.steps_per_epoch,
        "train_batch_size": cfg.data.train_batch_size,
        "eval_epsilon": spec.eval_epsilon, "eval_attack_iterations": tier.eval_iterations,
        "overrides": {k: v for k, v in overrides.items() if k != "model_dir"},
        # train_seconds covers only this process's steps: from start_step (0 unless it
        # resumed an interrupted run) to train_steps.
        "start_step": int(trainer.start_step or 0),
        "train_seconds": round(train_seconds, 1),
        "train_images_per_second": (round(trainer.images_per_second, 1)
                                    if trainer.images_per_second else None),
        "wall_seconds": round(time.time() - start_wall, 1),
        "results": results,
    }
    write_record(result_path(results_dir, tier.name, spec.name, seed), record)
    return record
