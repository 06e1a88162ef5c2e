"""Export a JAX-engine run's newest checkpoint with the TensorFlow engine's exporter.

    KERAS_BACKEND=tensorflow python -m efficientnet_advprop.export_checkpoint \\
        --model_dir=runs/b0-advprop --export_dir=export/b0 [--bn_set=main] \\
        [--formats=saved_model,tflite]

The run's saved config (experiment_config.json) rebuilds the model; the weights of
the newest `ckpt-<step>.npz` (EMA averages where the run kept them) are loaded by
layer name (`training.loop.model_variable_map`, the keys both engines use), and
`experiment.export_model` writes the SavedModel (auxiliary BNs stripped,
preprocessing inside) and TFLite files. The JAX engine's `export` runs this in a
child process; its last stdout line is JSON ({"bn_set": ..., "step": ...}).
"""

import argparse
import json
import os
import sys

from efficientnet_advprop.training.loop import load_jax_checkpoint, newest_jax_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--bn_set", default="main", choices=("main", "adversarial"))
    parser.add_argument("--formats", default="saved_model")
    args = parser.parse_args(argv)
    from efficientnet_advprop import config as config_lib, data, experiment
    from efficientnet_advprop.experiment_settings import model_kwargs
    from efficientnet_advprop.models import build_model

    saved = config_lib.load_saved_config(args.model_dir)
    path = newest_jax_checkpoint(args.model_dir)
    if saved is None or path is None:
        print(f"export_checkpoint: error: --model_dir={args.model_dir}: no saved config "
              f"and JAX checkpoint", file=sys.stderr)
        return 2
    where = {k: saved[k] for k in ("dataset", "data_dir", "holdout_shards", "model_dir")
             if saved.get(k) is not None}
    info = data.resolve_dataset(where.get("dataset"), where.get("data_dir"),
                                holdout_shards=where.get("holdout_shards"))
    config = config_lib.resolve(config_lib.reuse_saved(where, saved), info)
    recipe = config.make_recipe()
    model = build_model(config.model.model_name, config.num_classes,
                        **model_kwargs(config, recipe, (False, None)))
    step, ema = load_jax_checkpoint(model, path)
    bn_set = experiment.export_model(model, config, info, recipe, step=step, ema=ema,
                                     export_dir=args.export_dir, bn_set=args.bn_set,
                                     formats=tuple(args.formats.split(",")))
    print(json.dumps({"bn_set": bn_set, "step": step, "checkpoint": os.path.basename(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
