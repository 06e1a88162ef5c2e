"""Test set-up: two logical CPU devices so tf.distribute strategies run for real.

Under KERAS_BACKEND=jax (the JAX tier: `KERAS_BACKEND=jax python -m pytest
tests/test_core_on_jax.py`) TensorFlow is blocked from import, as on a machine that
has only jax and keras, and XLA gets two host devices so the data-parallel step runs
for real.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ON_JAX = os.environ.get("KERAS_BACKEND") == "jax"

if ON_JAX:
    sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
else:
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data",
                           "cifar10-train-jpeg.tar.gz")

# XLA's cheaper backend settings, for the JAX processes of tests that check what runs,
# not its speed: on this CPU compilation is most of their time (their bounds hold
# with these settings too)
QUICK_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_quick_xla(env):
    """`env` (a dict) with QUICK_XLA added to its XLA_FLAGS."""
    return dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " " + QUICK_XLA).strip())


def run_main(*args, cwd, timeout=600):
    """Runs main.py in a fresh process; returns the CompletedProcess (text output)."""
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "main.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def two_device_strategy():
    import tensorflow as tf

    # One strategy per process, as in real use: two MirroredStrategy objects hand out
    # the same collective instance keys, and the runtime caches a shape per key.
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def read_cifar_slice(per_class, offset=0):
    """(images uint8 [N,32,32,3], labels int32 [N]) from the shared CIFAR-10 tarball."""
    import tarfile

    import numpy as np
    import tensorflow as tf

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck"]
    wanted = {c: [] for c in classes}
    with tarfile.open(SHARED_DATA, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in wanted:
                continue
            bucket = wanted[parts[1]]
            if len(bucket) < per_class + offset:
                bucket.append(tar.extractfile(member).read())
            if all(len(b) >= per_class + offset for b in wanted.values()):
                break
    images, labels = [], []
    for label, name in enumerate(classes):
        for data in wanted[name][offset:offset + per_class]:
            images.append(tf.io.decode_jpeg(data, channels=3).numpy())
            labels.append(label)
    return np.stack(images), np.array(labels, np.int32)


@pytest.fixture(scope="session")
def cifar_small():
    """2,000 training + 500 held-out real CIFAR-10 images (uint8) and labels."""
    images, labels = read_cifar_slice(250)
    train = [i for i in range(len(labels)) if i % 250 < 200]
    held = [i for i in range(len(labels)) if i % 250 >= 200]
    return (images[train], labels[train]), (images[held], labels[held])


@pytest.fixture(scope="session")
def trained_linear_model(cifar_small):
    """A softmax regression on raw pixels, trained for real on CIFAR-10 (~30% acc)."""
    import keras

    (x, y), _ = cifar_small
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1.0 / 255.0, offset=-0.5)(inputs)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype("float32"), y, batch_size=64, epochs=8, verbose=0)
    return model


def assert_keras_round_trip(model, x, path, routes=(0,)):
    """Saves `model` to a `.keras` file, loads it with safe_mode=True and checks that
    inference outputs agree through every BN set in `routes`. Returns the loaded model."""
    import keras
    import numpy as np

    from efficientnet_advprop.layers import bn_route

    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for route in routes:
        with bn_route(route):
            np.testing.assert_allclose(np.asarray(loaded(x, training=False)),
                                       np.asarray(model(x, training=False)),
                                       rtol=1e-5, atol=1e-5)
    return loaded
