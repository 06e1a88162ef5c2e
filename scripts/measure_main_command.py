"""Times one `python main.py ...` run end to end and records it as a result file.

    python scripts/measure_main_command.py --name=preset-lr0.008 -- \
        --advprop --model=efficientnet-b0 --base_learning_rate=0.008

runs main.py with the arguments after `--` in a fresh process (its own --model_dir
and --export_dir under --work_dir unless given), and writes
results/main_command/<name>.json: the command, git revision, seed, split, wall-clock
seconds, the machine and its load average before and after, and main.py's
eval_results.json. A name whose file exists is skipped, so a queue of runs resumes
where it stopped.

With --validation_data_dir (a TFRecord folder whose validation-* files hold images
disjoint from the embedded set: scripts/make_embedded_dataset.py
--train_per_class=1700 --eval_per_class=200 --output_dir=DIR writes the next 200 of
each class's seed-0 draw there), the run's checkpoint is then evaluated on that
split too, clean, through both BN sets (main.py --mode=eval). The embedded preset was
chosen on that validation split, and its held-out figures are reported, not tuned
on (docs/embedded_default.md). For a result file that exists without validation
figures, they are added if its model_dir is still there.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def flag_value(args, name):
    """The value of --name=V (or --name V) in `args`, else None."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def validate(main_args, model_dir, data_dir):
    """Clean accuracy of model_dir's checkpoint on data_dir's validation-* files
    (main.py --mode=eval; the held-out eval_results.json is read before this
    overwrites it)."""
    keep = [a for a in main_args if a == "--advprop" or a.startswith(("--recipe=",
                                                                       "--model=",
                                                                       "--model_name="))]
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=eval",
               f"--model_dir={model_dir}", f"--data_dir={data_dir}",
               "--eval_attack_iterations=0"] + keep
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-800:]}
    with open(os.path.join(model_dir, "eval_results.json")) as f:
        results = json.load(f)
    return {"data_dir": data_dir, "num_images": results.get("num_eval_images"),
            **{k: v for k, v in results.items() if k.endswith("accuracy")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="result file name (no .json)")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "results", "main_command"))
    parser.add_argument("--work_dir", default="/tmp/main_command_runs",
                        help="where the run's model_dir and export_dir go (removed first)")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--validation_data_dir", default=None,
                        help="also evaluate the checkpoint on this TFRecord folder's "
                             "validation-* files (clean)")
    parser.add_argument("main_args", nargs=argparse.REMAINDER,
                        help="-- then main.py's arguments")
    args = parser.parse_args(argv)
    main_args = [a for a in args.main_args if a != "--"]
    out_path = os.path.join(args.out_dir, f"{args.name}.json")
    run_dir = os.path.join(args.work_dir, args.name)
    if os.path.exists(out_path):
        with open(out_path) as f:
            record = json.load(f)
        model_dir = flag_value(main_args, "model_dir") or f"{run_dir}/model"
        if (args.validation_data_dir and "validation" not in record
                and os.path.isdir(model_dir)):
            record["validation"] = validate(main_args, model_dir, args.validation_data_dir)
            with open(out_path, "w") as f:
                json.dump(record, f, indent=2)
            print(f"{args.name}: validation {json.dumps(record['validation'])}")
        else:
            print(f"{out_path} exists: skipped")
        return 0
    shutil.rmtree(run_dir, ignore_errors=True)
    if flag_value(main_args, "model_dir") is None:
        main_args.append(f"--model_dir={run_dir}/model")
    if flag_value(main_args, "export_dir") is None:
        main_args.append(f"--export_dir={run_dir}/export")
    command = [sys.executable, os.path.join(ROOT, "main.py")] + main_args
    load_before = os.getloadavg()
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    model_dir = flag_value(main_args, "model_dir")
    results_file = os.path.join(model_dir, "eval_results.json")
    results = None
    if os.path.exists(results_file):
        with open(results_file) as f:
            results = json.load(f)
    record = {
        "command": "python main.py " + " ".join(a for a in main_args
                                               if not a.startswith(("--model_dir=",
                                                                    "--export_dir="))),
        "git_revision": git_revision(),
        "seed": int(flag_value(main_args, "seed") or 0),
        "split": "embedded: 15,000 train / 2,000 held-out (the package's set)",
        "wall_seconds": round(wall, 1),
        "returncode": proc.returncode,
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
        "results": results,
        "validation": (validate(main_args, model_dir, args.validation_data_dir)
                       if args.validation_data_dir and results else None),
        "output_tail": (proc.stdout + proc.stderr)[-1500:],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{args.name}: {wall:.0f} s, rc {proc.returncode}, "
          f"{json.dumps(results) if results else 'no results'} -> {out_path}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
