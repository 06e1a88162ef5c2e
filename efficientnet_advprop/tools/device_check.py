"""One device check: environment, accelerator tests, train-step benchmark, input pipeline.

`run(plan, out_dir, tests_path=...)` does, on whatever device TensorFlow finds:

1. environment: versions, devices, CUDA/cuDNN build, whether XLA compiles and runs;
2. the tests marked `accelerator` (pytest in a subprocess; on a machine without a GPU
   they skip, and the report lists them as skipped with the reason). The subprocess
   runs while the benchmark builds (compiles) its configurations; every timing round
   waits for it to end, so tests and timings never share the device;
3. the train-step benchmark (efficientnet_advprop.tools.benchmarking): per model, its
   configurations built and timed in alternating rounds in one process (median round),
   with img/s, the step-time ratio to vanilla and to keras.applications.EfficientNetB0,
   and the device allocator's peak memory; a configuration that runs out of device
   memory halves the batch of the model's every configuration. When Fast AdvProp costs
   more than 1.3x vanilla (or `breakdown="always"`), its noisy pass, shuffle and
   adversarial pass are timed separately;
4. the input pipeline (official inception crop, with and without AutoAugment v0) on one
   CPU core and on all of them, against the fastest measured step: the cores needed to
   feed it;
5. device_report.json and device_report.md in `out_dir`.

Everything runs against a time budget (`Plan.time_budget_s`): configurations that no
longer fit are skipped and listed as such, never silently dropped. `dry_run_plan()` runs
the same code at toy sizes on a CPU in well under a minute, so this module cannot rot.
"""

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree

import numpy as np

from efficientnet_advprop.tools.jax_device_check import nvidia_smi  # engine-free

FAST_ADVPROP_TARGET = 1.3  # Fast AdvProp's step at most this many vanilla steps
REPORT_JSON = "device_report.json"
REPORT_MD = "device_report.md"
SECTIONS = ("meta", "environment", "tests", "benchmark", "input_pipeline", "findings")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One model of the benchmark: its configurations, in build priority order."""

    model_name: str
    image_size: int
    configs: tuple
    model_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device check runs (see `full_plan` and `dry_run_plan`)."""

    models: tuple
    batch_size: int = 128
    min_batch_size: int = 8
    jit_compile: bool = True
    precision: str = "bfloat16"
    steps: int = 10
    warmup: int = 2
    repeats: int = 3
    breakdown: str = "auto"  # Fast AdvProp's pieces: "auto" (> 1.3x), "always", "never"
    run_tests: bool = True
    test_timeout_s: float = 240.0
    input_image_size: int = 224
    input_batch_size: int = 64
    input_steps: int = 6  # timed batches per input configuration
    input_warmup: int = 2
    input_jpeg_size: tuple = (375, 500)  # synthesised JPEGs: the commonest ImageNet size
    input_num_images: int = 256
    input_data_dir: str = None  # real data instead (TFRecords, image folder)
    input_configs: tuple = (("inception", "none"), ("inception", "v0"))
    input_reserve_s: float = 60.0  # kept for the input pipeline from the benchmark
    time_budget_s: float = 450.0
    dry_run: bool = False

    def __post_init__(self):
        if self.breakdown not in ("auto", "always", "never"):
            raise ValueError(f"breakdown={self.breakdown!r}: auto, always or never")
        if self.batch_size < 1 or self.min_batch_size < 1 or self.steps < 1:
            raise ValueError("batch_size, min_batch_size and steps must be >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")


def full_plan(**overrides):
    """The accelerator run: EfficientNet-B0 and ResNet-50 at 224 px, batch 128, XLA,
    bfloat16, at most ~8 minutes on one H100 including compilation. Configurations are
    built in the order given (the most wanted first) while the time budget allows."""
    models = (
        ModelPlan("efficientnet-b0", 224, ("vanilla", "fast_advprop", "keras_applications",
                                           "advprop_pgd1", "advprop_pgd5")),
        ModelPlan("resnet-50", 224, ("vanilla", "fast_advprop", "advprop_pgd1",
                                     "advprop_pgd5")),
    )
    return Plan(models=models, **overrides)


