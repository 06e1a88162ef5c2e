"""One command to check an accelerator: environment, accelerator tests, benchmark, input.

    python scripts/device_check.py --out_dir=/tmp/device       # on a GPU: ~8 minutes
    python scripts/device_check.py --out_dir=/tmp/dry --dry_run  # CPU, toy sizes

On whatever device TensorFlow finds it prints the environment (TF/Keras versions,
devices, XLA), runs the tests marked `accelerator` (tests/test_accelerator.py) with
pytest in a subprocess, benchmarks EfficientNet-B0 and ResNet-50 at 224 px (batch 128,
halved on out-of-memory; XLA and bfloat16): keras.applications.EfficientNetB0 as the
reference, vanilla, AdvProp PGD-1 and PGD-5 and Fast AdvProp, interleaved in one
process (median round; img/s, step-time ratio to vanilla, device memory peak), times
the input pipeline (inception crop, with and without AutoAugment v0) on one CPU core
and on all of them against the fastest step, and writes device_report.json and
device_report.md into --out_dir (efficientnet_advprop.tools.device_check says how).

--dry_run runs the same code at toy sizes on a CPU (tiny widths, 32 px, batch 8, two
rounds, resnet-18-cifar width 0.125 in place of ResNet-50); the accelerator tests then
skip and are reported as skipped. Work that no longer fits in --time_budget_s is
skipped and named in the report.
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
flags.DEFINE_bool("dry_run", False, "CPU, toy sizes: the same code paths in a minute.")
flags.DEFINE_integer("batch_size", None, "Images drawn per step (default 128; 8 dry).")
flags.DEFINE_integer("steps", None, "Timed steps per round (default 10; 1 dry).")
flags.DEFINE_integer("repeats", None, "Interleaved rounds, median reported (3; 2 dry).")
flags.DEFINE_enum("precision", None, ["float32", "bfloat16", "float16"],
                  "Compute precision (default bfloat16).")
flags.DEFINE_bool("jit_compile", None, "XLA (default on; off in the dry run).")
flags.DEFINE_enum("breakdown", None, ["auto", "always", "never"],
                  "Time Fast AdvProp's pieces: auto = when it costs > 1.3x vanilla.")
flags.DEFINE_float("time_budget_s", None, "Seconds for everything (default 450; 300 dry).")
flags.DEFINE_float("test_timeout_s", None, "Seconds for the accelerator tests.")
flags.DEFINE_bool("tests", True, "Run the accelerator tests.")
flags.DEFINE_string("input_data_dir", None, "Time the input pipeline on this data "
                    "(TFRecords or an image folder) instead of synthesised JPEGs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
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
