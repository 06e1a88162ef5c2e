"""One worker of the 2-process MultiWorkerMirroredStrategy test (or, with
--single, the single-process 2-replica reference). Writes the final weights to OUT.

    TF_CONFIG=... python tests/multiworker_run.py OUT          # one worker
    python tests/multiworker_run.py OUT --single                # the reference
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 3


def main(out, single):
    if single:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    from efficientnet_advprop import build_model
    from efficientnet_advprop.recipes import make_recipe
    from efficientnet_advprop.training import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (GLOBAL_BATCH * STEPS, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, GLOBAL_BATCH * STEPS).astype("int32")

    def dataset_fn(ctx, start_step):
        # Pipeline p of n yields the part of every global batch that replica p gets in
        # the single-process run (where one pipeline's batch is split over replicas).
        per = GLOBAL_BATCH // ctx.num_input_pipelines
        p = ctx.input_pipeline_id
        index = [s * GLOBAL_BATCH + p * per + i for s in range(STEPS) for i in range(per)]
        ds = tf.data.Dataset.from_tensor_slices((images[index], labels[index]))
        return ds.batch(ctx.get_per_replica_batch_size(GLOBAL_BATCH) if
                        ctx.num_input_pipelines == 1 else per)

    def model_fn():
        keras.utils.set_random_seed(0)
        return build_model("resnet-18-cifar", 10, width_multiplier=0.125,
                           normalizer="split_batch_norm", num_aux=0)

    model_dir = out + ".ckpt"
    config = TrainConfig(model_dir=model_dir, train_steps=STEPS,
                         global_batch_size=GLOBAL_BATCH, steps_per_epoch=STEPS,
                         optimizer="momentum", base_learning_rate=0.5, lr_warmup_epochs=0,
                         moving_average_decay=0.0, checkpoint_every_steps=100)
    trainer = Trainer(strategy, model_fn, make_recipe("vanilla", 10), config)
    np.savez(out[:-len(".npz")] + "-initial.npz",
             *[np.asarray(v) for v in trainer.model.get_weights()])
    trainer.train(dataset_fn)
    np.savez(out, *[np.asarray(v) for v in trainer.model.get_weights()])


if __name__ == "__main__":
    main(sys.argv[1], "--single" in sys.argv[2:])
