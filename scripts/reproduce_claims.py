"""Runs the claims suite and writes its report (efficientnet_advprop/claims).

    python scripts/reproduce_claims.py --tier=cpu            # ~3.7 h on 2 idle CPU cores, resumable
    python scripts/reproduce_claims.py --tier=cpu --claims=advprop_vs_vanilla
    python scripts/reproduce_claims.py --tier=cpu --runs=vanilla_nf26 --seeds=0  # a control
    python scripts/reproduce_claims.py --tier=gpu            # one GPU, 3 seeds, every claim
    python scripts/reproduce_claims.py --tier=gpu_wide       # one GPU, full width, 3 runs
    python scripts/reproduce_claims.py --tier=smoke          # a few steps of each run
    python scripts/reproduce_claims.py --report_only         # tables, plots, README table

Each (run, seed) without a result file in --results_dir/<tier>/<run>/seed<k>.json is
trained (resuming from --work_dir when it was interrupted) and evaluated in a fresh
process, then the report results/claims/README.md is rewritten from every result file.
The first call builds the fixed 45,000 / 5,000 split of ../shared/data in --data_dir.

--engine=jax (auto: where KERAS_BACKEND=jax or TensorFlow is not importable) runs the
suite on the JAX engine (efficientnet_advprop.claims.jax_runner), as on a GPU machine
with jax but no TensorFlow: it reads the CIFAR-10 tarball itself (--source, or
--data_dir when that names the tarball; the same split, no TFRecords) and measures
everything but the corruption errors, which are TensorFlow's. The engine is chosen
from the command line before anything imports Keras, and --engine=jax sets
KERAS_BACKEND=jax in this process when it is unset (no second process; a
KERAS_BACKEND naming another backend is refused). --time_budget_s starts no run that
the longest one so far says would end past it; a later call goes on with the runs
still without a result file (pending runs go seed by seed). On the JAX engine the
compiled programs are kept in <work_dir>/jax_cache, so a run's later seeds compile
nothing (the seed is an argument of the compiled step):

    python3 scripts/reproduce_claims.py --tier=gpu --engine=jax --time_budget_s=480
    python3 scripts/reproduce_claims.py --tier=gpu --engine=jax --data_dir=cifar10-train-jpeg.tar.gz
"""

import dataclasses
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ENGINES = ("auto", "tensorflow", "jax")


def fail(message):
    raise SystemExit(f"reproduce_claims.py: error: {message}")


def requested_engine(argv):
    """--engine's value on the command line (the last one given; "auto" without one),
    read before absl parses the flags: the package imports Keras, whose backend is
    fixed by KERAS_BACKEND at that import."""
    value = "auto"
    for index, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        if arg.startswith("--engine="):
            value = arg.split("=", 1)[1]
        elif arg == "--engine" and index + 1 < len(argv):
            value = argv[index + 1]
    return value


def choose_engine(requested):
    """"jax" or "tensorflow"; sets KERAS_BACKEND=jax for the JAX engine. Runs before
    Keras is imported."""
    import importlib.util

    if requested not in ENGINES:
        fail(f"--engine={requested}: expected one of {', '.join(ENGINES)}")
    backend = os.environ.get("KERAS_BACKEND")
    engine = requested
    if engine == "auto":
        try:
            has_tf = importlib.util.find_spec("tensorflow") is not None
        except (ImportError, ValueError):
            has_tf = False
        engine = "jax" if backend == "jax" or not has_tf else "tensorflow"
    chosen = f"--engine={requested}" + (f" (here {engine})" if requested == "auto" else "")
    if engine == "jax" and backend not in (None, "", "jax"):
        fail(f"{chosen} with KERAS_BACKEND={backend}: unset it or set it to jax")
    if engine == "tensorflow" and backend == "jax":
        fail(f"{chosen} with KERAS_BACKEND=jax: unset it")
    if engine == "jax":
        keras = sys.modules.get("keras")
        if keras is not None and keras.backend.backend() != "jax":
            fail("keras was imported before the engine was chosen")  # a bug, not input
        os.environ["KERAS_BACKEND"] = "jax"
    return engine


ENGINE = choose_engine(requested_engine(sys.argv)) if __name__ == "__main__" else None

from efficientnet_advprop.claims import suite  # noqa: E402

flags.DEFINE_enum("tier", "cpu", list(suite.TIERS), "Scale of the suite.")
flags.DEFINE_list("claims", None, "Claims to run (default: all): "
                  + ", ".join(c.key for c in suite.CLAIMS))
flags.DEFINE_list("runs", None, "Runs to run instead (default: those of --claims): "
                  + ", ".join(r.name for r in suite.RUNS) + "; or the controls that no "
                  "claim reads: " + ", ".join(r.name for r in suite.DIAGNOSTICS))
