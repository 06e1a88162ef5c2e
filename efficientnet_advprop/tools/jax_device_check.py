"""The device check on the JAX engine: environment, accelerator tests, a train-step
benchmark with a PyTorch peer in the same run, and the report.

For a machine with jax (and its GPU plugin), keras, numpy -- and, for the peer, torch
and timm -- but no TensorFlow (scripts/device_check.py --engine=jax). `run(plan,
out_dir)` does:

1. environment: versions (jax, jaxlib, keras, numpy; torch and timm when importable),
   JAX's devices with their kind and memory, nvidia-smi, the XLA variables;
2. the benchmark, first (the most wanted figures): per (precision, model) group, every
   configuration (tools.step_configs: vanilla, AdvProp PGD-1 and PGD-5, Fast AdvProp)
   is compiled (`jax.jit(...).lower().compile()`: compile seconds and XLA's memory
   analysis of the step, i.e. the device memory the step needs, and its count of the
   step's operations) and timed in alternating rounds with the others of its group,
   median round reported: img/s (drawn images), the time per drawn image as a ratio
   to vanilla's (the cost per epoch) beside the recipe's cost model and XLA's
   operation count per image as a ratio to vanilla's, and the TFLOP/s reached. A
   step that runs out of device memory halves the batch of its group. The bfloat16
   group of a model with a `peer` also times timm's model of that name in PyTorch
   (bfloat16 autocast, channels-last, `torch.compile`, SGD with momentum), when torch
   and timm import: the report gives our img/s as ratios to the peer's;
3. accelerator tests, in the time kept for them (`tests_reserve_s`): every recipe's
   jitted training step (`JaxTrainer`, one step of plain SGD from the same weights and
   batch, its attack cut to one iteration as in tests/test_engine_parity.py) on the
   accelerator against the same step on the CPU. The CPU side runs in a child process
   (`JAX_PLATFORMS=cpu`) from the start. float32 runs at JAX's "highest" matmul
   precision (no TF32), and must agree to `Plan.float32_tolerance` (loss, relative)
   with update cosine >= `Plan.float32_min_cosine`; bfloat16 (the mixed_bfloat16
   policy) is checked against the float32 CPU step with the looser bfloat16 bounds;
4. findings (Fast AdvProp over 1.3x vanilla, peer ratios, failed tests, what was
   skipped) and device_report.json / device_report.md in `out_dir`.

Everything runs against `Plan.time_budget_s`: what no longer fits is skipped and named
in the report, never dropped silently. `dry_run_plan()` runs the same code at toy sizes
on a CPU (tests/test_device_check_jax.py).
"""

import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

