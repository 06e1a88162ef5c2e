"""Runs main.py on the JAX engine, optionally with TensorFlow blocked from import (as
on a machine that has only jax and keras): `python tests/jax_main.py [--block_tf]
<main.py flags>`. The tests start it in a fresh process with KERAS_BACKEND=jax."""

import os
import runpy
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--block_tf":
        sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
        args = args[1:]
    os.environ["KERAS_BACKEND"] = "jax"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    sys.argv = [os.path.join(root, "main.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")