flags.DEFINE_list("seeds", None, "Seeds (default: the tier's).")
flags.DEFINE_enum("precision", None, ["float32", "bfloat16"], "Compute precision of "
                  "every run (default: the tier's: float32 on the smoke and cpu tiers, "
                  "bfloat16 on the GPU tiers).")
flags.DEFINE_string("results_dir", os.path.join(REPO, "results", "claims"),
                    "Result files and the report.")
flags.DEFINE_string("work_dir", os.path.join(REPO, "runs", "claims"),
                    "Checkpoints of the runs (resumable).")
flags.DEFINE_string("data_dir", os.path.join(REPO, "runs", "claims-data"),
                    "The 45,000 / 5,000 split (built here on first use).")
flags.DEFINE_string("source", os.path.join(os.path.dirname(REPO), "shared", "data",
                                           "cifar10-train-jpeg.tar.gz"),
                    "The CIFAR-10 training JPEGs (tar.gz).")
flags.DEFINE_bool("report_only", False, "Only rewrite the report (and the README's claims tables).")
flags.DEFINE_bool("isolate", None, "Each run in a fresh process (default: on the cpu tier, "
                  "whose runs take long enough that a clean process is worth its start).")
flags.DEFINE_string("only", None, "run:seed -- train and evaluate just this one here "
                    "(what an isolated run executes).")
flags.DEFINE_enum("engine", "auto", list(ENGINES), "Training engine; auto: jax when "
                  "KERAS_BACKEND=jax or TensorFlow is not importable (read from the "
                  "command line before Keras is imported).")
flags.DEFINE_float("time_budget_s", None, "Start no run that would end after this many "
                   "seconds of this call (judged by the longest run so far); rerun to go "
                   "on.")
FLAGS = flags.FLAGS


def selected_runs(tier):
    if FLAGS.runs:
        unknown = sorted(set(FLAGS.runs) - set(suite.RUNS_BY_NAME))
        if unknown:
            fail(f"--runs: unknown {', '.join(unknown)}")
        outside = [r for r in FLAGS.runs if tier.runs and r not in tier.runs]
        if outside:
            fail(f"--runs: {', '.join(outside)} not in the {tier.name} tier (its runs: "
                 f"{', '.join(tier.runs)})")
        return FLAGS.runs
    keys = FLAGS.claims or [c.key for c in suite.CLAIMS]
    unknown = sorted(set(keys) - set(suite.CLAIMS_BY_KEY))
    if unknown:
        fail(f"--claims: unknown {', '.join(unknown)}")
    wanted = {r for k in keys for r in suite.CLAIMS_BY_KEY[k].runs}
    runs = [r.name for r in suite.RUNS
            if r.name in wanted and (tier.runs is None or r.name in tier.runs)]
    if not runs:
        fail(f"--claims={','.join(keys)}: none of its runs is in the {tier.name} tier (its "
             f"runs: {', '.join(tier.runs)})")
    return runs


def run_here(tier, spec, seed, data_dir, command, engine):
    """One run in this process; a bad setting ends with one line naming it."""
    from efficientnet_advprop.config import ConfigError
    from efficientnet_advprop.training.loop import TrainingError
    from efficientnet_advprop.training.run_lock import RunLockedError

    if engine == "jax":
        from efficientnet_advprop import jax_experiment
        from efficientnet_advprop.claims import jax_runner as runner

        # the tier's seeds of one run compile once (work_dir/jax_cache)
        jax_experiment.enable_compilation_cache(os.path.join(FLAGS.work_dir, "jax_cache"))
    else:
        from efficientnet_advprop.claims import runner
    try:
        runner.run_one(tier, spec, seed, data_dir=data_dir, work_dir=FLAGS.work_dir,
                       results_dir=FLAGS.results_dir, command=command,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, RunLockedError, TrainingError) as e:
        fail(f"{spec.name} seed {seed}: {e}")


def jax_tarball():
    """The CIFAR-10 tarball the JAX engine reads: --data_dir when it names a file,
    else --source."""
    if os.path.isfile(FLAGS.data_dir):
        if FLAGS["source"].present and (os.path.abspath(FLAGS.source)
                                        != os.path.abspath(FLAGS.data_dir)):
            fail(f"--data_dir={FLAGS.data_dir} and --source={FLAGS.source}: two tarballs; "
                 "give one")
        return FLAGS.data_dir
    if FLAGS["data_dir"].present and os.path.exists(FLAGS.data_dir):
        fail(f"--data_dir={FLAGS.data_dir}: the JAX engine reads the CIFAR-10 tar.gz "
             "itself; name that file (or pass it as --source)")
    if not os.path.isfile(FLAGS.source):
        fail(f"--source={FLAGS.source}: no such file (the CIFAR-10 JPEG tar.gz)")
    return FLAGS.source


