"""Images/s of the TensorFlow and the JAX training engine, side by side, on this machine.

    python scripts/benchmark_engines.py                  # both models, three recipes
    python scripts/benchmark_engines.py --models=resnet-18-cifar --recipes=vanilla \
        --rounds=3 --steps_per_round=3
    python scripts/benchmark_engines.py --tf_jit_compile  # TF with XLA too

A Keras process has one backend, so this command starts one persistent worker process
per engine (this script with --worker=tensorflow / --worker=jax, KERAS_BACKEND set
accordingly), talking JSON lines over stdin/stdout. Each worker builds every case
(model x recipe) and runs its first step (tracing / XLA compilation, timed apart as
the compile time) and `--warmup` more untimed steps; then the two workers are timed in
alternating turns -- round-robin over cases and engines, `--rounds` rounds of
`--steps_per_round` steps, the engine that goes first swapping every round -- so both
see the same load on a shared machine; the median round is reported.

The steps are the engines' own: `Trainer._train_step` (benchmarking.build_config: the
train step of main.py's TF loop, default strategy, jit_compile as main.py's CPU default
unless --tf_jit_compile) and `JaxTrainer._loop_fn(1)` (one jitted step per call, as
main.py's JAX loop with iterations_per_loop=1). Both get the same model, the same
recipe object settings (benchmarking.make_benchmark_recipe: the paper's attack; advprop
is AdvProp with PGD-1, eps 1), the same TrainConfig (RMSProp, L2, EMA), the same
in-memory random batch, and wait for each step's loss, as training does.

Batches: --batch_size is the clean batch; each recipe draws `Recipe.drawn_batch` of it
(as benchmarking.drawn_batch_size), raised -- as config.resolve raises a preset's and
check_bn_batches demands -- to the recipe's smallest batch whose BN batches all reach
--min_bn_batch (default: the config's, 16). Fast AdvProp (p_adv 0.2, shuffle-BN groups
of 16, at least three groups) therefore draws 240 images on one device. Throughputs
count drawn images.

A case that fails on an engine (build or step) is recorded with its error text; the
other engine and the other cases go on. Results: <output_dir>/engines-<date>.json and
.md (a new name, -2, -3..., when that date's files exist).
"""

import collections
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, REPO_ROOT)

ENGINES = ("tensorflow", "jax")
RECIPE_CONFIGS = {"vanilla": "vanilla", "advprop": "advprop_pgd1",
                  "fast_advprop": "fast_advprop"}  # --recipes -> benchmarking config
