"""Reader and writer for the official ImageNet TFRecord layout.

Layout: ``data_dir/train-*`` and ``data_dir/validation-*`` shard files (e.g.
``train-00000-of-01024``) of serialized ``tf.train.Example`` protos with

* ``image/encoded``: the encoded (JPEG) image bytes,
* ``image/class/label``: int64 label in 1..num_classes (1-based; the reader
  subtracts 1),
* optionally ``image/class/text``, ``image/height``, ``image/width``,
  ``image/format``, ``image/filename``.

Holdout shards (the official EfficientNet ``--holdout_shards`` option): with
``holdout_shards=N`` the first N ``train-*`` files (in sorted order) are the
eval split and training reads only the others, so a train-only copy of a
dataset can still be evaluated on images it never trains on; ``validation-*``
files are then ignored.

Files written by :func:`write_tfrecords` may be GZIP-compressed and come with
a ``dataset_info.json`` holding per-file record counts, the compression and
the class names.  Without that file the reader detects GZIP by its magic
bytes and counts records by scanning the record headers (only needed for
training, where epoch lengths must be known exactly).

Damaged files (``skip_bad_records=True``, training only): each file is read up
to its first unreadable record (a bad length or checksum: the framing after it
cannot be trusted) and records that are not ``tf.train.Example`` protos are
dropped.  A shard held in memory is read once: the records it lost (header
count minus records read) are added to ``skip_counter`` then.  A streamed shard
is read every epoch: its epochs come out short, and the generic pipeline counts
the missing positions each epoch, as it counts undecodable images each time one
is read.
"""

import glob as _glob
import json
import os
import struct

import tensorflow as tf

from efficientnet_advprop.data import tfrecord_lite

METADATA_FILE = "dataset_info.json"
SPLIT_PREFIX = {"train": "train", "eval": "validation"}
# Shards whose total size is at most this are loaded into memory for training
# (exact per-epoch permutation of the whole pipeline shard).
MEMORY_LIMIT_BYTES = 256 * 1024 * 1024
DEFAULT_SHUFFLE_BUFFER = 1024
READ_BUFFER_BYTES = 8 * 1024 * 1024
IMAGENET_NUM_TRAIN = 1281167
IMAGENET_NUM_EVAL = 50000
IMAGENET_NUM_CLASSES = 1000


# ---------------------------------------------------------------------------
# File helpers.
# ---------------------------------------------------------------------------
def list_files(data_dir, split):
    """Sorted shard files of ``split`` ("train"/"eval"/"validation")."""
    prefix = SPLIT_PREFIX.get(split, split)
    pattern = os.path.join(data_dir, prefix + "-*")
    if "://" in data_dir:
        files = tf.io.gfile.glob(pattern)
    else:
        files = _glob.glob(pattern)
    return sorted(f for f in files if not f.endswith((".json", ".txt", ".md")))