REPORT_HEADER = """# Claims suite: results

Written by `python scripts/reproduce_claims.py --report_only` from the result files
below it (`<tier>/<run>/seed<k>.json`: command, git revision, data split, seed, wall
time, machine and every number measured). The method, the budget of each tier and the
verdict rule are in the top-level README, "Does it reproduce the papers?".
"""


def main(argv):
    del argv
    if ENGINE is None:  # main() called without running the script
        engine = choose_engine(FLAGS.engine)
    elif FLAGS.engine != requested_engine(sys.argv):  # e.g. given in a --flagfile
        fail(f"--engine={FLAGS.engine}: give --engine on the command line itself")
    else:
        engine = ENGINE
    from efficientnet_advprop.claims import ensure_split, report
    from efficientnet_advprop.claims.runner_common import pending

    tier = suite.TIERS[FLAGS.tier]
    if FLAGS.seeds:
        try:
            tier = dataclasses.replace(tier, seeds=tuple(int(s) for s in FLAGS.seeds))
        except ValueError:
            fail(f"--seeds={','.join(FLAGS.seeds)}: expected integers")
    if FLAGS.precision:
        tier = dataclasses.replace(tier, precision=FLAGS.precision)
    if FLAGS.report_only:
        print(report.write_report(FLAGS.results_dir, header=REPORT_HEADER))
        if os.path.abspath(FLAGS.results_dir) == os.path.join(REPO, "results", "claims"):
            report.update_readme(os.path.join(REPO, "README.md"),
                                 report.readme_block(FLAGS.results_dir))
        return
    runs = selected_runs(tier)
    data_dir = None
    if tier.data == "split" and engine == "jax":
        data_dir = jax_tarball()  # read directly: the same split, no TFRecords
    elif tier.data == "split":
        try:
            ensure_split(FLAGS.source, FLAGS.data_dir)
        except ValueError as e:
            fail(str(e))
        data_dir = FLAGS.data_dir
    command = "python scripts/reproduce_claims.py " + " ".join(sys.argv[1:])
    if FLAGS.only:
        name, _, seed = FLAGS.only.partition(":")
        if name not in suite.RUNS_BY_NAME or not seed.isdigit():
            fail(f"--only={FLAGS.only}: expected run:seed with a run of the suite")
        run_here(tier, suite.RUNS_BY_NAME[name], int(seed), data_dir, command, engine)
        return
    isolate = FLAGS.isolate if FLAGS.isolate is not None else tier.name == "cpu"
    todo = pending(tier, FLAGS.results_dir, runs)
    print(f"tier {tier.name} ({tier.budget}), {engine} engine: {len(todo)} run(s) to do: "
          + ", ".join(f"{spec.name}:{seed}" for spec, seed in todo), flush=True)
    start, longest = time.time(), 0.0
    for index, (spec, seed) in enumerate(todo):
        elapsed = time.time() - start
        if FLAGS.time_budget_s and index and elapsed + longest > FLAGS.time_budget_s:
            left = ", ".join(f"{s.name}:{k}" for s, k in todo[index:])
            print(f"time budget: {elapsed:.0f} s used, the longest run took {longest:.0f} s;"
                  f" not started: {left} (rerun to go on)", flush=True)
            break
        run_start = time.time()
        if isolate:
            cmd = [sys.executable, os.path.abspath(__file__), f"--tier={tier.name}",
                   f"--only={spec.name}:{seed}", f"--results_dir={FLAGS.results_dir}",
                   f"--work_dir={FLAGS.work_dir}", f"--engine={engine}"]
            if engine == "jax":  # the tarball already chosen (read directly)
                cmd += [f"--source={data_dir}"] if data_dir else []
            else:
                cmd += [f"--data_dir={FLAGS.data_dir}", f"--source={FLAGS.source}"]
            if FLAGS.seeds:
                cmd.append(f"--seeds={','.join(FLAGS.seeds)}")
            if FLAGS.precision:
                cmd.append(f"--precision={FLAGS.precision}")
            done = subprocess.run(cmd)
            if done.returncode:
                fail(f"{spec.name} seed {seed} failed (exit {done.returncode}); rerun to "
                     f"resume")
        else:
            run_here(tier, spec, seed, data_dir, command, engine)
        longest = max(longest, time.time() - run_start)
        print(f"done {spec.name}:{seed}", flush=True)
    print(report.write_report(FLAGS.results_dir, header=REPORT_HEADER))


if __name__ == "__main__":
    app.run(main)