NUM_CLASSES = 10
# what a dying worker's stderr says about why (glibc, faulthandler, the OOM killer)
CRASH_WORDS = ("Fatal Python error", "corrupted", "double free", "free():", "malloc",
               "Segmentation fault", "Aborted", "Killed", "MemoryError", "Check failed")

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined when run, not when imported by the tests)."""
    flags.DEFINE_list("models", ["resnet-18-cifar", "efficientnet-b0"], "Models to time.")
    flags.DEFINE_list("recipes", ["vanilla", "advprop", "fast_advprop"],
                      "Recipes to time: vanilla, advprop (AdvProp, PGD-1 eps 1), "
                      "fast_advprop (its defaults), or any benchmarking config name "
                      "(advprop_pgdK, another recipe).")
    flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds; the median is reported.")
    flags.DEFINE_integer("steps_per_round", 3, "Timed steps per case, engine and round.")
    flags.DEFINE_integer("warmup", 1, "Untimed steps after the first (compiling) one.")
    flags.DEFINE_integer("batch_size", 64, "Clean images per step (each recipe draws "
                         "Recipe.drawn_batch of it, raised to its BN minimum).")
    flags.DEFINE_integer("min_bn_batch", None, "Smallest BN batch a case may have (default: "
                         "the config's min_bn_batch).")
    flags.DEFINE_integer("image_size", 32, "Resolution.")
    flags.DEFINE_float("width_multiplier", 1.0, "Width: ResNets' width_multiplier; for an "
                       "EfficientNet, a factor on its width_coefficient.")
    flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute precision.")
    flags.DEFINE_bool("tf_jit_compile", False, "XLA-compile the TF step (main.py's default "
                      "is off on a CPU; the JAX step is always XLA-compiled).")
    flags.DEFINE_string("output_dir", "results/benchmark", "Where the result files go "
                        "(relative to the repository root unless absolute).")
    flags.DEFINE_enum("worker", None, list(ENGINES), "Internal: run as the worker of this "
                      "engine (reads JSON-line commands on stdin).")


# ------------------------------------------------------------------ batch sizing
def case_batches(config_name, clean_batch, min_bn_batch, num_classes=NUM_CLASSES):
    """(clean batch, drawn batch, recipe, BN batches, config rule's batch) of one case.

    The drawn batch starts at `Recipe.drawn_batch(clean_batch)` (as
    benchmarking.drawn_batch_size) and is raised to the smallest batch at which
    benchmarking.make_benchmark_recipe's recipe (Fast AdvProp's shuffle-BN groups
    following the batch) splits it with every BN batch >= `min_bn_batch`; the clean
    batch is then the smallest that draws it. The config rule's batch is the recipe's
    own `smallest_local_batch` with its default options, what config.resolve raises a
    preset's batch to and check_bn_batches asks for: the same at the config's
    min_bn_batch of 16 (Fast AdvProp: 240, groups of 16), larger below it (Fast
    AdvProp's default groups of 16 need 240 whatever the minimum)."""
    from efficientnet_advprop.tools import benchmarking
    from efficientnet_advprop.recipes import RECIPES

    recipe_name = benchmarking.parse_config(config_name)[0]
    start = benchmarking.drawn_batch_size(recipe_name, clean_batch)
    config_rule = RECIPES[recipe_name].from_options(num_classes).smallest_local_batch(
        min_bn_batch, 1, start=start)
    recipe = sizes = None
    for drawn in range(start, start + 64 * max(1, min_bn_batch) + 1):
        try:
            recipe = benchmarking.make_benchmark_recipe(config_name, num_classes, drawn)
            sizes = recipe.bn_batches(drawn, 1)
        except ValueError:  # no whole BN groups at this batch
            continue
        if min(sizes.values()) >= min_bn_batch:
            break
    else:
        raise ValueError(f"{config_name}: no batch from {start} to {drawn} gives BN "
                         f"batches of >= {min_bn_batch} images")
    clean = None
    for candidate in range(min(clean_batch, drawn), drawn + 1):
        try:
            if benchmarking.drawn_batch_size(recipe_name, candidate) == drawn:
                clean = candidate
                break
        except ValueError:  # too small a batch for the recipe to split
            continue
    if clean is None:
        raise ValueError(f"{config_name}: no clean batch draws {drawn} images")
    return clean, drawn, recipe, sizes, config_rule


def model_kwargs(model_name, width_multiplier):
    """build_model keywords of the width (none at 1)."""
    if width_multiplier == 1.0:
        return {}
    if model_name.startswith("efficientnet"):
        from efficientnet_advprop.models.efficientnet import efficientnet_params

        base = efficientnet_params(model_name).width_coefficient
        return {"width_coefficient": base * width_multiplier}
    return {"width_multiplier": width_multiplier}


# ------------------------------------------------------------------------- worker
class _TFCase:
    def __init__(self, spec, model_dir):
        from efficientnet_advprop.tools import benchmarking

        self.bench = benchmarking.build_config(
            spec["config"], model_name=spec["model"], image_size=spec["image_size"],
            batch_size=spec["clean_batch"], model_dir=model_dir,
            jit_compile=spec["jit_compile"], precision=spec["precision"], warmup=0,
            num_classes=NUM_CLASSES, model_kwargs=spec["model_kwargs"])
        if self.bench.batch_size != spec["drawn_batch"]:
            raise RuntimeError(f"build_config drew {self.bench.batch_size} images, "
                               f"expected {spec['drawn_batch']}")
        self.description = self.bench.description

    def step(self):
        return float(self.bench.trainer._train_step(*self.bench.inputs)[0])


class _JaxCase:
    def __init__(self, spec, model_dir):
        import numpy as np

        from efficientnet_advprop import build_model
        from efficientnet_advprop.training.jax_engine import JaxTrainer
        from efficientnet_advprop.training.loop import TrainConfig

        batch = spec["drawn_batch"]
        recipe = case_batches(spec["config"], spec["clean_batch"],
                              spec["min_bn_batch"])[2]
        size = spec["image_size"]

        def model_fn():  # as benchmarking.build_config's
            return build_model(spec["model"], NUM_CLASSES, image_size=size,
                               normalizer="split_batch_norm", num_aux=recipe.num_aux,
                               **spec["model_kwargs"])

        config = TrainConfig(model_dir=model_dir, train_steps=10 ** 9,
                             global_batch_size=batch, steps_per_epoch=100,
                             precision=spec["precision"], seed=0,
                             checkpoint_every_steps=10 ** 9, summary_every_steps=10 ** 9)
        self.trainer = JaxTrainer(model_fn, recipe, config)
        self.description = recipe.describe()
        # the device check's random batch (benchmarking.random_batch's values, as numpy),
        # stacked for one step per call
        import jax

        from efficientnet_advprop.tools.jax_device_check import random_batch

        batch_tuple = random_batch(recipe, batch, size, NUM_CLASSES)
        stacked = jax.tree_util.tree_map(lambda x: x[None], batch_tuple)
        self.inputs = self.trainer._shard(stacked)
        self.fn = self.trainer._loop_fn(1)
        self.count = 0

    def step(self):
        import numpy as np

        self.trainer.state, (losses, _) = self.fn(self.trainer.state, self.inputs,
                                                  np.int32(self.count), self.trainer.run_seed)
        self.count += 1
        return float(np.asarray(losses)[0])


def _versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("keras", "tensorflow", "jax", "jaxlib", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def worker_main(engine):
    """Serves JSON-line commands: build, time, quit. Replies one JSON line each."""
    import tempfile

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not the protocol
    import keras

    if keras.backend.backend() != engine:
        raise SystemExit(f"worker {engine}: KERAS_BACKEND is {keras.backend.backend()}")
    import numpy as np

    keras.utils.set_random_seed(0)  # once, before every build (see build_config)
    np.random.seed(0)
    info = {"backend": keras.backend.backend(), "pid": os.getpid()}
    if engine == "jax":
        import jax

        info["devices"] = [str(d) for d in jax.local_devices()]
    else:
        import tensorflow as tf

        info["devices"] = [d.name for d in tf.config.list_logical_devices()]
        info["intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()
        info["inter_op_threads"] = tf.config.threading.get_inter_op_parallelism_threads()
    proto.write(json.dumps({"ok": True, "ready": True, "info": info}) + "\n")
    cases = {}
    tmp = tempfile.TemporaryDirectory(prefix=f"benchmark_engines_{engine}_")
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        try:
            if op == "batches":
                spec = request["spec"]
                min_bn = spec["min_bn_batch"]
                if min_bn is None:
                    from efficientnet_advprop.config import RunConfig

                    min_bn = RunConfig.min_bn_batch
                clean, drawn, recipe, sizes, config_rule = case_batches(
                    spec["config"], spec["batch_size"], min_bn)
                reply = {"clean_batch": clean, "drawn_batch": drawn, "bn_batches": sizes,
                         "config_rule_batch": config_rule,
                         "min_bn_batch": min_bn,
                         "description": recipe.describe(),
                         "cost_model_passes": recipe.passes_per_image()}
            elif op == "build":
                spec = request["spec"]
                start = time.perf_counter()
                kind = _JaxCase if engine == "jax" else _TFCase
                case = kind(spec, os.path.join(tmp.name, request["key"]))
                built = time.perf_counter()
                loss = case.step()  # tracing / compilation + one step
                first = time.perf_counter()
                warm = None
                for _ in range(spec["warmup"]):
                    step_start = time.perf_counter()
                    case.step()
                    warm = time.perf_counter() - step_start
                cases[request["key"]] = case
                reply = {"build_s": built - start, "first_call_s": first - built,
                         "warm_step_s": warm, "first_loss": loss,
                         "description": case.description}
            elif op == "time":
                case = cases[request["key"]]
                steps = int(request["steps"])
                start = time.perf_counter()
                losses = [case.step() for _ in range(steps)]
                reply = {"seconds_per_step": (time.perf_counter() - start) / steps,
                         "last_loss": losses[-1]}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply["ok"] = True
        except Exception as e:  # noqa: BLE001 -- reported to the parent, per case
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}
            if request.get("key") in cases and op == "time":
                del cases[request["key"]]  # a failed step: do not time it again
        proto.write(json.dumps(reply, default=float) + "\n")
    tmp.cleanup()


# ------------------------------------------------------------------------- parent
class Worker:
    """One engine's worker process. Its stderr is passed through, the last lines kept
    to explain a crash (a native abort leaves no Python traceback)."""

    def __init__(self, engine):
        self.engine = engine
        env = dict(os.environ, KERAS_BACKEND=engine, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={engine}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, env=env, cwd=REPO_ROOT)
        self.tail = collections.deque(maxlen=40)
        self._stderr = threading.Thread(target=self._pump, daemon=True)
        self._stderr.start()
        self.dead = None
        self.info = None

    def _pump(self):
        for line in self.process.stderr:
            sys.stderr.write(line)
            self.tail.append(line.rstrip("\n"))

    def _died(self):
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.join(timeout=10)
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               and -code in signal.valid_signals() else f"exit code {code}")
        output = [line for line in self.tail if line.strip()
                  and not line.startswith(("I0000", "W0000", "WARNING: All log"))]
        causes = [line.strip() for line in output if any(
            word in line for word in CRASH_WORDS)]
        self.dead = f"{self.engine} worker died ({how})" + (
            f": {causes[0]}" if causes else "")
        return {"ok": False, "error": self.dead, "died": True,
                "traceback": "\n".join(output)}

    def read(self):
        line = self.process.stdout.readline()
        if not line:
            return self._died()
        return json.loads(line)

    def ready(self):
        reply = self.read()
        if reply.get("ok"):
            self.info = reply["info"]
        return reply

    def send(self, **request):
        """Sends one command; `receive` reads its reply."""
        if self.dead:
            return
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def receive(self):
        if self.dead:
            return {"ok": False, "error": self.dead, "died": True}
        return self.read()

    def call(self, **request):
        self.send(**request)
        return self.receive()

    def close(self):
        if not self.dead:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.join(timeout=10)


def _log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info():
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu or platform.processor() or None,
            "cpu_cores": os.cpu_count(), "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    info["niceness"] = os.nice(0)  # this run's (e.g. 10 under `nice`)
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        info["memory_gib"] = round(total_kb / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def git_info():
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=30).stdout.rstrip("\n")
        except (OSError, subprocess.TimeoutExpired):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
               .splitlines() if line.strip()]
    return {"revision": git("rev-parse", "HEAD").strip() or None,
            "modified_tracked_files": changed}


