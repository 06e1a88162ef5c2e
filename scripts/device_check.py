"""One command to check an accelerator: environment, accelerator tests, benchmark.

    python scripts/device_check.py --out_dir=/tmp/device       # on a GPU: ~8 minutes
    python scripts/device_check.py --out_dir=/tmp/dry --dry_run  # CPU, toy sizes

Two engines (`--engine`; auto: JAX when KERAS_BACKEND=jax or TensorFlow is not
importable, as on a GPU machine that has only jax, torch and timm):

- JAX (efficientnet_advprop.tools.jax_device_check): versions and JAX's devices;
  every recipe's jitted step on the accelerator against the same step on the CPU
  (a child process), float32 and bfloat16; EfficientNet-B0 and ResNet-50 at 224 px,
  128 clean images per step: vanilla, AdvProp PGD-1 and PGD-5 and Fast AdvProp,
  compiled and timed in alternating rounds (median; img/s, time per image as a ratio
  to vanilla's, XLA's memory analysis), bfloat16 then float32, the bfloat16 rounds
  beside timm's efficientnet_b0 / resnet50 in PyTorch (bfloat16 autocast,
  channels-last, torch.compile) when torch and timm import. Sets KERAS_BACKEND=jax
  and XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX and PyTorch share the device) unless
  they are set.
- TensorFlow (efficientnet_advprop.tools.device_check): the tests marked `accelerator`
  (tests/test_accelerator.py) in a pytest subprocess, the same benchmark with
  keras.applications.EfficientNetB0 as the reference (XLA, bfloat16), and the input
  pipeline (inception crop, with and without AutoAugment v0) on one CPU core and all.

Both write device_report.json and device_report.md into --out_dir. --dry_run runs the
same code at toy sizes on a CPU. Work that no longer fits in --time_budget_s is skipped
and named in the report. Exit status 1 when a test or a configuration failed.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Where device_report.json/.md go.", required=True)
flags.DEFINE_enum("engine", "auto", ["auto", "jax", "tensorflow"], "Which engine runs the "
                  "check; auto: jax when KERAS_BACKEND=jax or TensorFlow is not importable.")
flags.DEFINE_bool("peer", True, "JAX engine: time timm's models in PyTorch beside ours "
                  "(when torch and timm import).")
flags.DEFINE_list("models", None, "JAX engine: benchmark only these of the plan's models "
                  "(full: efficientnet-b0, resnet-50; dry run: efficientnet-b0, "
                  "resnet-18-cifar).")
flags.DEFINE_list("test_recipes", None, "JAX engine: the recipes of the accelerator tests "
                  "(default: every recipe; dry run: vanilla, advprop, fast_advprop).")
flags.DEFINE_bool("dry_run", False, "CPU, toy sizes: the same code paths in a minute.")
flags.DEFINE_integer("batch_size", None, "Images drawn per step (default 128; 8 dry).")
flags.DEFINE_integer("steps", None, "Timed steps per round (default 10; 1 dry).")
flags.DEFINE_integer("repeats", None, "Interleaved rounds, median reported (3; 2 dry).")
flags.DEFINE_enum("precision", None, ["float32", "bfloat16", "float16"],
                  "Compute precision (TF default bfloat16; JAX default both, bfloat16 "
                  "first; float16 is TF's only).")
flags.DEFINE_bool("jit_compile", None, "XLA (default on; off in the dry run).")
flags.DEFINE_enum("breakdown", None, ["auto", "always", "never"],
                  "Time Fast AdvProp's pieces: auto = when it costs > 1.3x vanilla.")
flags.DEFINE_float("time_budget_s", None, "Seconds for everything (default 450; 300 dry).")
flags.DEFINE_float("test_timeout_s", None, "Seconds for the accelerator tests.")
flags.DEFINE_bool("tests", True, "Run the accelerator tests.")
flags.DEFINE_string("input_data_dir", None, "Time the input pipeline on this data "
                    "(TFRecords or an image folder) instead of synthesised JPEGs.")


TF_ONLY = ("jit_compile", "breakdown", "test_timeout_s", "input_data_dir")


def choose_engine(requested):
    """"jax" or "tensorflow" for --engine=auto/jax/tensorflow (see the docstring)."""
    import importlib.util

    if requested != "auto":
        return requested
    if os.environ.get("KERAS_BACKEND") == "jax":
        return "jax"
    try:
        has_tf = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        has_tf = False
    return "tensorflow" if has_tf else "jax"


def main_jax():
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise app.UsageError(f"--engine=jax with KERAS_BACKEND={backend}: unset it or set "
                             "it to jax")
    for key in TF_ONLY:
        if getattr(FLAGS, key) is not None:
            raise app.UsageError(f"--{key} is the TensorFlow engine's; not with --engine=jax")
    if FLAGS.precision == "float16":
        raise app.UsageError("--precision=float16: the JAX engine does no loss scaling; "
                             "float32 or bfloat16")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from efficientnet_advprop.tools import jax_device_check

    overrides = {key: getattr(FLAGS, key) for key in (
        "batch_size", "steps", "repeats", "time_budget_s") if getattr(FLAGS, key) is not None}
    if FLAGS.precision:
        overrides["precisions"] = (FLAGS.precision,)
    overrides.update(run_tests=FLAGS.tests, peer=FLAGS.peer)
    if FLAGS.test_recipes:
        overrides["test_recipes"] = tuple(FLAGS.test_recipes)
    make_plan = (jax_device_check.dry_run_plan if FLAGS.dry_run
                 else jax_device_check.full_plan)
    try:
        plan = make_plan(**overrides)
        if FLAGS.models:
            plan = jax_device_check.only_models(plan, FLAGS.models)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    report = jax_device_check.run(
        plan, FLAGS.out_dir, command=" ".join(["python"] + sys.argv),
        log=lambda line: print(line, file=sys.stderr, flush=True))
    print(jax_device_check.markdown(report))
    failed = sum(1 for row in report["tests"].get("rows", [])
                 if row["outcome"] in ("failed", "error"))
    errors = sum(len(g["errors"]) for g in report["benchmark"]["groups"])
    return 1 if failed or errors else 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if choose_engine(FLAGS.engine) == "jax":
        return main_jax()
    for name, value in (("nopeer", not FLAGS.peer), ("models", FLAGS.models),
                        ("test_recipes", FLAGS.test_recipes)):
        if value:
            raise app.UsageError(f"--{name} is the JAX engine's (--engine=jax)")
    from efficientnet_advprop.tools import device_check

    overrides = {key: getattr(FLAGS, key) for key in (
        "batch_size", "steps", "repeats", "precision", "jit_compile", "breakdown",
        "time_budget_s", "test_timeout_s", "input_data_dir")
        if getattr(FLAGS, key) is not None}
    overrides["run_tests"] = FLAGS.tests
    make_plan = device_check.dry_run_plan if FLAGS.dry_run else device_check.full_plan
    try:
        plan = make_plan(**overrides)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    report = device_check.run(
        plan, FLAGS.out_dir, tests_path=os.path.join(REPO_ROOT, "tests",
                                                     "test_accelerator.py"),
        repo_root=REPO_ROOT, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(device_check.markdown(report))
    tests = report["tests"] or {}
    failed = tests.get("counts", {}).get("failed", 0) + tests.get("counts", {}).get("error", 0)
    errors = sum(len(m["errors"]) for m in report["benchmark"]["models"])
    return 1 if failed or errors or tests.get("timed_out") else 0


if __name__ == "__main__":
    app.run(main)
