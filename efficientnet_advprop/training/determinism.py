"""Reproducible runs: the same command on the same machine gives bitwise the same run.

Without `enable_determinism` every *random decision* of a run is already a function of
the seed and the step (data order and augmentation: `data.make_dataset`; attack noise:
the Trainer's per-step seeds; dropout and drop-connect: Keras seed generators saved in
the checkpoint), but the *arithmetic* is not: TensorFlow runs independent ops of a step
concurrently, and on a CPU with oneDNN (TensorFlow's default x86 build) a convolution's
gradient then sums its partial results in an order that depends on which thread pool
the kernel happened to be called from. The embedded preset's AdvProp step (64 clean +
64 adversarial images through resnet-26-cifar) shows it within a few steps: 1-ulp
differences that training amplifies (a median relative difference of about 3e-4 in
the weights after 10 steps), with or without TF_DETERMINISTIC_OPS=1. Smaller batches
(16 or 32 per step) happened to pick kernels whose sums do not depend on it. On a GPU
the same role is played by kernels with atomic adds.

`enable_determinism(seed)`:
  * seeds Python, NumPy, TensorFlow and Keras (keras.utils.set_random_seed);
  * tf.config.experimental.enable_op_determinism(): deterministic kernels where TF has
    a choice (GPU scatter/segment sums, cuDNN algorithms, XLA), an error from ops that
    have no deterministic version instead of silent noise, and tf.data kept in order;
  * one inter-op thread: the ops of a step run one at a time, so every oneDNN kernel is
    called the same way each run (intra-op parallelism -- the threads *inside* one op
    -- is kept). This must happen before TensorFlow starts its runtime (the first op,
    tf.config.list_logical_devices, a strategy, a dataset): later it raises
    DeterminismError rather than give a run that only looks reproducible.

What it guarantees (measured on CPU: tests/test_determinism.py, tests/test_resume.py):
the same seed, flags, TensorFlow build, hardware and replica count give bitwise
identical checkpoints, and a run killed at any moment and resumed with the same command
ends bitwise identical to an uninterrupted one. Not across machines, TF versions or
replica counts, and not with --skip_bad_records once a bad record was dropped before
the resume point (see efficientnet_advprop.data). GPU and TPU runs rely on TensorFlow's
op determinism (not measured here).
"""

import os

import keras
import tensorflow as tf

from efficientnet_advprop.training.loop import TrainingError

TRUE_VALUES = ("1", "true", "yes", "on")


class DeterminismError(TrainingError):
    """Determinism was asked for too late (TensorFlow's runtime already started with
    parallel inter-op scheduling)."""


def determinism_requested(environ=None):
    """True when the environment asks for deterministic ops (TF_DETERMINISTIC_OPS=1, the
    variable TensorFlow itself reads, which alone is not enough on a CPU)."""
    environ = os.environ if environ is None else environ
    return environ.get("TF_DETERMINISTIC_OPS", "").strip().lower() in TRUE_VALUES


def enable_determinism(seed):
    """Makes this process' training bitwise reproducible (module docstring).

    Call it once, before TensorFlow starts its runtime: before make_strategy,
    data.resolve_dataset/make_dataset, building a model or running any op. Idempotent.

    Raises:
      DeterminismError: the runtime is already running with several inter-op threads.
    """
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        raise DeterminismError(
            "enable_determinism() came after TensorFlow started its runtime with "
            f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'} "
            "inter-op threads; call it before the first op, strategy or dataset (or "
            "set TF_NUM_INTEROP_THREADS=1 in the environment)") from None
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(int(seed))  # Python, NumPy, TensorFlow, Keras