def output_paths(output_dir, date):
    """(json path, md path) of a new result: engines-<date>[-N].{json,md}."""
    os.makedirs(output_dir, exist_ok=True)
    n = 1
    while True:
        stem = f"engines-{date}" + (f"-{n}" if n > 1 else "")
        paths = (os.path.join(output_dir, stem + ".json"),
                 os.path.join(output_dir, stem + ".md"))
        if not any(os.path.exists(p) for p in paths):
            return paths
        n += 1


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _last_line(error):
    """An error's kind and its last non-empty line (TF errors carry a whole trace)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0].split(':', 1)[0]}: ... {lines[-1]}"


def render_markdown(result):
    m, v, s = result["machine"], result["versions"], result["settings"]
    lines = [
        f"# TensorFlow vs JAX training engine, {result['date']}", "",
        f"Command: `{result['command']}`", "",
        f"Git revision: {result['git']['revision']}"
        + (f" (working tree: modified {', '.join(result['git']['modified_tracked_files'])})"
           if result["git"]["modified_tracked_files"] else ""), "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores"
        + (f" ({m['usable_cores']} usable)" if "usable_cores" in m else "")
        + (f", {m['memory_gib']} GiB" if "memory_gib" in m else "")
        + (f", run at niceness {m['niceness']}" if m.get("niceness") else "")
        + f"; load average {result['load_average_start']} at the start, "
          f"{result['load_average_end']} at the end.", "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), "",
        f"Settings: {s['image_size']} px, {s['precision']}, width multiplier "
        f"{s['width_multiplier']:g}, clean batch {s['batch_size']} (drawn batch per case "
        f"below; min_bn_batch {s['min_bn_batch']}), {s['rounds']} interleaved rounds x "
        f"{s['steps_per_round']} steps per case and engine (median round), "
        f"{s['warmup']} untimed warm-up step(s) after the compiling one; TF "
        f"jit_compile={s['tf_jit_compile']}, JAX always XLA. Optimizer: TrainConfig's "
        "default (RMSProp, L2 1e-5, EMA 0.9999) on both.", "",
        "img/s counts drawn images. Compile s: the first step's call (tracing and "
        "compilation) minus one steady step.", "",
        "| model | recipe | drawn batch | TF img/s | JAX img/s | JAX/TF | TF compile s "
        "| JAX compile s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for case in result["cases"]:
        tf_row, jax_row = case["tensorflow"], case["jax"]
        notes = "; ".join(f"{e}: {_last_line(r['error'])}"
                          for e, r in (("TF", tf_row), ("JAX", jax_row)) if r.get("error"))
        lines.append(
            f"| {case['model']} | {case['recipe']} | {case.get('drawn_batch') or '-'} | "
            f"{_fmt(tf_row.get('images_per_second'), '.1f')} | "
            f"{_fmt(jax_row.get('images_per_second'), '.1f')} | "
            f"{_fmt(case.get('jax_to_tf'), '.2f')} | "
            f"{_fmt(tf_row.get('compile_s'), '.1f')} | "
            f"{_fmt(jax_row.get('compile_s'), '.1f')} | "
            f"{notes.replace('|', '/').replace(chr(10), ' ')} |")
    lines += ["", "Recipes: " + "; ".join(
        sorted({f"{c['recipe']}: {c['description']}" for c in result["cases"]
                if c.get("description")})), ""]
    return "\n".join(lines)


class Engines:
    """The two workers; a worker that dies is started again and rebuilds the cases it
    had built (the case it died on keeps the error)."""

    def __init__(self, result):
        self.result = result
        self.workers = {engine: Worker(engine) for engine in ENGINES}
        for engine, worker in self.workers.items():
            self._ready(engine, worker)

    def _ready(self, engine, worker):
        reply = worker.ready()
        info = worker.info or {"error": reply.get("error")}
        self.result["engines"].setdefault(engine, info)
        return reply.get("ok", False)

    def revive(self, engine, cases):
        """Starts `engine`'s worker again and rebuilds every case still timed on it."""
        self.workers[engine].close()
        self.result["engines"][engine].setdefault("restarts", 0)
        self.result["engines"][engine]["restarts"] += 1
        _log(f"restarting the {engine} worker")
        worker = self.workers[engine] = Worker(engine)
        if not self._ready(engine, worker):
            return
        for case in cases:
            row = case[engine]
            if "rounds" in row and not row.get("error"):
                _log(f"  rebuilding {case['key']} on {engine}")
                reply = worker.call(op="build", key=case["key"], spec=case["spec"])
                if not reply.get("ok"):
                    fail(row, "rebuild after a restart", reply)
                    if reply.get("died"):
                        return self.revive(engine, cases)

    def close(self):
        for worker in self.workers.values():
            worker.close()