def dry_run_plan(**overrides):
    """The same code paths at toy sizes for a CPU: tiny widths, 32 px, batch 16 (Fast
    AdvProp draws 20: 4 BN groups, where 10 would give fewer than its shuffle needs), two
    rounds, resnet-18-cifar at width 0.125 in place of ResNet-50, without XLA (its CPU
    compilation alone would take minutes), the breakdown always, and a time budget that
    skips nothing (a slow shared CPU builds a configuration in 20-80 s)."""
    tiny_b0 = {"width_coefficient": 0.25, "depth_coefficient": 0.25}
    models = (
        ModelPlan("efficientnet-b0", 32, ("vanilla", "fast_advprop", "keras_applications",
                                          "advprop_pgd1", "advprop_pgd5"), tiny_b0),
        ModelPlan("resnet-18-cifar", 32, ("vanilla", "fast_advprop", "advprop_pgd1",
                                          "advprop_pgd5"), {"width_multiplier": 0.125}),
    )
    values = dict(models=models, batch_size=16, min_batch_size=4, jit_compile=False,
                  precision="bfloat16", steps=1, warmup=2, repeats=2, breakdown="always",
                  input_image_size=32, input_batch_size=8,
                  input_steps=2, input_warmup=1, input_jpeg_size=(48, 64),
                  input_num_images=32, input_reserve_s=20.0, time_budget_s=3600.0,
                  test_timeout_s=600.0, dry_run=True)
    values.update(overrides)
    return Plan(**values)


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# -------------------------------------------------------------------- environment
def enable_memory_growth():
    """Lets this process's GPU memory grow on demand (the test subprocess shares the
    device). Must run before TensorFlow initialises the GPUs; later it is a no-op."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass


def accelerator_kind():
    """"GPU", "TPU" or None: the accelerator TensorFlow sees."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        if tf.config.list_physical_devices(kind):
            return kind
    return None


def xla_check():
    """Compiles and runs a small function with jit_compile=True on the default device."""
    import tensorflow as tf

    start = time.perf_counter()
    try:
        fn = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x)), jit_compile=True)
        value = float(fn(tf.ones([8, 8])))
        ok = value == 512.0
        return {"available": ok, "seconds": time.perf_counter() - start,
                "error": None if ok else f"wrong result {value}"}
    except Exception as e:  # pylint: disable=broad-except
        return {"available": False, "seconds": time.perf_counter() - start,
                "error": _first_line(e)}


def environment():
    """Versions, devices and XLA of this process."""
    import keras
    import tensorflow as tf

    devices = {kind: [d.name for d in tf.config.list_physical_devices(kind)]
               for kind in ("CPU", "GPU", "TPU")}
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # pylint: disable=broad-except
            details = {}
        capability = details.get("compute_capability")
        gpus.append({"name": details.get("device_name", gpu.name),
                     "compute_capability": ".".join(map(str, capability))
                     if capability else None})
    build = dict(tf.sysconfig.get_build_info())
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "cpu_cores": os.cpu_count(),
        "devices": devices,
        "gpus": gpus,
        "accelerator": accelerator_kind(),
        "cuda_build": bool(build.get("is_cuda_build")),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "xla": xla_check(),
        "variables": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "TF_XLA_FLAGS",
                                                 "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")
                      if k in os.environ},
    }
    env["nvidia_smi"] = nvidia_smi()
    return env


