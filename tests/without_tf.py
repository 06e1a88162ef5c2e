"""Runs a script as a machine without TensorFlow would: `python tests/without_tf.py
SCRIPT [flags]` blocks `import tensorflow` (sys.modules entry None) and sets
KERAS_BACKEND=jax, then runs SCRIPT as __main__. Used by the dry runs of the tools
meant for the GPU machines (only jax, keras, numpy, Pillow; torch and timm)."""

import os
import runpy
import sys

if __name__ == "__main__":
    sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
    os.environ["KERAS_BACKEND"] = "jax"
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