def fail(row, stage, reply):
    row["error"] = f"{stage}: {reply['error']}"
    if reply.get("traceback"):
        row["traceback"] = reply["traceback"]
    _log(f"  FAILED ({stage}): {_last_line(reply['error'])}")


def size_cases(engines, cases, batch_size, min_bn):
    """Asks both workers for each case's batches (they must agree)."""
    keys = ("clean_batch", "drawn_batch", "bn_batches", "min_bn_batch",
            "config_rule_batch")
    for case in cases:
        spec = {"config": case["config"], "batch_size": batch_size, "min_bn_batch": min_bn}
        sizing = {e: w.call(op="batches", spec=spec) for e, w in engines.workers.items()}
        good = [r for r in sizing.values() if r.get("ok")]
        if not good:
            for engine in ENGINES:
                fail(case[engine], "batch sizing", sizing[engine])
            continue
        if len(good) == 2 and any(good[0][k] != good[1][k] for k in keys):
            raise RuntimeError(f"{case['key']}: the engines size the batch differently: "
                               f"{sizing}")
        for k in keys + ("description", "cost_model_passes"):
            case[k] = good[0][k]


def build_cases(engines, cases):
    """Builds every case on both engines, one at a time (engines alternating), timing
    the first step (compilation) and the warm-up steps."""
    for case in cases:
        if "spec" not in case:
            continue
        for engine, worker in engines.workers.items():
            _log(f"building {case['key']} on {engine} (batch {case['drawn_batch']})")
            reply = worker.call(op="build", key=case["key"], spec=case["spec"])
            row = case[engine]
            if reply.get("ok"):
                row.update(build_s=reply["build_s"], first_call_s=reply["first_call_s"],
                           warm_step_s=reply["warm_step_s"], rounds=[])
                _log(f"  {engine}: built in {reply['build_s']:.1f} s, first step "
                     f"{reply['first_call_s']:.1f} s")
            else:
                fail(row, "build", reply)
                if reply.get("died"):
                    engines.revive(engine, cases)