FAST_ADVPROP_TARGET = 1.3  # Fast AdvProp's cost per image at most this many vanilla's
REPORT_JSON = "device_report.json"
REPORT_MD = "device_report.md"
NUM_CLASSES = 1000  # the benchmark's classifier: ImageNet's
TEST_CLASSES = 10
GIB = float(2 ** 30)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One benchmarked model: its configurations (build order = priority) and the timm
    model of the PyTorch peer (None: no peer)."""

    model_name: str
    image_size: int
    configs: tuple
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    peer: str = None
    peer_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one JAX device check runs (see `full_plan` and `dry_run_plan`)."""

    models: tuple
    precisions: tuple = ("bfloat16", "float32")  # benchmark groups, in this order
    batch_size: int = 128  # clean images per step (Fast AdvProp draws more)
    min_batch_size: int = 8
    steps: int = 10  # timed steps per configuration and round
    warmup: int = 2  # untimed steps after compilation
    repeats: int = 3  # interleaved rounds; the median is reported
    run_tests: bool = True
    test_recipes: tuple = None  # None: every recipe
    test_model: tuple = ("resnet-18-cifar", {"width_multiplier": 0.125})
    test_nf_model: tuple = ("nf-resnet-26-cifar", {"width_multiplier": 0.125})
    test_image_size: int = 32
    test_batch_size: int = 40  # Fast AdvProp: 8 adversarial images in 4 BN groups
    float32_tolerance: float = 1e-3
    float32_min_cosine: float = 0.999
    bfloat16_tolerance: float = 3e-2
    bfloat16_min_cosine: float = 0.95
    peer: bool = True
    peer_compile: bool = True
    peer_reserve_s: float = 90.0  # kept for the peers out of the benchmark's time
    tests_reserve_s: float = 150.0  # kept for the device side of the tests
    time_budget_s: float = 480.0
    dry_run: bool = False

    def __post_init__(self):
        if self.test_recipes is not None:
            from efficientnet_advprop.recipes import RECIPES

            unknown = [r for r in self.test_recipes if r not in RECIPES]
            if unknown:
                raise ValueError(f"test recipes {', '.join(unknown)}: not a recipe "
                                 f"({', '.join(RECIPES)})")
        if self.batch_size < 1 or self.min_batch_size < 1 or self.steps < 1:
            raise ValueError("batch_size, min_batch_size and steps must be >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        unknown = set(self.precisions) - {"float32", "bfloat16"}
        if unknown or not self.precisions:
            raise ValueError(f"precisions={self.precisions}: float32 and/or bfloat16 (the "
                             "JAX engine does no float16 loss scaling)")


def full_plan(**overrides):
    """The accelerator run: EfficientNet-B0 and ResNet-50 at 224 px, 128 clean images
    per step, bfloat16 then float32, each against timm's model of the same name; at
    most ~8 minutes (the budget) on one H100/H200 including compilation."""
    models = (
        ModelPlan("efficientnet-b0", 224, ("vanilla", "fast_advprop", "advprop_pgd1",
                                           "advprop_pgd5"), peer="efficientnet_b0"),
        ModelPlan("resnet-50", 224, ("vanilla", "fast_advprop", "advprop_pgd1",
                                     "advprop_pgd5"), peer="resnet50"),
    )
    return Plan(models=models, **overrides)


def dry_run_plan(**overrides):
    """The same code paths at toy sizes on a CPU: a quarter-size EfficientNet-B0 and a
    width-1/8 CIFAR ResNet-18 at 32 px, 16 clean images per step, one step per round,
    three recipes in the accelerator tests, the peers (timm's efficientnet_b0 and
    resnet18, when torch and timm import) at 32 px without torch.compile."""
    tiny_b0 = {"width_coefficient": 0.25, "depth_coefficient": 0.25}
    models = (
        ModelPlan("efficientnet-b0", 32, ("vanilla", "advprop_pgd5"), tiny_b0,
                  peer="efficientnet_b0"),
        ModelPlan("resnet-18-cifar", 32, ("vanilla", "fast_advprop", "advprop_pgd1"),
                  {"width_multiplier": 0.125}, peer="resnet18"),
    )
    values = dict(models=models, batch_size=16, min_batch_size=4, steps=1, warmup=1,
                  repeats=2, test_recipes=("vanilla", "advprop", "fast_advprop"),
                  peer_compile=False, peer_reserve_s=0.0, tests_reserve_s=0.0,
                  time_budget_s=3600.0,
                  dry_run=True)
    values.update(overrides)
    return Plan(**values)


def only_models(plan, names):
    """`plan` with only the models named (ValueError naming an unknown one)."""
    known = [m.model_name for m in plan.models]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--models={','.join(unknown)}: not in this plan ({', '.join(known)})")
    return dataclasses.replace(plan, models=tuple(m for m in plan.models
                                                  if m.model_name in names))


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def is_out_of_memory(error):
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# -------------------------------------------------------------------- environment
def _version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def accelerator():
    """The first non-CPU JAX device, or None."""
    import jax

    return next((d for d in jax.local_devices() if d.platform != "cpu"), None)


def environment():
    """Versions, JAX's devices and the variables that steer XLA, of this process."""
    import jax
    import keras

    devices = []
    for device in jax.local_devices():
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 -- CPUs report none
            limit = None
        devices.append({"id": device.id, "platform": device.platform,
                        "kind": device.device_kind,
                        "memory_gib": round(limit / GIB, 2) if limit else None})
    env = {
        "python": platform.python_version(), "platform": platform.platform(),
        "backend": keras.backend.backend(), "jax": jax.__version__,
        "versions": {name: _version(name) for name in (
            "jax", "jaxlib", "keras", "numpy", "optree", "Pillow", "torch", "timm")},
        "cpu_cores": os.cpu_count(), "devices": devices,
        "accelerator": accelerator().device_kind if accelerator() else None,
        "tensorflow_importable": _importable("tensorflow"),
        "variables": {k: os.environ[k] for k in (
            "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "XLA_FLAGS", "KERAS_BACKEND",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")
            if k in os.environ},
    }
    env["nvidia_smi"] = nvidia_smi()
    return env


def nvidia_smi():
    """nvidia-smi's name, memory and driver of each GPU (one CSV line each), or None."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        return smi.stdout.strip() if smi.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _importable(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# -------------------------------------------------------------- accelerator tests
def _test_recipe(name, plan):
    """(recipe, model name, model kwargs) of a test step. The attack is cut to one
    iteration: a signed step turns a pixel whose input gradient is ~0 into +-step
    either way on the two devices, and over many steps a few pixels end elsewhere."""
    from efficientnet_advprop.tools.step_configs import make_benchmark_recipe

    recipe = make_benchmark_recipe(name, TEST_CLASSES, plan.test_batch_size,
                                   max_attack_iterations=1)
    model_name, kwargs = plan.test_nf_model if recipe.normalizer_free_only else plan.test_model
    return recipe, model_name, kwargs


def xla_flops(stage):
    """XLA's count of the floating-point operations of a lowered or compiled jitted
    function (its `cost_analysis()`), or None where the backend reports none."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None


def random_batch(recipe, batch, image_size, num_classes, seed=0):
    """A fixed random batch, as numpy: (images, labels[, extras])."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int32)
    extras = {}
    if recipe.needs_source_tags:
        extras["source_tags"] = (np.arange(batch) % 2).astype(np.int32)
    if "tda" in recipe.input_views:
        extras["tda_images"] = images[:, :, ::-1].copy()
    return (images, labels, extras) if extras else (images, labels)


def _trainer(recipe, model_name, model_kwargs, image_size, batch, precision, device,
             num_classes, *, optimizer="rmsprop", weight_decay=1e-5, ema=0.9999):
    from efficientnet_advprop.models import build_model
    from efficientnet_advprop.training.jax_engine import JaxTrainer
    from efficientnet_advprop.training.loop import TrainConfig

    def model_fn():  # as the engines' benchmarks build it
        if recipe.normalizer_free_only:
            return build_model(model_name, num_classes, image_size=image_size,
                               **model_kwargs)
        return build_model(model_name, num_classes, image_size=image_size,
                           normalizer="split_batch_norm", num_aux=recipe.num_aux,
                           **model_kwargs)

    config = TrainConfig(model_dir=os.devnull, train_steps=10 ** 9, global_batch_size=batch,
                         steps_per_epoch=100, optimizer=optimizer, lr_schedule="cosine",
                         lr_warmup_epochs=0.0, weight_decay=weight_decay,
                         moving_average_decay=ema, precision=precision, seed=0,
                         checkpoint_every_steps=10 ** 9, summary_every_steps=10 ** 9)
    return JaxTrainer(model_fn, recipe, config, devices=[device])


def test_step(name, plan, precision, device):
    """One jitted SGD step of recipe `name` on `device` -> {loss, update (flat float32
    numpy), init_checksum, seconds}."""
    import jax
    import keras

    recipe, model_name, kwargs = _test_recipe(name, plan)
    batch = plan.test_batch_size
    start = time.perf_counter()
    with jax.default_device(device), jax.default_matmul_precision(
            "highest" if precision == "float32" else "default"):
        keras.utils.set_random_seed(0)
        trainer = _trainer(recipe, model_name, kwargs, plan.test_image_size, batch,
                           precision, device, TEST_CLASSES, optimizer="sgd",
                           weight_decay=0.0, ema=0.0)
        before = [np.asarray(v, np.float32) for v in trainer.state["trainable"]]
        inputs = jax.device_put(jax.tree_util.tree_map(
            lambda x: x[None], random_batch(recipe, batch, plan.test_image_size,
                                            TEST_CLASSES)), device)
        state, (losses, _) = trainer._loop_fn(1)(trainer.state, inputs, np.int32(0),
                                                 trainer.run_seed)
        after = [np.asarray(v, np.float32) for v in state["trainable"]]
    update = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    return {"loss": float(np.asarray(losses, np.float32)[0]), "update": update,
            "init_checksum": float(sum(np.abs(b).sum() for b in before)),
            "model": model_name, "seconds": time.perf_counter() - start}


def test_recipe_names(plan):
    from efficientnet_advprop.recipes import RECIPES

    return list(plan.test_recipes or RECIPES)


def reference_main(plan_json, out_path):
    """The child process: every test recipe's float32 step on the CPU -> npz."""
    import jax

    plan = plan_from_json(plan_json)
    cpu = jax.devices("cpu")[0]
    arrays, errors = {}, {}
    for name in test_recipe_names(plan):
        try:
            out = test_step(name, plan, "float32", cpu)
        except Exception as e:  # noqa: BLE001 -- reported per recipe
            errors[name] = _first_line(e)
            continue
        arrays[f"{name}/update"] = out["update"]
        arrays[f"{name}/loss"] = np.float64(out["loss"])
        arrays[f"{name}/init_checksum"] = np.float64(out["init_checksum"])
    arrays["errors"] = np.array(json.dumps(errors))
    np.savez(out_path + ".tmp.npz", **arrays)
    os.replace(out_path + ".tmp.npz", out_path)


def plan_to_json(plan):
    return json.dumps(dataclasses.asdict(plan))


def plan_from_json(text):
    values = json.loads(text)
    values["models"] = tuple(ModelPlan(**{**m, "configs": tuple(m["configs"])})
                             for m in values["models"])
    for key in ("precisions", "test_model", "test_nf_model", "test_recipes"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return Plan(**values)


class Reference:
    """The CPU reference steps, computed by a child process started now."""

    def __init__(self, plan, out_dir):
        self.path = os.path.join(out_dir, "cpu_reference.npz")
        self.log_path = os.path.join(out_dir, "cpu_reference.log")
        env = dict(os.environ, JAX_PLATFORMS="cpu", KERAS_BACKEND="jax")
        env.pop("XLA_FLAGS", None)  # one host device, whatever the parent was given
        self._log = open(self.log_path, "w")
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "efficientnet_advprop.tools.jax_device_check",
             "--reference", self.path, plan_to_json(plan)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def result(self, timeout_s):
        """({key: array}, None) or (None, why)."""
        try:
            self.process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None, f"the CPU reference did not finish in {timeout_s:.0f} s"
        finally:
            self._log.close()
        if self.process.returncode != 0 or not os.path.exists(self.path):
            with open(self.log_path) as f:
                tail = f.read()[-500:].strip().splitlines()
            return None, (f"the CPU reference failed (exit {self.process.returncode}): "
                          f"{tail[-1] if tail else ''}")
        return dict(np.load(self.path)), None


def compare(device_out, reference, name, precision, plan):
    """One test row: the device's step against the CPU's float32 step."""
    tolerance, min_cosine = ((plan.float32_tolerance, plan.float32_min_cosine)
                             if precision == "float32"
                             else (plan.bfloat16_tolerance, plan.bfloat16_min_cosine))
    ref_loss = float(reference[f"{name}/loss"])
    ref_update = reference[f"{name}/update"]
    got = device_out["update"]
    cosine = float(got @ ref_update / max(1e-30, np.linalg.norm(got) *
                                          np.linalg.norm(ref_update)))
    loss_diff = abs(device_out["loss"] - ref_loss) / max(1e-12, abs(ref_loss))
    same_start = abs(device_out["init_checksum"] - float(reference[f"{name}/init_checksum"]))
    same_start = same_start <= 1e-5 * float(reference[f"{name}/init_checksum"])
    passed = same_start and loss_diff <= tolerance and cosine >= min_cosine
    return {"recipe": name, "precision": precision, "model": device_out["model"],
            "outcome": "passed" if passed else "failed", "loss": device_out["loss"],
            "cpu_loss": ref_loss, "loss_relative_difference": loss_diff,
            "update_cosine": cosine, "same_initial_weights": same_start,
            "bounds": {"loss_relative": tolerance, "min_cosine": min_cosine},
            "seconds": round(device_out["seconds"], 2)}


def accelerator_tests(plan, device, deadline, log):
    """The device side of the tests, each recipe while `deadline` allows (the others
    are reported as skipped); compared by `finish_tests` once the reference is done."""
    outs, errors = {}, []
    for name in test_recipe_names(plan):
        for precision in ("float32", "bfloat16"):
            if time.perf_counter() > deadline:
                errors.append({"recipe": name, "precision": precision,
                               "outcome": "skipped", "error": "time budget"})
                continue
            try:
                outs[(name, precision)] = test_step(name, plan, precision, device)
            except Exception as e:  # noqa: BLE001 -- reported per recipe
                errors.append({"recipe": name, "precision": precision,
                               "outcome": "error", "error": _first_line(e)})
        log(f"tests: {name} on {device.device_kind}")
    return outs, errors


def finish_tests(plan, outs, errors, reference, timeout_s):
    ref, why = reference.result(timeout_s)
    rows = list(errors)
    if ref is None:
        rows += [{"recipe": n, "precision": p, "outcome": "error", "error": why}
                 for (n, p) in outs]
    else:
        ref_errors = json.loads(str(ref["errors"]))
        for (name, precision), out in outs.items():
            if name in ref_errors:
                rows.append({"recipe": name, "precision": precision, "outcome": "error",
                             "error": f"CPU reference: {ref_errors[name]}"})
            else:
                rows.append(compare(out, ref, name, precision, plan))
    counts = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    return {"rows": rows, "counts": counts,
            "reference_seconds": round(time.perf_counter() - reference.start, 1)}


# ---------------------------------------------------------------------- benchmark
class JaxCase:
    """One configuration of our engine, compiled and warmed up: `step()` runs (and
    waits for) one training step."""

    engine = "jax"

    def __init__(self, config_name, model, batch, precision, device, warmup):
        import jax
        import keras

        from efficientnet_advprop.tools.step_configs import (drawn_batch_size,
                                                             make_benchmark_recipe,
                                                             parse_config)

        self.name = config_name
        self.batch = drawn_batch_size(parse_config(config_name)[0], batch)
        recipe = make_benchmark_recipe(config_name, NUM_CLASSES, self.batch)
        self.passes = recipe.passes_per_image()
        self.description = recipe.describe()
        start = time.perf_counter()
        with jax.default_device(device):
            keras.utils.set_random_seed(0)
            self.trainer = _trainer(recipe, model.model_name, model.model_kwargs,
                                    model.image_size, self.batch, precision, device,
                                    NUM_CLASSES)
            self.inputs = jax.device_put(jax.tree_util.tree_map(
                lambda x: x[None], random_batch(recipe, self.batch, model.image_size,
                                                NUM_CLASSES)), device)
        self.build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        lowered = self.trainer._loop_fn(1).lower(self.trainer.state, self.inputs,
                                                 np.int32(0), self.trainer.run_seed)
        self.fn = lowered.compile()
        self.compile_seconds = time.perf_counter() - start
        self.flops = None  # XLA's count of the step's floating-point operations
        try:
            self.flops = xla_flops(self.fn)
        except Exception:  # noqa: BLE001 -- not every backend reports it
            pass
        self.memory_gib = None
        try:
            m = self.fn.memory_analysis()
            if m is not None:
                self.memory_gib = (m.argument_size_in_bytes + m.output_size_in_bytes +
                                   m.temp_size_in_bytes - m.alias_size_in_bytes) / GIB
        except Exception:  # noqa: BLE001 -- not every backend reports it
            pass
        self.count = 0
        self.warm_step_seconds = 0.0
        for _ in range(max(1, warmup)):
            start = time.perf_counter()
            self.step()
            self.warm_step_seconds = time.perf_counter() - start

    def step(self):
        self.trainer.state, (losses, _) = self.fn(self.trainer.state, self.inputs,
                                                  np.int32(self.count), self.trainer.run_seed)
        self.count += 1
        self.last_loss = float(np.asarray(losses, np.float32)[0])
        return self.last_loss

    def release(self):
        self.trainer = self.fn = self.inputs = None


class TorchPeer:
    """timm's `model.peer` training step in PyTorch, as its users run it: bfloat16
    autocast, channels-last, torch.compile (unless `compile=False`), SGD with
    momentum, cross-entropy; `step()` waits for the device."""

    engine = "torch"

    def __init__(self, model, batch, warmup, compile_model=True):
        import timm
        import torch

        self.torch = torch
        self.name = f"timm {model.peer}"
        self.batch = batch
        self.passes = 1.0
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {"num_classes": NUM_CLASSES, **model.peer_kwargs}
        self.description = (f"timm.create_model({model.peer!r}), torch {torch.__version__}, "
                            f"{'torch.compile, ' if compile_model else ''}bfloat16 autocast, "
                            "channels-last, SGD momentum 0.9")
        torch.manual_seed(0)
        net = timm.create_model(model.peer, **kwargs).to(self.device)
        self.net = net.to(memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.forward = torch.compile(self.net) if compile_model else self.net
        generator = torch.Generator().manual_seed(0)
        size = model.image_size
        self.images = (torch.rand(batch, 3, size, size, generator=generator) * 255.0).to(
            self.device).contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, kwargs["num_classes"], (batch,),
                                    generator=generator).to(self.device)
        self.build_seconds = 0.0
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.step()  # compilation
        self.compile_seconds = time.perf_counter() - start
        for _ in range(warmup):
            self.step()
        self.memory_gib = (torch.cuda.max_memory_allocated() / GIB
                           if self.device == "cuda" else None)

    def step(self):
        torch = self.torch
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(self.forward(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    def release(self):
        self.net = self.forward = self.optimizer = self.images = None
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def _passes_guess(name):
    """Relative cost of a configuration's step (and compilation), for the budget."""
    if name.startswith("advprop_pgd"):
        return int(name[len("advprop_pgd"):]) + 2.0
    return 1.2 if name == "fast_advprop" else 1.0


def peer_available():
    """None when torch and timm import, else why not."""
    missing = [name for name in ("torch", "timm") if not _importable(name)]
    return f"{' and '.join(missing)} not importable" if missing else None


def time_rounds(cases, repeats, steps):
    """{case index: [seconds per step of each round]}: every case `steps` steps per
    round, the order rotated each round so drift falls on all alike."""
    timings = {i: [] for i in range(len(cases))}
    for round_index in range(repeats):
        order = list(range(len(cases)))
        shift = round_index % len(cases)
        for i in order[shift:] + order[:shift]:
            start = time.perf_counter()
            for _ in range(steps):
                cases[i].step()
            timings[i].append((time.perf_counter() - start) / steps)
    return timings


def _group(plan, model, precision, device, deadline, log, with_peer):
    """Builds and times one (model, precision) group; halves the batch when the
    device runs out of memory. -> result dict."""
    batch = plan.batch_size
    result = {"model": model.model_name, "image_size": model.image_size,
              "precision": precision, "model_kwargs": dict(model.model_kwargs),
              "rows": [], "skipped": [], "errors": [], "out_of_memory": []}
    while True:
        cases, oom = [], None
        try:
            for name in model.configs:
                now = time.perf_counter()
                if cases:
                    # what the configurations built so far cost, scaled by the passes
                    scale = _passes_guess(name) / _passes_guess(cases[0].name)
                    need = scale * (max(c.compile_seconds for c in cases) + (
                        plan.warmup + plan.repeats * plan.steps) * max(
                        c.warm_step_seconds for c in cases))
                    if now + need > deadline:
                        result["skipped"].append({"config": name, "reason": (
                            f"time budget: about {need:.0f} s to compile and time it, "
                            f"{max(0.0, deadline - now):.0f} s left")})
                        continue
                elif now > deadline:
                    result["skipped"].append({"config": name, "reason": "time budget"})
                    continue
                try:
                    case = JaxCase(name, model, batch, precision, device, plan.warmup)
                except Exception as e:  # noqa: BLE001 -- per configuration
                    if is_out_of_memory(e):
                        raise
                    result["errors"].append({"config": name, "error": _first_line(e)})
                    continue
                cases.append(case)
                log(f"benchmark: {model.model_name} {precision} {name}: compiled in "
                    f"{case.compile_seconds:.1f} s")
            if with_peer and cases:
                why = peer_available()
                if why:
                    result["peer_skipped"] = why
                else:
                    try:
                        cases.append(TorchPeer(model, batch, plan.warmup,
                                               compile_model=plan.peer_compile))
                        log(f"benchmark: peer {model.peer}: compiled in "
                            f"{cases[-1].compile_seconds:.1f} s")
                    except Exception as e:  # noqa: BLE001 -- the peer is optional
                        if is_out_of_memory(e):
                            raise
                        result["peer_error"] = _first_line(e)
            timings = time_rounds(cases, plan.repeats, plan.steps) if cases else {}
        except Exception as e:  # noqa: BLE001 -- out of memory: retry smaller
            if not is_out_of_memory(e):
                for case in cases:
                    case.release()
                raise
            oom = _first_line(e)
        if oom is None:
            break
        for case in cases:
            case.release()
        gc.collect()  # the device buffers go with their last reference
        result["out_of_memory"].append({"batch_size": batch, "error": oom})
        batch //= 2
        if batch < plan.min_batch_size:
            result["errors"].append({"config": "*", "error": "out of device memory down "
                                     f"to batch {batch * 2}"})
            return result
        log(f"benchmark: {model.model_name} {precision}: out of memory, batch {batch}")
    result["batch_size"] = batch
    seconds = {i: statistics.median(t) for i, t in timings.items()}
    vanilla = next((i for i, c in enumerate(cases)
                    if c.engine == "jax" and c.name == "vanilla"), None)
    peer = next((i for i, c in enumerate(cases) if c.engine == "torch"), None)
    for i, case in enumerate(cases):
        per_image = seconds[i] / case.batch
        row = {"config": case.name, "engine": case.engine, "batch": case.batch,
               "seconds_per_step": seconds[i], "rounds": timings[i],
               "images_per_second": case.batch / seconds[i],
               "compile_seconds": round(case.compile_seconds, 2),
               "memory_gib": (round(case.memory_gib, 3)
                              if case.memory_gib is not None else None),
               "cost_model": case.passes, "description": case.description,
               "ratio_to_vanilla": None, "throughput_vs_peer": None,
               "gflop_per_image": None, "flop_ratio_to_vanilla": None,
               "tflop_per_second": None}
        flops = getattr(case, "flops", None)
        if flops:
            row["gflop_per_image"] = flops / case.batch / 1e9
            row["tflop_per_second"] = flops / seconds[i] / 1e12
        if vanilla is not None:
            row["ratio_to_vanilla"] = per_image / (seconds[vanilla] / cases[vanilla].batch)
            if flops and cases[vanilla].flops:
                row["flop_ratio_to_vanilla"] = ((flops / case.batch) /
                                                (cases[vanilla].flops / cases[vanilla].batch))
        if peer is not None and case.engine == "jax":
            row["throughput_vs_peer"] = ((case.batch / seconds[i]) /
                                         (cases[peer].batch / seconds[peer]))
        result["rows"].append(row)
    for case in cases:
        case.release()
    gc.collect()
    return result


def benchmark(plan, device, deadline, log):
    import jax

    start = time.perf_counter()
    groups = []
    order = [(p, m) for p in plan.precisions for m in plan.models]
    for index, (precision, model) in enumerate(order):
        # the time left, shared by the groups still to come by their configurations
        left = sum(len(m.configs) for _, m in order[index:])
        group_deadline = time.perf_counter() + (deadline - time.perf_counter()) * (
            len(model.configs) / left)
        with_peer = bool(plan.peer and model.peer and precision == "bfloat16")
        if time.perf_counter() > deadline:
            groups.append({"model": model.model_name, "precision": precision, "rows": [],
                           "skipped": [{"config": "*", "reason": "time budget"}],
                           "errors": [], "out_of_memory": []})
            continue
        groups.append(_group(plan, model, precision, device, group_deadline, log,
                             with_peer))
    peak = None
    try:
        peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001
        pass
    return {"steps_per_round": plan.steps, "repeats": plan.repeats, "warmup": plan.warmup,
            "clean_batch_size": plan.batch_size, "device": device.device_kind,
            "jax": jax.__version__, "process_peak_memory_gib":
                round(peak / GIB, 3) if peak else None,
            "seconds": round(time.perf_counter() - start, 1), "groups": groups}


# ----------------------------------------------------------------------- findings
def findings(report):
    lines = []
    for group in report["benchmark"]["groups"] if report.get("benchmark") else []:
        where = f"{group['model']} {group['precision']}"
        for row in group["rows"]:
            if row["config"] == "fast_advprop" and row["ratio_to_vanilla"] is not None:
                ratio = row["ratio_to_vanilla"]
                verdict = "within" if ratio <= FAST_ADVPROP_TARGET else "OVER"
                counted = row.get("flop_ratio_to_vanilla")
                lines.append(f"{where}: Fast AdvProp costs {ratio:.2f}x vanilla per image "
                             f"({verdict} the {FAST_ADVPROP_TARGET}x target; cost model "
                             f"{row['cost_model']:.2f}x"
                             + (f", XLA's operation count {counted:.2f}x" if counted else "")
                             + ")")
                if counted and ratio > 1.1 * counted:
                    lines.append(f"{where}: Fast AdvProp's time per image exceeds its "
                                 f"share of operations by {ratio / counted:.2f}x: the "
                                 "excess is overhead (kernels at low occupancy, data "
                                 "movement), not arithmetic")
            if row["throughput_vs_peer"] is not None:
                lines.append(f"{where}: {row['config']} runs at "
                             f"{row['throughput_vs_peer']:.2f}x the img/s of the PyTorch "
                             "peer's vanilla step")
        for item in group["skipped"]:
            lines.append(f"{where}: {item['config']} skipped ({item['reason']})")
        for item in group["errors"]:
            lines.append(f"{where}: {item['config']} failed: {item['error']}")
        for key in ("peer_skipped", "peer_error"):
            if group.get(key):
                lines.append(f"{where}: no PyTorch peer ({group[key]})")
    tests = report.get("tests") or {}
    for row in tests.get("rows", []):
        if row["outcome"] != "passed":
            detail = row.get("error") or (
                f"loss {row['loss_relative_difference']:.2g} relative, update cosine "
                f"{row['update_cosine']:.5f}")
            lines.append(f"test {row['recipe']} {row['precision']}: {row['outcome']} "
                         f"({detail})")
    if tests.get("skipped"):
        lines.append(f"accelerator tests skipped: {tests['skipped']}")
    return lines


def _num(value, fmt=".2f"):
    return "-" if value is None else format(value, fmt)


def markdown(report):
    env, meta = report["environment"], report["meta"]
    out = [f"# Device check (JAX engine): {env['accelerator'] or 'no accelerator (CPU)'}",
           "", f"{meta['date']}, git {meta['git_revision']}, "
           f"{'dry run, ' if meta['dry_run'] else ''}{meta['seconds']:.0f} s in all. "
           f"Command: `{meta['command']}`", "", "## Environment", "",
           f"- jax {env['jax']}, keras {env['versions']['keras']}, numpy "
           f"{env['versions']['numpy']}, torch {env['versions']['torch'] or '-'}, timm "
           f"{env['versions']['timm'] or '-'}; Python {env['python']}, {env['cpu_cores']} "
           "CPU cores", f"- devices: " + ", ".join(
               f"{d['platform']}:{d['id']} {d['kind']}"
               + (f" ({d['memory_gib']} GiB)" if d["memory_gib"] else "")
               for d in env["devices"]),
           f"- nvidia-smi: {env.get('nvidia_smi') or '-'}", ""]
    tests = report.get("tests") or {}
    out += ["## Accelerator tests: each recipe's jitted step, device against CPU", ""]
    if tests.get("skipped"):
        out += [f"Skipped: {tests['skipped']}", ""]
    else:
        out += [f"Outcomes: {tests['counts']} (CPU reference: "
                f"{tests['reference_seconds']} s, in a child process).", "",
                "| recipe | precision | outcome | loss (device / CPU) | rel. diff | "
                "update cosine |", "|---|---|---|---|---:|---:|"]
        for row in tests["rows"]:
            if row["outcome"] in ("error", "skipped"):
                out.append(f"| {row['recipe']} | {row['precision']} | {row['outcome']}: "
                           f"{row['error']} | | | |")
            else:
                out.append(f"| {row['recipe']} | {row['precision']} | {row['outcome']} | "
                           f"{row['loss']:.4f} / {row['cpu_loss']:.4f} | "
                           f"{row['loss_relative_difference']:.2g} | "
                           f"{row['update_cosine']:.5f} |")
        out.append("")
    bench = report.get("benchmark")
    if bench:
        out += ["## Train-step benchmark", "",
                f"{bench['clean_batch_size']} clean images per step (Fast AdvProp draws "
                f"more), {bench['repeats']} interleaved rounds of "
                f"{bench['steps_per_round']} steps, median; ratio = time per drawn image "
                "over vanilla's (the cost per epoch); vs peer = img/s over the PyTorch "
                "peer's; FLOP ratio = XLA's operation count per drawn image over "
                "vanilla's, TFLOP/s = that count over the measured time; memory = XLA's "
                "analysis of the compiled step (torch: its allocator's peak). Process "
                f"peak: {_num(bench['process_peak_memory_gib'])} GiB.", "",
                "| model | precision | config | batch | img/s | ratio | cost model | "
                "FLOP ratio | TFLOP/s | vs peer | compile s | memory GiB |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for group in bench["groups"]:
            for row in group["rows"]:
                out.append(f"| {group['model']} | {group['precision']} | {row['config']} | "
                           f"{row['batch']} | {row['images_per_second']:.1f} | "
                           f"{_num(row['ratio_to_vanilla'])} | {row['cost_model']:.2f} | "
                           f"{_num(row.get('flop_ratio_to_vanilla'))} | "
                           f"{_num(row.get('tflop_per_second'))} | "
                           f"{_num(row['throughput_vs_peer'])} | "
                           f"{row['compile_seconds']:.1f} | {_num(row['memory_gib'])} |")
        out.append("")
    out += ["## Findings", ""] + [f"- {line}" for line in report["findings"] or ["none"]]
    return "\n".join(out) + "\n"


def _git_revision():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(plan, out_dir, command="", log=print):
    """The whole check -> the report dict (also written to out_dir)."""
    import jax

    start = time.perf_counter()
    deadline = start + plan.time_budget_s
    os.makedirs(out_dir, exist_ok=True)
    device = accelerator() or jax.local_devices()[0]
    reference = Reference(plan, out_dir) if plan.run_tests else None
    report = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       "git_revision": _git_revision(), "command": command,
                       "dry_run": plan.dry_run, "plan": json.loads(plan_to_json(plan)),
                       "engine": "jax"},
              "environment": environment()}
    log(f"device: {device.device_kind} ({device.platform})")
    # The benchmark first (the most wanted figures), then the device side of the tests
    # in the time kept for them; the CPU reference runs beside both.
    bench_deadline = deadline - (plan.peer_reserve_s if plan.peer else 0.0) - (
        plan.tests_reserve_s if plan.run_tests else 0.0)
    report["benchmark"] = benchmark(plan, device, bench_deadline, log)
    if reference is not None:
        outs, errors = accelerator_tests(plan, device, deadline, log)
        report["tests"] = finish_tests(plan, outs, errors, reference,
                                       deadline - time.perf_counter() + 60.0)
    else:
        report["tests"] = {"skipped": "--notests"}
    report["meta"]["seconds"] = time.perf_counter() - start
    report["findings"] = findings(report)
    write_report(report, out_dir)
    return report


def write_report(report, out_dir):
    with open(os.path.join(out_dir, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=1, default=float)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_MD), "w") as f:
        f.write(markdown(report))


if __name__ == "__main__":  # the CPU reference child: --reference OUT PLAN_JSON
    # It needs no TensorFlow: blocked, as on the GPU machines (keras.utils
    # .set_random_seed would otherwise import it where it is installed).
    sys.modules.setdefault("tensorflow", None)
    if len(sys.argv) != 4 or sys.argv[1] != "--reference":
        raise SystemExit("usage: python -m efficientnet_advprop.tools.jax_device_check "
                         "--reference OUT.npz PLAN_JSON")
    reference_main(sys.argv[3], sys.argv[2])