# -------------------------------------------------------------- accelerator tests
class TestRun:
    """The accelerator tests in a pytest subprocess, started now, collected by
    `result()` (which waits for it, up to the timeout)."""

    def __init__(self, tests_path, out_dir, timeout_s, cwd=None):
        self.xml = os.path.join(out_dir, "accelerator_tests.xml")
        self.log = os.path.join(out_dir, "accelerator_tests.log")
        self.timeout_s = timeout_s
        self.command = [sys.executable, "-m", "pytest", tests_path, "-m", "accelerator",
                        "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={self.xml}"]
        root = cwd or os.getcwd()
        env = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH="true",
                   TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                   PYTHONPATH=os.pathsep.join(
                       [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                 if p]))
        self.start = time.perf_counter()
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(self.command, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, cwd=root, env=env)
        self.end = None
        self._result = None
        threading.Thread(target=self._stamp_end, daemon=True).start()

    def _stamp_end(self):
        self.process.wait()
        self.end = time.perf_counter()

    def done(self):
        return self.process.poll() is not None

    def result(self):
        if self._result is not None:
            return self._result
        timed_out = False
        try:
            self.process.wait(timeout=max(1.0, self.timeout_s -
                                          (time.perf_counter() - self.start)))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.process.kill()
            self.process.wait()
        self._log_file.close()
        with open(self.log) as f:
            output = f.read()
        tests = parse_junit(self.xml) if os.path.exists(self.xml) and not timed_out else []
        if not tests:
            tests = parse_verbose_output(output)
        counts = {}
        for test in tests:
            counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
        self._result = {
            "command": " ".join(self.command), "returncode": self.process.returncode,
            "timed_out": timed_out,
            "seconds": (self.end or time.perf_counter()) - self.start,
            "counts": counts, "tests": tests, "log": self.log,
            "output_tail": output[-3000:],
        }
        return self._result