def time_cases(engines, cases, rounds, steps):
    """One untimed step per case and engine, then `rounds` rounds: every case on both
    engines in turn (the first engine alternating), `steps` timed steps each."""
    def timed(case, engine, n):
        row = case[engine]
        if "rounds" not in row or row.get("error"):
            return None
        reply = engines.workers[engine].call(op="time", key=case["key"], steps=n)
        if not reply.get("ok"):
            fail(row, "step", reply)
            if reply.get("died"):
                engines.revive(engine, cases)
            return None
        row["last_loss"] = reply["last_loss"]
        return reply["seconds_per_step"]

    # untimed: building later cases may have slowed an earlier one's next call
    for case in cases:
        for engine in ENGINES:
            timed(case, engine, 1)
    for round_index in range(rounds):
        order = ENGINES if round_index % 2 == 0 else ENGINES[::-1]
        _log(f"round {round_index + 1}/{rounds}")
        for case in cases:
            for engine in order:
                seconds = timed(case, engine, steps)
                if seconds is not None:
                    case[engine]["rounds"].append(seconds)


def main(argv):
    del argv
    if FLAGS.worker:
        worker_main(FLAGS.worker)
        return
    if FLAGS.rounds < 1 or FLAGS.steps_per_round < 1 or FLAGS.warmup < 0:
        raise app.UsageError("--rounds and --steps_per_round must be >= 1, --warmup >= 0")
    output_dir = FLAGS.output_dir
    if not os.path.isabs(output_dir):
        output_dir = os.path.join(REPO_ROOT, output_dir)
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), REPO_ROOT)]
                       + sys.argv[1:])
    result = {
        "command": command, "date": started.isoformat(timespec="seconds"),
        "git": git_info(), "machine": machine_info(), "versions": _versions(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {"models": FLAGS.models, "recipes": FLAGS.recipes,
                     "rounds": FLAGS.rounds, "steps_per_round": FLAGS.steps_per_round,
                     "warmup": FLAGS.warmup, "batch_size": FLAGS.batch_size,
                     "min_bn_batch": FLAGS.min_bn_batch, "image_size": FLAGS.image_size,
                     "width_multiplier": FLAGS.width_multiplier,
                     "precision": FLAGS.precision, "tf_jit_compile": FLAGS.tf_jit_compile},
        "engines": {}, "cases": []}
    cases = []
    for model in FLAGS.models:
        for recipe in FLAGS.recipes:
            config_name = RECIPE_CONFIGS.get(recipe, recipe)
            cases.append({"model": model, "recipe": recipe, "config": config_name,
                          "key": f"{model}.{config_name}", "image_size": FLAGS.image_size,
                          "tensorflow": {}, "jax": {}})
    result["cases"] = cases

    _log("starting the workers")
    engines = Engines(result)
    try:
        size_cases(engines, cases, FLAGS.batch_size, FLAGS.min_bn_batch)
        for case in cases:
            if "drawn_batch" not in case:
                continue
            if result["settings"]["min_bn_batch"] is None:
                result["settings"]["min_bn_batch"] = case["min_bn_batch"]
            case["spec"] = {
                "config": case["config"], "model": case["model"],
                "image_size": FLAGS.image_size, "clean_batch": case["clean_batch"],
                "drawn_batch": case["drawn_batch"], "min_bn_batch": case["min_bn_batch"],
                "precision": FLAGS.precision, "jit_compile": FLAGS.tf_jit_compile,
                "warmup": FLAGS.warmup,
                "model_kwargs": model_kwargs(case["model"], FLAGS.width_multiplier)}
        build_cases(engines, cases)
        time_cases(engines, cases, FLAGS.rounds, FLAGS.steps_per_round)
    finally:
        engines.close()

    for case in cases:
        for engine in ENGINES:
            row = case[engine]
            if row.get("rounds") and not row.get("error"):
                seconds = statistics.median(row["rounds"])
                row["seconds_per_step"] = seconds
                row["images_per_second"] = case["drawn_batch"] / seconds
                row["compile_s"] = max(0.0, row["first_call_s"] - seconds)
        tf_ips = case["tensorflow"].get("images_per_second")
        jax_ips = case["jax"].get("images_per_second")
        case["jax_to_tf"] = jax_ips / tf_ips if tf_ips and jax_ips else None
        case.pop("key")
        case.pop("spec", None)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(
        (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    json_path, md_path = output_paths(output_dir, started.strftime("%Y-%m-%d"))
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=float)
        f.write("\n")
    markdown = render_markdown(result)
    with open(md_path, "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
