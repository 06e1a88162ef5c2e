"""TensorFlow Datasets (TFDS) reader.

``--dataset=tfds:NAME`` reads the TFDS dataset NAME (``NAME`` may carry a
config/version, e.g. ``cifar10/3.0.2``) from ``--data_dir`` (the TFDS data
directory; default ``~/tensorflow_datasets``).  Nothing is ever downloaded or
prepared here: an unprepared dataset is a ValueError.

Split overrides: ``tfds:NAME:TRAIN_SPLIT[:EVAL_SPLIT]`` with TFDS split
syntax, e.g. ``tfds:cifar10:train[:90%]:train[90%:]``.  Defaults: train split
"train", eval split "test" or "validation" (whichever exists).

Features: the image feature and the label feature are taken from the
builder's supervised keys (default "image"/"label"); images are read still
encoded (PNG/JPEG) and go through the shared preprocessing.
"""

import tensorflow as tf

from efficientnet_advprop.data import tfrecord

DEFAULT_EVAL_SPLITS = ("test", "validation")


def _split_outside_brackets(text):
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == ":" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_spec(dataset):
    """'tfds:NAME[:TRAIN[:EVAL]]' -> (name, train split, eval split)."""
    if not dataset.startswith("tfds:"):
        raise ValueError(f"--dataset={dataset}: expected tfds:NAME")
    parts = _split_outside_brackets(dataset[len("tfds:") :])
    if not parts[0] or len(parts) > 3:
        raise ValueError(
            f"--dataset={dataset}: expected " "tfds:NAME[:TRAIN_SPLIT[:EVAL_SPLIT]]"
        )
    train = parts[1] if len(parts) > 1 and parts[1] else None
    evals = parts[2] if len(parts) > 2 and parts[2] else None
    return parts[0], train, evals


def _tfds():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def _data_dir_text(data_dir):
    return data_dir if data_dir else "~/tensorflow_datasets (default)"


def load_builder(dataset, data_dir):
    """Returns (builder, name, train_split, eval_split) for a prepared dataset."""
    tfds = _tfds()
    name, train_split, eval_split = parse_spec(dataset)
    where = _data_dir_text(data_dir)
    if data_dir and not tf.io.gfile.isdir(data_dir):
        raise ValueError(
            f"--data_dir={data_dir}: directory does not exist "
            f"(needed for --dataset={dataset})"
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"--dataset={dataset}: TFDS dataset '{name}' not found/prepared in "
            f"--data_dir={where} ({msg})"
        ) from None
    if not builder.is_prepared():
        raise ValueError(
            f"--dataset={dataset}: TFDS dataset '{name}' is not prepared in "
            f"--data_dir={where}; this code never downloads: run "
            f"`tfds build {name} --data_dir=...` first"
        )
    splits = builder.info.splits
    train_split = train_split or "train"
    if eval_split is None:
        for cand in DEFAULT_EVAL_SPLITS:
            if cand in splits:
                eval_split = cand
                break
    for s in (train_split, eval_split):
        if s is None:
            continue
        try:
            splits[s].num_examples  # pylint: disable=pointless-statement
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(
                f"--dataset={dataset}: split '{s}' not available (splits: "
                f"{sorted(splits)}): {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    return builder, name, train_split, eval_split


def _keys(builder):
    sk = builder.info.supervised_keys
    if sk and len(sk) == 2 and isinstance(sk[0], str) and isinstance(sk[1], str):
        return sk[0], sk[1]
    return "image", "label"


def describe(dataset, data_dir):
    """(num_classes, num_train, num_eval, image_size, class_names)."""
    builder, _, train_split, eval_split = load_builder(dataset, data_dir)
    image_key, label_key = _keys(builder)
    label = builder.info.features[label_key]
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    names = tuple(getattr(label, "names", ()) or ())
    splits = builder.info.splits
    num_train = int(splits[train_split].num_examples)
    num_eval = int(splits[eval_split].num_examples) if eval_split else 0
    shape = getattr(builder.info.features[image_key], "shape", None)
    image_size = 224
    if shape and shape[0] and shape[1]:
        image_size = int(min(shape[0], shape[1]))
    return num_classes, num_train, num_eval, image_size, names


def make_source(
    dataset, data_dir, split, *, input_context=None, is_training=False, cache=False
):
    tfds = _tfds()
    builder, _, train_split, eval_split = load_builder(dataset, data_dir)
    spec = train_split if split == "train" else eval_split
    if spec is None:
        raise ValueError(
            f"--dataset={dataset}: no eval split ('test' or "
            "'validation'); pass tfds:NAME:TRAIN:EVAL"
        )
    num_pipelines, pipeline_id = tfrecord.pipeline_ids(input_context)
    if num_pipelines > 1:
        spec = tfds.even_splits(spec, n=num_pipelines)[pipeline_id]
    count = int(builder.info.splits[spec].num_examples)
    if count == 0:
        raise ValueError(
            f"--dataset={dataset}: no {split} examples for input "
            f"pipeline {pipeline_id} of {num_pipelines}"
        )
    image_key, label_key = _keys(builder)

    def base():
        ds = builder.as_dataset(
            split=spec,
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
        )
        return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

    num_bytes = int(builder.info.splits[spec].num_bytes or 0)
    if is_training and (cache or num_bytes <= tfrecord.MEMORY_LIMIT_BYTES):
        keys, labels = base().batch(1 << 31).get_single_element()
        return tfrecord.Source(
            int(keys.shape[0]), lambda k, l: (k, l), memory=(keys, labels)
        )
    ordered = base()
    return tfrecord.Source(count, lambda k, l: (k, l), stream_fn=lambda seed: ordered)
