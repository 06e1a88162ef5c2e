"""Choosing a tf.distribute strategy."""

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")


def make_strategy(name="auto", tpu=None, tpu_zone=None, gcp_project=None, devices=None):
    """Returns a tf.distribute.Strategy.

    auto: TPU when `tpu` is given, MultiWorkerMirrored when TF_CONFIG names several
    workers, Mirrored over all GPUs when there is more than one, else the default
    strategy. `tpu` is a TPU name or address, or "local" on a Cloud TPU VM.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if name == "auto":
        if tpu:
            name = "tpu"
        elif _num_workers() > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu or "local", zone=tpu_zone, project=gcp_project)
        if tpu not in (None, "", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else "/cpu:0")
    return tf.distribute.get_strategy()


def _num_workers():
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))
