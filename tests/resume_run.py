"""Crash-resume scenarios of one AdvProp run on the embedded data at the embedded preset's
batch (64), in a fresh process (enable_determinism must come before TensorFlow starts):

    python tests/resume_run.py OUT [--no_determinism] [--model=tiny] [--steps=6 --every=2]

OUT/straight is an uninterrupted run of --steps steps with a checkpoint every --every.
Its directory is copied right after the checkpoints at `every` and `2 * every`, which is
all a process killed at that moment leaves on disk (a kill anywhere before the next
checkpoint leaves the same files: nothing else is written in between). Each scenario
starts from one of those copies, arranged as the kill left it, and runs the same
configuration to the end in OUT/<scenario>:

  after_checkpoint  killed right after checkpoint `every` (or anywhere in the steps
                    after it, mid-step included);
  during_write      killed while checkpoint 2*every was being written: its temporary
                    shard directory and a partial data file exist, the `checkpoint`
                    state file still names checkpoint `every`;
  truncated_data    the newest named checkpoint's data file is cut in half (a machine
                    lost before its data reached the disk): restore falls back;
  missing_index     the newest named checkpoint has no index: restore falls back.

OUT/result.json: {scenario: restored step}. With --twice, OUT/straight2 is a second
uninterrupted run (the reproducibility check without resuming).
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# This checkout's package, not another installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED = 3
BATCH = 64  # the embedded preset's --train_batch_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--no_determinism", action="store_true")
    parser.add_argument("--model", default="tiny", choices=["tiny", "resnet-26-cifar"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--scenarios", default="after_checkpoint,during_write,"
                        "truncated_data,missing_index")
    parser.add_argument("--twice", action="store_true")
    args = parser.parse_args()

    from efficientnet_advprop.training import enable_determinism, set_global_seed

    if not args.no_determinism:
        enable_determinism(SEED)  # before anything starts TensorFlow's runtime

    import tensorflow as tf

    from efficientnet_advprop import build_model, data
    from efficientnet_advprop.attacks import AttackConfig
    from efficientnet_advprop.recipes import make_recipe
    from efficientnet_advprop.training import TrainConfig, Trainer

    info = data.resolve_dataset()
    steps_per_epoch = info.num_train // BATCH

    def model_fn():
        if args.model == "tiny":
            return build_model("efficientnet-b0", 10, image_size=32, width_coefficient=0.25,
                               depth_coefficient=0.25, normalizer="split_batch_norm",
                               num_aux=1, dropout_rate=0.1, survival_prob=0.8)
        return build_model("resnet-26-cifar", 10, image_size=32, preprocessing="advprop",
                           width_multiplier=0.125, normalizer="split_batch_norm",
                           num_aux=1, dropout_rate=0.1)

    def dataset_fn(ctx, start_step):
        return data.make_dataset(info, None, "train",
                                 batch_size=ctx.get_per_replica_batch_size(BATCH),
                                 image_size=32, is_training=True, seed=SEED,
                                 start_step=start_step, input_context=ctx,
                                 options=data.InputOptions(augmentation="cifar"))

    def trainer(model_dir):
        set_global_seed(SEED)  # the same initial weights in every "process"
        config = TrainConfig(
            model_dir=str(model_dir), train_steps=args.steps, global_batch_size=BATCH,
            steps_per_epoch=steps_per_epoch, base_learning_rate=0.008,
            lr_warmup_epochs=0.3, lr_decay_epochs=1.0, lr_decay_factor=0.8,
            moving_average_decay=0.999, seed=SEED, checkpoint_every_steps=args.every,
            summary_every_steps=args.every)
        recipe = make_recipe("advprop", 10, attack=AttackConfig(epsilon=1.0))
        return Trainer(tf.distribute.get_strategy(), model_fn, recipe, config)

    out = args.out
    every = args.every
    straight = os.path.join(out, "straight")

    def snapshot(t):
        step = int(t.step.numpy())
        if step in (every, 2 * every):
            t._summary_writer().flush()
            shutil.copytree(straight, os.path.join(out, f"at_{step}"))

    trainer(straight).train(dataset_fn, on_checkpoint=snapshot)
    if args.twice:
        trainer(os.path.join(out, "straight2")).train(dataset_fn)

    def prefix(directory, step):
        return os.path.join(directory, f"ckpt-{step}")

    restored = {}
    for scenario in args.scenarios.split(","):
        run_dir = os.path.join(out, scenario)
        if scenario == "after_checkpoint":
            shutil.copytree(os.path.join(out, f"at_{every}"), run_dir)
        elif scenario == "during_write":
            shutil.copytree(os.path.join(out, f"at_{every}"), run_dir)
            # What TF has written of checkpoint 2*every when the kill comes mid-save:
            # the temporary shard directory with a partial data file; the index, the
            # renamed data file and the `checkpoint` state come later.
            source = prefix(os.path.join(out, f"at_{2 * every}"), 2 * every)
            temp = prefix(run_dir, 2 * every) + "_temp"
            os.makedirs(temp)
            with open(source + ".data-00000-of-00001", "rb") as f:
                half = f.read()[: os.path.getsize(source + ".data-00000-of-00001") // 2]
            with open(os.path.join(temp, "part-00000-of-00001.data-00000-of-00001"),
                      "wb") as f:
                f.write(half)
        elif scenario in ("truncated_data", "missing_index"):
            shutil.copytree(os.path.join(out, f"at_{2 * every}"), run_dir)
            newest = prefix(run_dir, 2 * every)
            if scenario == "truncated_data":
                data_file = newest + ".data-00000-of-00001"
                size = os.path.getsize(data_file)
                with open(data_file, "r+b") as f:
                    f.truncate(size // 2)
            else:
                os.remove(newest + ".index")
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        resumed = trainer(run_dir)
        restored[scenario] = resumed.restore()
        resumed.train(dataset_fn)
        print(f"{scenario}: resumed at step {restored[scenario]}", file=sys.stderr)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(restored, f)


if __name__ == "__main__":
    main()