def read_metadata(data_dir):
    path = os.path.join(data_dir, METADATA_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def detect_compression(path):
    """ "GZIP" when the file starts with the gzip magic (1f 8b 08), else ""."""
    with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(3)
    return "GZIP" if head == b"\x1f\x8b\x08" else ""


def count_records(path, compression="", tolerant=False):
    """Number of records in one TFRecord file.

    Uncompressed files are counted by hopping over record headers (no data is
    read); compressed files are read through.  A truncated file raises
    ValueError, or with ``tolerant=True`` counts its complete records (a
    compressed file: the records readable before the damage).
    """
    if compression:
        ds = tf.data.TFRecordDataset(path, compression_type=compression)
        if tolerant:
            ds = ds.ignore_errors()
        return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    n = 0
    size = tf.io.gfile.stat(path).length
    with tf.io.gfile.GFile(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return n
            (length,) = struct.unpack("<Q", header[:8]) if len(header) == 12 else (-1,)
            end = f.tell() + length + 4
            if length < 0 or end > size:
                if tolerant:
                    return n
                raise ValueError(f"{path}: truncated or corrupt TFRecord file (record {n} "
                                 "runs past the end of the file)")
            f.seek(length + 4, 1)
            n += 1


def _file_infos(data_dir, split):
    """[(path, compression, count or None)] for the split's shard files."""
    files = list_files(data_dir, split)
    meta = read_metadata(data_dir) or {}
    prefix = SPLIT_PREFIX.get(split, split)
    split_meta = meta.get("splits", {}).get(prefix, {})
    counts = split_meta.get("files", {})
    compression = split_meta.get("compression")
    out = []
    for path in files:
        comp = compression if compression is not None else detect_compression(path)
        out.append((path, comp, counts.get(os.path.basename(path))))
    return out


def split_file_infos(data_dir, split, holdout_shards=0):
    """[(path, compression, count or None)] of ``split``'s shard files, with the
    holdout rule of `tfrecord_lite.holdout_file_infos` (the first N train-* files are
    "eval" when ``holdout_shards=N`` >= 1)."""
    return tfrecord_lite.holdout_file_infos(_file_infos, data_dir, split, holdout_shards)


def split_size(data_dir, split, holdout_shards=0):
    """Exact size of ``split`` when known from metadata, else None."""
    infos = split_file_infos(data_dir, split, holdout_shards)
    if infos and all(c is not None for _, _, c in infos):
        return sum(c for _, _, c in infos)
    return None


# ---------------------------------------------------------------------------
# Parsing.
# ---------------------------------------------------------------------------
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def parse_example(serialized):
    """Serialized tf.train.Example -> (encoded image, 0-based int32 label)."""
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    return parsed["image/encoded"], tf.cast(parsed["image/class/label"] - 1, tf.int32)


def _parse_batch(serialized):
    parsed = tf.io.parse_example(serialized, _FEATURES)
    return parsed["image/encoded"], tf.cast(parsed["image/class/label"] - 1, tf.int32)


# ---------------------------------------------------------------------------
# Source for the generic pipeline in efficientnet_advprop.data.
# ---------------------------------------------------------------------------
class Source:
    """What the generic input pipeline needs from a reader (one pipeline's shard).

    Attributes:
      count: number of examples in this pipeline's shard (None when unknown,
        only allowed for eval).
      memory: (keys, labels) tensors of the whole shard in file order, or None
        for streamed sources.
      stream_fn: callable(seed or None) -> tf.data.Dataset of elements for one
        pass over the shard (seed: shape-[2] per-epoch seed that may be used to
        permute files; None: file order).  Only for streamed sources.
      element_fn: callable(element) -> (encoded image bytes, int32 label),
        run inside the parallel map (after skipping).
    """

    def __init__(self, count, element_fn, memory=None, stream_fn=None):
        self.count = count
        self.memory = memory
        self.stream_fn = stream_fn
        self.element_fn = element_fn


def pipeline_ids(input_context):
    """(num_input_pipelines, input_pipeline_id) of an InputContext or None."""
    if input_context is None:
        return 1, 0
    return int(input_context.num_input_pipelines), int(input_context.input_pipeline_id)


def _identity_element(key, label):
    return key, label


def make_source(
    data_dir,
    split,
    *,
    input_context=None,
    is_training=False,
    cache=False,
    holdout_shards=0,
    skip_bad_records=False,
    skip_counter=None,
):
    """Builds the :class:`Source` of one pipeline's part of ``split``.

    ``holdout_shards=N``: the split is taken from the train-* files as
    described in :func:`split_file_infos` (first N files = eval).
    ``skip_bad_records``: read damaged files as the module docstring says,
    adding the records lost in memory-held shards to ``skip_counter`` (an
    int64 tf.Variable, or None).
    """
    infos = split_file_infos(data_dir, split, holdout_shards)
    if not infos:
        raise ValueError(
            f"--data_dir={data_dir}: no {SPLIT_PREFIX.get(split, split)}-* "
            "TFRecord files found"
        )
    compressions = {c for _, c, _ in infos}
    if len(compressions) != 1:
        raise ValueError(
            f"--data_dir={data_dir}: mixed compressed and "
            "uncompressed TFRecord files in one split"
        )
    compression = compressions.pop()
    num_pipelines, pipeline_id = pipeline_ids(input_context)

    by_file = len(infos) >= num_pipelines
    if by_file:
        mine = infos[pipeline_id::num_pipelines]
    else:
        mine = infos
    files = [p for p, _, _ in mine]

    def count():
        counts = [c if c is not None else count_records(p, compression, skip_bad_records)
                  for p, _, c in mine]
        total = sum(counts)
        if by_file:
            return total
        return max(0, (total - pipeline_id + num_pipelines - 1) // num_pipelines)

    def read(path):
        ds = tf.data.TFRecordDataset(
            path, compression_type=compression, buffer_size=READ_BUFFER_BYTES
        )
        return ds.ignore_errors() if skip_bad_records else ds

    def records(file_seed=None, parallel=False):
        if file_seed is None or len(files) == 1 or not by_file:
            if skip_bad_records:  # one reader per file: a damaged file ends alone
                ds = tf.data.Dataset.from_tensor_slices(files).flat_map(read)
            else:
                ds = read(files)
        else:
            file_t = tf.constant(files)
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(len(files)), seed=file_seed
            )
            ds = tf.data.Dataset.from_tensor_slices(tf.gather(file_t, perm))
            ds = ds.interleave(
                read,
                cycle_length=min(16, len(files)),
                block_length=1,
                num_parallel_calls=tf.data.AUTOTUNE if parallel else None,
                deterministic=True,
            )
        if not by_file:
            ds = ds.shard(num_pipelines, pipeline_id)
        return ds

    total_bytes = 0
    if is_training:
        total_bytes = sum(tf.io.gfile.stat(p).length for p in files)
    if is_training and (cache or total_bytes <= MEMORY_LIMIT_BYTES):
        n = count()
        if skip_bad_records:  # parse one by one: a bad record drops alone
            ds = records().map(parse_example).ignore_errors().batch(1 << 31)
        else:
            ds = records().batch(1 << 31).map(_parse_batch)
        loaded = next(iter(ds), None) if n else None
        if loaded is None:
            raise ValueError(
                f"--data_dir={data_dir}: no readable {split} records for input "
                f"pipeline {pipeline_id} of {num_pipelines}"
            )
        keys, labels = loaded
        if skip_bad_records and skip_counter is not None:
            skip_counter.assign_add(max(0, n - int(keys.shape[0])))
        return Source(int(keys.shape[0]), _identity_element, memory=(keys, labels))

    return Source(
        count() if is_training else None,
        parse_example,
        stream_fn=lambda seed: records(seed, parallel=True),
    )


# ---------------------------------------------------------------------------
# Writer.
# ---------------------------------------------------------------------------
def _bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(
    image_bytes,
    label,
    text=None,
    height=None,
    width=None,
    image_format="JPEG",
    label_offset=1,
    filename=None,
):
    """tf.train.Example in the official layout (stores label + label_offset)."""
    feature = {
        "image/encoded": _bytes_feature(bytes(image_bytes)),
        "image/class/label": _int64_feature(int(label) + label_offset),
        "image/format": _bytes_feature(image_format.encode()),
    }
    if text is not None:
        feature["image/class/text"] = _bytes_feature(
            text.encode() if isinstance(text, str) else bytes(text)
        )
    if height is not None:
        feature["image/height"] = _int64_feature(height)
    if width is not None:
        feature["image/width"] = _int64_feature(width)
    if filename is not None:
        feature["image/filename"] = _bytes_feature(
            filename.encode() if isinstance(filename, str) else bytes(filename)
        )
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_tfrecords(
    examples_iter,
    output_dir,
    split,
    num_shards=1,
    *,
    compression=None,
    class_names=None,
    label_offset=1,
):
    """Writes examples to ``output_dir/<prefix>-0000i-of-0000n``.

    Args:
      examples_iter: iterable of dicts with keys "image" (encoded bytes) and
        "label" (0-based int) and optional "text", "height", "width", "format",
        "filename";
        or tuples (image_bytes, label[, text]).
      output_dir: directory (created if needed).
      split: "train" or "validation" ("eval" is an alias of "validation").
      num_shards: number of shard files; example i goes to shard i % num_shards.
      compression: None/"" (plain TFRecord, like the official files) or "GZIP".
      class_names: optional class names stored in dataset_info.json.
      label_offset: added to the 0-based label before storing (1 = official
        convention, which the reader undoes).

    Returns:
      list of written file paths.  Also updates ``output_dir/dataset_info.json``
      with the per-file record counts of this split.  Existing shard files of
      the split in output_dir are removed first.
    """
    prefix = SPLIT_PREFIX.get(split, split)
    if prefix not in ("train", "validation"):
        raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards}: must be >= 1")
    compression = compression or ""
    tf.io.gfile.makedirs(output_dir)
    for old in list_files(output_dir, prefix):
        tf.io.gfile.remove(old)
    paths = [
        os.path.join(output_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}")
        for i in range(num_shards)
    ]
    options = tf.io.TFRecordOptions(compression_type=compression)
    writers = [tf.io.TFRecordWriter(p, options) for p in paths]
    counts = [0] * num_shards
    try:
        for i, ex in enumerate(examples_iter):
            if not isinstance(ex, dict):
                ex = dict(zip(("image", "label", "text"), ex))
            proto = make_example(
                ex["image"],
                ex["label"],
                text=ex.get("text"),
                height=ex.get("height"),
                width=ex.get("width"),
                image_format=ex.get("format", "JPEG"),
                label_offset=label_offset,
                filename=ex.get("filename"),
            )
            # deterministic=True: stable map-field order -> byte-reproducible files.
            writers[i % num_shards].write(proto.SerializeToString(deterministic=True))
            counts[i % num_shards] += 1
    finally:
        for w in writers:
            w.close()

    meta = read_metadata(output_dir) or {}
    meta.setdefault("format", "imagenet-tfrecord")
    meta["label_offset"] = label_offset
    if class_names is not None:
        meta["class_names"] = list(class_names)
        meta["num_classes"] = len(class_names)
    meta.setdefault("splits", {})[prefix] = {
        "num_examples": sum(counts),
        "compression": compression,
        "files": {os.path.basename(p): c for p, c in zip(paths, counts)},
    }
    with tf.io.gfile.GFile(os.path.join(output_dir, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    return paths
