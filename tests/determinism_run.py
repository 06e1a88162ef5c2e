"""Reproducibility probes in a fresh process (enable_determinism must come before
TensorFlow starts its runtime):

    python tests/determinism_run.py OUT [--no_determinism] [--steps=4] [--repeats=6]

1. The gradient of resnet-26-cifar (width 0.125: the embedded default's AdvProp model)
   on one batch of 128 embedded images -- the joint clean + adversarial forward of the
   embedded preset's batch of 64 -- computed --repeats times with the same weights.
2. Two AdvProp Trainer runs of --steps steps at batch 64 on the embedded data, from the
   same seed, in this process.

Writes OUT/result.json ({"distinct_gradients": how many different results the repeats
gave}) and the final weights of the runs as OUT/run_a.npz, OUT/run_b.npz and the
initial ones as OUT/initial.npz.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# This checkout's package, not another installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED = 5
BATCH = 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--no_determinism", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    from efficientnet_advprop.training import enable_determinism, set_global_seed

    if not args.no_determinism:
        enable_determinism(SEED)

    import numpy as np
    import tensorflow as tf

    from efficientnet_advprop import build_model, data
    from efficientnet_advprop.attacks import AttackConfig
    from efficientnet_advprop.recipes import make_recipe
    from efficientnet_advprop.training import TrainConfig, Trainer

    info = data.resolve_dataset()

    def model_fn(dropout_rate=0.1):
        return build_model("resnet-26-cifar", 10, image_size=32, preprocessing="advprop",
                           width_multiplier=0.125, normalizer="split_batch_norm",
                           num_aux=1, dropout_rate=dropout_rate)

    def dataset_fn(ctx, start_step):
        return data.make_dataset(info, None, "train",
                                 batch_size=ctx.get_per_replica_batch_size(BATCH),
                                 image_size=32, is_training=True, seed=SEED,
                                 start_step=start_step, input_context=ctx,
                                 options=data.InputOptions(augmentation="cifar"))

    os.makedirs(args.out, exist_ok=True)

    # 1. One gradient, computed again and again (no dropout: the same function each
    # call; the BN moving statistics it updates do not enter a training-mode gradient).
    set_global_seed(SEED)
    model = model_fn(dropout_rate=0.0)
    images, labels = next(iter(data.make_dataset(
        info, None, "train", batch_size=2 * BATCH, image_size=32, is_training=True,
        seed=SEED, options=data.InputOptions(augmentation="cifar"))))

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, tf.cast(logits, tf.float32)))
        return [g for g in tape.gradient(loss, model.trainable_variables) if g is not None]

    results = {b"".join(g.numpy().tobytes() for g in gradient())
               for _ in range(args.repeats)}

    # 2. Two short runs.
    for name in ("a", "b"):
        set_global_seed(SEED)
        config = TrainConfig(
            model_dir=os.path.join(args.out, name), train_steps=args.steps,
            global_batch_size=BATCH, steps_per_epoch=info.num_train // BATCH,
            base_learning_rate=0.008, lr_warmup_epochs=0.3, lr_decay_epochs=1.0,
            lr_decay_factor=0.8, moving_average_decay=0.999, seed=SEED,
            checkpoint_every_steps=args.steps, summary_every_steps=args.steps)
        trainer = Trainer(tf.distribute.get_strategy(), model_fn,
                          make_recipe("advprop", 10, attack=AttackConfig(epsilon=1.0)),
                          config)
        if name == "a":
            np.savez(os.path.join(args.out, "initial.npz"),
                     *[v.numpy() for v in trainer.model.weights])
        trainer.train(dataset_fn)
        np.savez(os.path.join(args.out, f"run_{name}.npz"),
                 *[v.numpy() for v in trainer.model.weights]
                 + [s.numpy() for s in trainer.ema.shadows])
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"distinct_gradients": len(results)}, f)


if __name__ == "__main__":
    main()