def parse_junit(path):
    """[{id, outcome (passed/failed/error/skipped), message, seconds}] of a JUnit XML."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return []
    tests = []
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip()
                break
        tests.append({"id": f"{classname.replace('.', '/')}.py::{case.get('name')}",
                      "outcome": outcome, "message": message.splitlines()[0][:300]
                      if message else "", "seconds": float(case.get("time", 0) or 0)})
    return tests


_VERBOSE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_verbose_output(output):
    """Outcomes from `pytest -v` lines (the fallback when no JUnit file was written,
    e.g. when the run timed out)."""
    tests = []
    for line in output.splitlines():
        match = _VERBOSE.match(line.strip())
        if match:
            tests.append({"id": match.group(1), "outcome": match.group(2).lower()
                          .replace("xfail", "skipped").replace("xpass", "passed"),
                          "message": "", "seconds": None})
    return tests


# ---------------------------------------------------------------------- benchmark
def _build_weight(name):
    """Relative compile cost of a configuration, for the time budget (graph size)."""
    if name.startswith("advprop_pgd"):
        return (int(name[len("advprop_pgd"):]) + 2) / 3.0
    return 1.0


def _passes_guess(name):
    if name.startswith("advprop_pgd"):
        return int(name[len("advprop_pgd"):]) + 2
    return 1.2 if name == "fast_advprop" else 1.0


class _OutOfMemory(Exception):
    pass


def _benchmark_model(model, plan, batch_size, model_deadline, overall_deadline, memory,
                     wait_for_tests, workdir):
    """Builds and times one model's configurations at `batch_size`. Raises _OutOfMemory
    (everything released) when the device runs out of memory."""
    from efficientnet_advprop.tools import benchmarking
    from efficientnet_advprop.training import set_global_seed

    set_global_seed(0)  # once per model: see benchmarking.build_config
    built, skipped, errors = [], [], []
    vanilla_build = None
    try:
        for name in model.configs:
            now = time.perf_counter()
            if built:
                warm = sum(b.warm_step_seconds or 0.0 for b in built)
                guess_step = (built[0].warm_step_seconds or 0.0) * _passes_guess(name)
                need = (vanilla_build * _build_weight(name) * 1.2
                        + plan.steps * (warm + guess_step))
                if now + need > model_deadline:
                    skipped.append({"config": name, "reason": (
                        f"time budget: about {need:.0f} s needed to build and time it, "
                        f"{max(0.0, model_deadline - now):.0f} s left for "
                        f"{model.model_name}")})
                    continue
            try:
                bench = benchmarking.build_config(
                    name, model_name=model.model_name, image_size=model.image_size,
                    batch_size=batch_size, model_dir=os.path.join(workdir, name),
                    jit_compile=plan.jit_compile, precision=plan.precision,
                    warmup=plan.warmup, model_kwargs=model.model_kwargs)
            except Exception as e:  # pylint: disable=broad-except
                if benchmarking.is_out_of_memory(e):
                    raise _OutOfMemory(_first_line(e)) from None
                errors.append({"config": name, "error": _first_line(e)})
                continue
            built.append(bench)
            if vanilla_build is None:
                vanilla_build = bench.build_seconds
        if not built:
            return [], skipped, errors, None
        wait_for_tests()
        timings = benchmarking.time_interleaved(built, plan.repeats, plan.steps,
                                                memory=memory, deadline=model_deadline)
        rows = benchmarking.step_rows(built, timings)
        breakdown = None
        fast = next((r for r in rows if r["config"] == "fast_advprop"), None)
        if fast is not None and plan.breakdown != "never":
            over = (fast["ratio_to_vanilla"] or 0) > FAST_ADVPROP_TARGET
            if plan.breakdown == "always" or over:
                bench = next(b for b in built if b.name == "fast_advprop")
                need = bench.build_seconds * 1.5 + 4 * plan.steps * fast["seconds_per_step"]
                if time.perf_counter() + need > overall_deadline:
                    breakdown = {"skipped": f"time budget: about {need:.0f} s needed"}
                else:
                    try:
                        breakdown = benchmarking.fast_advprop_breakdown(
                            bench, plan.steps, plan.jit_compile)
                    except Exception as e:  # pylint: disable=broad-except
                        if benchmarking.is_out_of_memory(e):
                            raise _OutOfMemory(_first_line(e)) from None
                        breakdown = {"error": _first_line(e)}
        return rows, skipped, errors, breakdown
    except Exception as e:  # pylint: disable=broad-except
        if isinstance(e, _OutOfMemory) or benchmarking.is_out_of_memory(e):
            raise _OutOfMemory(_first_line(e)) from None
        raise
    finally:
        benchmarking.release(built)


def benchmark(plan, start, deadline, wait_for_tests=lambda: None):
    """The train-step benchmark of every model of `plan` before `deadline`."""
    import tensorflow as tf

    from efficientnet_advprop.tools import benchmarking

    kind = accelerator_kind()
    memory = benchmarking.DeviceMemory(f"{kind}:0") if kind else None
    if memory is not None and not memory.supported:
        memory = None
    models = []
    for index, model in enumerate(plan.models):
        # The time left, shared by the models still to come in proportion to their
        # number of configurations (what one model leaves unused goes to the next).
        share = len(model.configs) / sum(len(m.configs) for m in plan.models[index:])
        model_deadline = time.perf_counter() + (deadline - time.perf_counter()) * share
        result = {"model": model.model_name, "image_size": model.image_size,
                  "model_kwargs": dict(model.model_kwargs), "configs": list(model.configs),
                  "rows": [], "skipped": [], "errors": [], "out_of_memory": [],
                  "fast_advprop_breakdown": None, "batch_size": None}
        batch = plan.batch_size
        with tempfile.TemporaryDirectory() as workdir:
            while True:
                try:
                    rows, skipped, errors, breakdown = _benchmark_model(
                        model, plan, batch, model_deadline, deadline, memory,
                        wait_for_tests, workdir)
                except _OutOfMemory as e:
                    result["out_of_memory"].append({"batch_size": batch, "error": str(e)})
                    batch //= 2
                    if batch < plan.min_batch_size:
                        result["errors"].append({"config": "*", "error": (
                            f"out of device memory down to batch {batch * 2}")})
                        break
                    continue
                result.update(rows=rows, skipped=skipped, errors=errors,
                              fast_advprop_breakdown=breakdown, batch_size=batch)
                break
        models.append(result)
    return {"precision": plan.precision, "jit_compile": plan.jit_compile,
            "steps_per_round": plan.steps, "repeats": plan.repeats, "warmup": plan.warmup,
            "memory_device": memory.device if memory else None,
            "seconds": time.perf_counter() - start, "models": models,
            "tensor_float_32": tf.config.experimental.tensor_float_32_execution_enabled()}


# ------------------------------------------------------------------ input pipeline
def input_pipeline(plan, benchmark_result, workdir):
    """Images/s of the training input pipeline on one core and on all of them, and the
    cores needed to feed the fastest measured step at the pipeline's resolution."""
    from efficientnet_advprop import data
    from efficientnet_advprop.tools import benchmarking

    start = time.perf_counter()
    if plan.input_data_dir:
        data_dir, source = plan.input_data_dir, plan.input_data_dir
    else:
        height, width = plan.input_jpeg_size
        data_dir = benchmarking.write_jpeg_folder(
            os.path.join(workdir, "jpegs"), plan.input_num_images, height, width)
        source = (f"{plan.input_num_images} synthesised {width}x{height} JPEGs "
                  "(quality 90), an image folder")
    info = data.resolve_dataset(data_dir=data_dir)
    cores = os.cpu_count() or 1
    rows = []
    for augmentation, auto_augment in plan.input_configs:
        row = {"augmentation": augmentation, "auto_augment": auto_augment,
               "image_size": plan.input_image_size, "batch_size": plan.input_batch_size}
        for key, threads in (("one_core", 1), ("all_cores", None)):
            rate, per_batch, setup = benchmarking.measure_input(
                info, data_dir, image_size=plan.input_image_size,
                batch_size=plan.input_batch_size, steps=plan.input_steps,
                warmup=plan.input_warmup, augmentation=augmentation,
                auto_augment=auto_augment, threads=threads)
            row[f"images_per_second_{key}"] = rate
            row[f"setup_seconds_{key}"] = setup
        row["images_per_second_per_core_all"] = row["images_per_second_all_cores"] / cores
        rows.append(row)
    step_rows = [r for m in benchmark_result["models"] for r in m["rows"]
                 if r["image_size"] == plan.input_image_size]
    fastest = max(step_rows, key=lambda r: r["images_per_second"], default=None)
    for row in rows:
        if fastest is None:
            row["cores_needed_one_core_rate"] = row["cores_needed_all_cores_rate"] = None
            continue
        need = fastest["images_per_second"]
        row["cores_needed_one_core_rate"] = need / row["images_per_second_one_core"]
        row["cores_needed_all_cores_rate"] = need / row["images_per_second_per_core_all"]
    return {"source": source, "dataset": info.name, "cpu_cores": cores, "rows": rows,
            "fastest_step": None if fastest is None else {
                "model": fastest["model"], "config": fastest["config"],
                "images_per_second": fastest["images_per_second"]},
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------ findings
def findings(report):
    """Plain-language lines: failed tests, missed targets, Fast AdvProp's cost and where
    its time goes, skipped work."""
    lines = []
    tests = report.get("tests") or {}
    counts = tests.get("counts", {})
    if tests.get("timed_out"):
        lines.append(f"The accelerator tests timed out after {tests['seconds']:.0f} s.")
    if counts.get("failed") or counts.get("error"):
        bad = [t["id"] for t in tests["tests"] if t["outcome"] in ("failed", "error")]
        lines.append(f"Accelerator tests FAILED: {', '.join(bad)}.")
    elif counts and set(counts) == {"skipped"}:
        reasons = sorted({t["message"] for t in tests["tests"]})
        lines.append(f"All {counts['skipped']} accelerator tests skipped ({'; '.join(reasons)}).")
    elif counts.get("passed"):
        lines.append(f"{counts['passed']} accelerator tests passed"
                     + (f", {counts['skipped']} skipped." if counts.get("skipped") else "."))
    from efficientnet_advprop.tools.benchmarking import target_verdict

    for model in (report.get("benchmark") or {}).get("models", []):
        label = f"{model['model']} @{model['image_size']}px, batch {model['batch_size']}"
        for row in model["rows"]:
            verdict = target_verdict(row)
            if "MISSED" in verdict and row["config"] != "fast_advprop":  # (below)
                lines.append(f"{label}: {row['config']} missed its target ({verdict}; "
                             f"measured {row['ratio_to_vanilla']:.2f}x vanilla).")
        fast = next((r for r in model["rows"] if r["config"] == "fast_advprop"), None)
        if fast is not None and fast["ratio_to_vanilla"] is not None:
            ratio = fast["ratio_to_vanilla"]
            vanilla = fast["seconds_per_step"] / ratio
            if ratio > FAST_ADVPROP_TARGET:
                text = (f"{label}: Fast AdvProp costs {ratio:.2f}x vanilla, more than "
                        f"{FAST_ADVPROP_TARGET}x (its cost model says "
                        f"{fast['cost_model_passes']:.2f}x).")
                text += " " + _where_time_goes(model.get("fast_advprop_breakdown"), vanilla)
                lines.append(text)
            else:
                lines.append(f"{label}: Fast AdvProp costs {ratio:.2f}x vanilla (target "
                             f"<= {FAST_ADVPROP_TARGET}x).")
        for item in model["out_of_memory"]:
            lines.append(f"{model['model']}: out of device memory at batch "
                         f"{item['batch_size']}; halved.")
        for item in model["skipped"]:
            lines.append(f"{model['model']}: {item['config']} skipped ({item['reason']}).")
        for item in model["errors"]:
            lines.append(f"{model['model']}: {item['config']} failed: {item['error']}")
    pipe = report.get("input_pipeline") or {}
    fastest = pipe.get("fastest_step")
    for row in pipe.get("rows", []):
        if fastest and row.get("cores_needed_one_core_rate") is not None:
            lines.append(
                f"Input ({row['augmentation']} crop, AutoAugment {row['auto_augment']}, "
                f"{row['image_size']} px): {row['images_per_second_one_core']:.0f} img/s on "
                f"one core; feeding the fastest step ({fastest['model']} "
                f"{fastest['config']}, {fastest['images_per_second']:.0f} img/s) needs "
                f"{row['cores_needed_one_core_rate']:.1f} cores at that rate "
                f"({row['cores_needed_all_cores_rate']:.1f} at the all-core rate per core; "
                f"this machine has {pipe['cpu_cores']}).")
    return lines


def _where_time_goes(breakdown, vanilla_seconds):
    if not breakdown:
        return "Its pieces were not timed (--breakdown=never)."
    if "skipped" in breakdown or "error" in breakdown:
        return ("Its pieces were not timed: "
                f"{breakdown.get('skipped') or breakdown.get('error')}.")
    parts = [("noisy pass", breakdown["noisy_pass_s"]), ("shuffle", breakdown["shuffle_s"]),
             ("adversarial pass", breakdown["adversarial_pass_s"]),
             ("rest of the step (optimizer, EMA, loop)", max(0.0, breakdown["other_s"]))]
    step = breakdown["step_s"]
    text = "Where the time goes (pieces compiled separately): " + ", ".join(
        f"{name} {seconds * 1e3:.1f} ms ({seconds / step:.0%} of its step, "
        f"{seconds / vanilla_seconds:.2f}x a vanilla step)" for name, seconds in parts)
    biggest = max(parts, key=lambda p: p[1])
    return text + f"; the largest is the {biggest[0]}."


# -------------------------------------------------------------------------- report
def _gib(value):
    return "n/a" if value is None else f"{value / 2 ** 30:.2f}"


def _num(value, fmt=".2f"):
    return "n/a" if value is None else format(value, fmt)


def markdown(report):
    """The report as Markdown."""
    meta, env = report["meta"], report["environment"]
    out = [f"# Device check{' (dry run)' if meta['dry_run'] else ''}", "",
           f"{meta['started']}, {meta['wall_seconds']:.0f} s wall, time budget "
           f"{meta['time_budget_s']:.0f} s.", "", "## Environment", "",
           "| | |", "|---|---|"]
    gpus = ", ".join(f"{g['name']} (sm {g['compute_capability']})" for g in env["gpus"])
    for key, value in (("TensorFlow", env["tensorflow"]), ("Keras", env["keras"]),
                       ("Python", env["python"]), ("platform", env["platform"]),
                       ("CPU cores", env["cpu_cores"]),
                       ("accelerator", env["accelerator"] or "none"),
                       ("GPUs", gpus or "none"),
                       ("TPUs", ", ".join(env["devices"]["TPU"]) or "none"),
                       ("CUDA / cuDNN (build)", f"{env['cuda_version']} / {env['cudnn_version']}"),
                       ("nvidia-smi", env.get("nvidia_smi") or "n/a"),
                       ("XLA", "available" if env["xla"]["available"]
                        else f"NOT available ({env['xla']['error']})")):
        out.append(f"| {key} | {value} |")
    tests = report["tests"]
    out += ["", "## Accelerator tests", ""]
    if tests is None:
        out.append("Not run.")
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(tests["counts"].items())) or "none"
        out += [f"`{tests['command']}`: {counts}, exit code {tests['returncode']}"
                f"{', TIMED OUT' if tests['timed_out'] else ''}, {tests['seconds']:.0f} s.",
                "", "| test | outcome | message |", "|---|---|---|"]
        out += [f"| {t['id']} | {t['outcome']} | {t['message'].replace('|', '/')} |"
                for t in tests["tests"]]
    bench = report["benchmark"]
    out += ["", "## Train-step benchmark", "",
            f"precision {bench['precision']}, jit_compile {bench['jit_compile']}, "
            f"TF32 {bench['tensor_float_32']}, median of up to {bench['repeats']} "
            f"interleaved rounds of {bench['steps_per_round']} steps after "
            f"{bench['warmup']} warm-up steps; "
            + (f"memory: the {bench['memory_device']} allocator's peak during the config's "
               "steps (reset before each round); resident = in use before them (every "
               "built config's variables)." if bench["memory_device"]
               else "device memory is not tracked on this device.")]
    from efficientnet_advprop.tools.benchmarking import target_verdict

    for model in bench["models"]:
        out += ["", f"### {model['model']} @{model['image_size']} px, batch "
                    f"{model['batch_size']}"
                + (f" ({model['model_kwargs']})" if model["model_kwargs"] else ""), "",
                "| config | img/s | s/step | / vanilla | / keras.apps | cost model | target "
                "| peak GiB | resident GiB | build+warm-up s |",
                "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in model["rows"]:
            out.append(f"| {r['config']} | {r['images_per_second']:.1f} | "
                       f"{r['seconds_per_step']:.4f} | {_num(r['ratio_to_vanilla'])} | "
                       f"{_num(r['ratio_to_reference'])} | {r['cost_model_passes']:g} | "
                       f"{target_verdict(r)} | {_gib(r['memory_peak_bytes'])} | "
                       f"{_gib(r['memory_resident_bytes'])} | {r['build_seconds']:.1f} |")
        b = model["fast_advprop_breakdown"]
        if b and "step_s" in b:
            out += ["", "Fast AdvProp's pieces, each compiled on its own:", "",
                    "| piece | ms | share of its step |", "|---|---:|---:|"]
            for key, name in (("noisy_pass_s", "noisy pass (+ K-1 PGD steps)"),
                              ("shuffle_s", "shuffle BN"),
                              ("adversarial_pass_s", "adversarial pass"),
                              ("other_s", "rest: optimizer, EMA, loop"),
                              ("step_s", "whole step")):
                out.append(f"| {name} | {b[key] * 1e3:.2f} | {b[key] / b['step_s']:.0%} |")
        elif b:
            out += ["", f"Fast AdvProp's pieces: {b.get('skipped') or b.get('error')}"]
        for item in model["skipped"]:
            out.append(f"\n- skipped {item['config']}: {item['reason']}")
        for item in model["errors"]:
            out.append(f"\n- FAILED {item['config']}: {item['error']}")
        for item in model["out_of_memory"]:
            out.append(f"\n- out of memory at batch {item['batch_size']}: {item['error']}")
    pipe = report["input_pipeline"]
    out += ["", "## Input pipeline", ""]
    if pipe is None:
        out.append("Not run.")
    else:
        out += [f"{pipe['source']}; {pipe['cpu_cores']} CPU cores.", "",
                "| crop | AutoAugment | px | img/s one core | img/s all cores | per core "
                "(all/cores) | cores for the fastest step (one-core rate / all-core rate) |",
                "|---|---|---:|---:|---:|---:|---|"]
        for r in pipe["rows"]:
            out.append(f"| {r['augmentation']} | {r['auto_augment']} | {r['image_size']} | "
                       f"{r['images_per_second_one_core']:.1f} | "
                       f"{r['images_per_second_all_cores']:.1f} | "
                       f"{r['images_per_second_per_core_all']:.1f} | "
                       f"{_num(r['cores_needed_one_core_rate'], '.1f')} / "
                       f"{_num(r['cores_needed_all_cores_rate'], '.1f')} |")
        if pipe["fastest_step"]:
            f = pipe["fastest_step"]
            out += ["", f"Fastest step: {f['model']} {f['config']}, "
                        f"{f['images_per_second']:.1f} img/s."]
    out += ["", "## Findings", ""] + [f"- {line}" for line in report["findings"]]
    return "\n".join(out) + "\n"


def write_report(report, out_dir):
    """Writes device_report.json and device_report.md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, REPORT_JSON), os.path.join(out_dir, REPORT_MD)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(md_path, "w") as f:
        f.write(markdown(report))
    return json_path, md_path


def run(plan, out_dir, tests_path=None, repo_root=None, log=print):
    """Runs the device check of `plan`; writes and returns the report (a dict).

    tests_path: the accelerator tests' file (None or plan.run_tests False: not run);
    repo_root: the pytest subprocess's working directory (its package is imported)."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    deadline = start + plan.time_budget_s
    os.makedirs(out_dir, exist_ok=True)
    enable_memory_growth()
    tests = None
    if plan.run_tests and tests_path:
        tests = TestRun(tests_path, out_dir, plan.test_timeout_s, cwd=repo_root)
        log(f"accelerator tests started: {' '.join(tests.command)}")
    env = environment()
    log(f"TF {env['tensorflow']}, Keras {env['keras']}, {env['cpu_cores']} CPU cores, "
        f"accelerator {env['accelerator'] or 'none'} "
        f"{[g['name'] for g in env['gpus']] or env['devices']['TPU'] or ''}, XLA "
        f"{'available' if env['xla']['available'] else env['xla']['error']}")

    def wait_for_tests():
        if tests is not None and not tests.done():
            log("waiting for the accelerator tests before timing")
            tests.result()

    bench = benchmark(plan, start, deadline - plan.input_reserve_s, wait_for_tests)
    for model in bench["models"]:
        for row in model["rows"]:
            log(f"{model['model']:>16s} {row['config']:>18s} "
                f"{row['images_per_second']:9.1f} img/s  x{_num(row['ratio_to_vanilla'])} "
                "vanilla")
    test_result = tests.result() if tests is not None else None
    if test_result is not None:
        log(f"accelerator tests: {test_result['counts']}")
    with tempfile.TemporaryDirectory() as workdir:
        pipe = input_pipeline(plan, bench, workdir)
    report = {
        "meta": {"started": started, "dry_run": plan.dry_run, "out_dir": out_dir,
                 "time_budget_s": plan.time_budget_s,
                 "plan": dataclasses.asdict(plan)},
        "environment": env, "tests": test_result, "benchmark": bench,
        "input_pipeline": pipe,
    }
    report["meta"]["wall_seconds"] = time.perf_counter() - start
    report["findings"] = findings(report)
    write_report(report, out_dir)
    return report
