"""TensorFlow's start-up lines, filtered.

Importing TensorFlow 2.21 prints, before its C++ logging is configured (so
TF_CPP_MIN_LOG_LEVEL cannot hide them), a banner and INFO lines: oneDNN is on, no CUDA
driver was found; and on a machine without a GPU driver, probing the devices prints an
ERROR that cuInit failed. None of it tells a user anything. `import_tensorflow` imports
TensorFlow and probes its devices with file descriptor 2 sent to a temporary file, then
writes back every line except those: a WARNING, an ERROR that is not the no-driver
cuInit failure, a Python traceback all still show. It sets TF_CPP_MIN_LOG_LEVEL=1 (C++
INFO off, warnings on) unless the environment sets it.

The package calls it once, on import, when Keras' backend is TensorFlow (the JAX engine
never imports TensorFlow through it). Probing the devices does not initialise the
runtime: logical devices and threading can still be configured afterwards.
"""

import json
import os
import re
import sys
import tempfile

# An absl C++ log line: severity letter, MMDD, time, thread, file:line].
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w.+-]+:\d+\] ")
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT = "failed call to cuInit"


def keras_backend():
    """The backend Keras will choose: KERAS_BACKEND, else ~/.keras/keras.json's, else
    tensorflow (Keras' own rule, read without importing Keras)."""
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def filtered(text):
    """`text` (captured stderr) without TensorFlow's start-up noise."""
    lines = text.splitlines(keepends=True)
    no_driver = any(_NO_DRIVER in line for line in lines)
    kept = []
    for line in lines:
        if line.rstrip("\n") == _BANNER:
            continue
        match = _ABSL_LINE.match(line)
        if match and match.group(1) == "I":
            continue
        if match and match.group(1) == "E" and _CUINIT in line and no_driver:
            continue
        kept.append(line)
    return "".join(kept)


def import_tensorflow():
    """Imports TensorFlow (and lists its devices) with the start-up noise filtered out
    of stderr. Does nothing when TensorFlow is already imported or is not importable."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedded interpreter): import plainly
        _import_and_probe()
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            _import_and_probe()
        except ImportError:
            failed = True  # Keras reports a missing or broken TensorFlow in its own words
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
        rest = text if failed else filtered(text)
        if rest:
            sys.stderr.write(rest)
            sys.stderr.flush()


def _import_and_probe():
    import tensorflow as tf

    tf.config.list_physical_devices()
