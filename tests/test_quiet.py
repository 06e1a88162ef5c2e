"""Importing the package hides TensorFlow's start-up noise and nothing else."""

import os
import subprocess
import sys

from efficientnet_advprop.utils.quiet import filtered

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")}
    env["PYTHONPATH"] = REPO_ROOT
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


def test_importing_the_package_prints_no_tensorflow_start_up_lines():
    proc = _run("import efficientnet_advprop\n"
                "import tensorflow as tf\n"
                "print(int(tf.reduce_sum(tf.ones([3]))))\n"
                "import sys; print('a line of our own', file=sys.stderr)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    assert proc.stderr.strip() == "a line of our own", proc.stderr


def test_devices_can_still_be_configured_after_the_import():
    proc = _run("import efficientnet_advprop\n"
                "import tensorflow as tf\n"
                "cpu = tf.config.list_physical_devices('CPU')[0]\n"
                "tf.config.set_logical_device_configuration(\n"
                "    cpu, [tf.config.LogicalDeviceConfiguration()] * 3)\n"
                "print(len(tf.config.list_logical_devices('CPU')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"


def test_the_filter_keeps_warnings_errors_and_tracebacks():
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written "
        "to STDERR\n"
        "I0000 00:00:1796317795.598674   22917 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796317795.599039   22917 cudart_stub.cc:31] Could not find cuda "
        "drivers on your machine, GPU will not be used.\n"
        "W0000 00:00:1796317795.7   22917 gpu_device.cc:12] Cannot dlopen some GPU "
        "libraries.\n"
        "E0000 00:00:1796317799.5   22917 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error\n"
        "E0000 00:00:1796317799.6   22917 other.cc:9] something that matters\n"
        "Traceback (most recent call last):\n"
        "ImportError: libfoo.so\n")
    assert filtered(text) == (
        "W0000 00:00:1796317795.7   22917 gpu_device.cc:12] Cannot dlopen some GPU "
        "libraries.\n"
        "E0000 00:00:1796317799.6   22917 other.cc:9] something that matters\n"
        "Traceback (most recent call last):\n"
        "ImportError: libfoo.so\n")
    # Where a driver was found, a failed cuInit is a real problem and stays.
    with_driver = "E0000 00:00:1.0   1 cuda_platform.cc:52] failed call to cuInit: X\n"
    assert filtered(with_driver) == with_driver
