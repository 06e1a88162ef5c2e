"""Converts image folders and prepared TFDS splits to the official TFRecord layout.

The output is what :func:`efficientnet_advprop.data.tfrecord.make_source` (and
``--dataset=imagenet`` / ``--data_dir=DIR``) reads: ``train-0000i-of-0000n`` and
``validation-0000i-of-0000m`` files of ``tf.train.Example`` protos with
``image/encoded`` (JPEG), ``image/class/label`` (1..num_classes: the 0-based
class id + 1, the official convention that the reader undoes), ``image/class/text``
(class name), ``image/height``, ``image/width``, ``image/format`` and
``image/filename``, plus ``dataset_info.json`` (class names, per-file record
counts, compression), all written by :func:`tfrecord.write_tfrecords`.

* JPEG sources (recognised by their magic bytes, whatever the file name) are
  stored byte for byte; any other image (PNG, BMP, GIF first frame, raw TFDS
  arrays) is decoded to RGB and re-encoded as JPEG at quality
  :data:`REENCODE_QUALITY` (lossy; the summary counts these).
* Image folders (class ids = sorted class folder names, as
  :mod:`efficientnet_advprop.data.image_folder` reads them):
  ``DIR/train/<class>/*`` (+ ``DIR/validation|val|test/<class>/*``) go to the
  train (+ validation) split; a flat ``DIR/<class>/*`` goes to one split
  (``split_name``, default train).  Unlike the folder reader, no images are
  held out: use ``holdout_shards`` when reading the TFRecords instead.  The file
  list is shuffled with a fixed seed (like the official ImageNet build script)
  so that every shard, and any stretch of a shard, mixes the classes;
  example i goes to shard i % num_shards.
* TFDS: an already prepared split (never downloaded), in TFDS's own order.
* The output directory must be new or empty; everything is written to a hidden
  sibling directory that is renamed to ``output_dir`` only when complete.

Use ``scripts/build_tfrecords.py`` from the command line, or::

  from efficientnet_advprop.data import convert
  summary = convert.convert_image_folder("/data/pets", "/data/pets-tfrecords",
                                         num_shards=16)
  print(summary.line())
"""

import contextlib
import dataclasses
import math
import os
import random
import secrets
import shutil

import tensorflow as tf

from efficientnet_advprop.data import image_folder
from efficientnet_advprop.data import tfds_reader
from efficientnet_advprop.data import tfrecord

JPEG_MAGIC = b"\xff\xd8\xff"
REENCODE_QUALITY = 95
# Default shard count: one shard per this many bytes of source images
# (the official ImageNet shards hold ~140 MB each).
DEFAULT_SHARD_BYTES = 128 * 1024 * 1024
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    split: str  # "train" or "validation"
    images: int
    shards: int
    reencoded: int  # non-JPEG sources re-encoded as JPEG
    bytes: int  # size of the written shard files
    files: tuple  # shard file names


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    output_dir: str
    class_names: tuple
    splits: tuple  # SplitSummary per written split
    compression: str  # "" or "GZIP"

    @property
    def images(self):
        return sum(s.images for s in self.splits)

    @property
    def shards(self):
        return sum(s.shards for s in self.splits)

    @property
    def bytes(self):
        return sum(s.bytes for s in self.splits)

    @property
    def reencoded(self):
        return sum(s.reencoded for s in self.splits)

    def line(self):
        """One-line summary: images, shards and bytes written."""
        parts = ", ".join(
            f"{s.split} {s.images:,} in {s.shards} shard{'s' if s.shards != 1 else ''}"
            for s in self.splits
        )
        extra = f"{'GZIP, ' if self.compression else ''}{len(self.class_names)} classes"
        if self.reencoded:
            extra += (
                f", {self.reencoded:,} non-JPEG images re-encoded as JPEG "
                f"(quality {REENCODE_QUALITY})"
            )
        return (
            f"wrote {self.images:,} images, {self.shards} shards, {self.bytes:,} bytes "
            f"to {self.output_dir} ({parts}; {extra})"
        )


# ---------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------
def check_output_dir(output_dir):
    """ValueError unless output_dir is a new path or an empty local directory."""
    if not output_dir:
        raise ValueError("--output_dir is required")
    if "://" in output_dir:
        raise ValueError(f"--output_dir={output_dir}: only local directories are supported")
    if os.path.lexists(output_dir):
        if not os.path.isdir(output_dir):
            raise ValueError(f"--output_dir={output_dir}: exists and is not a directory")
        if os.listdir(output_dir):
            raise ValueError(
                f"--output_dir={output_dir}: exists and is not empty; "
                "choose a new or empty directory"
            )


def check_num_shards(num_shards, flag="--num_shards"):
    if num_shards is None:
        return None
    if isinstance(num_shards, bool) or int(num_shards) != num_shards or num_shards < 1:
        raise ValueError(f"{flag}={num_shards}: must be an integer >= 1")
    return int(num_shards)


def _check_split_name(split_name):
    if split_name is not None and split_name not in SPLITS:
        raise ValueError(f"--split_name={split_name}: expected train or validation")


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------
def is_jpeg(data):
    return bytes(data[:3]) == JPEG_MAGIC


def _first_line(e):
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def encode_image(data, where):
    """(JPEG bytes, height, width, reencoded) for an encoded image or uint8 array.

    JPEG bytes come back unchanged (the header is checked); anything else is
    decoded to RGB and re-encoded at quality REENCODE_QUALITY.  ``where`` names
    the source in the ValueError raised for undecodable data.
    """
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data)
        if is_jpeg(data):
            try:
                height, width, _ = tf.io.extract_jpeg_shape(data).numpy()
            except tf.errors.OpError as e:
                raise ValueError(f"{where}: not a valid JPEG ({_first_line(e)})") from None
            return data, int(height), int(width), False
        try:
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.OpError as e:
            raise ValueError(f"{where}: cannot decode image ({_first_line(e)})") from None
    else:
        image = tf.convert_to_tensor(data)
        if image.dtype != tf.uint8 or image.shape.rank != 3:
            raise ValueError(f"{where}: expected encoded bytes or a uint8 [H, W, C] image")
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        elif image.shape[-1] == 4:
            image = image[..., :3]
    encoded = tf.io.encode_jpeg(image, quality=REENCODE_QUALITY).numpy()
    return encoded, int(image.shape[0]), int(image.shape[1]), True


# ---------------------------------------------------------------------------
# Output staging.
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def staged_output_dir(output_dir):
    """Yields a hidden sibling directory that becomes ``output_dir`` on success.

    On any exception the staging directory (and parent directories created
    for it) are removed, so nothing half-written is left behind.
    """
    check_output_dir(output_dir)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    created = []
    p = parent
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(
        parent, f".{os.path.basename(output_dir)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    os.mkdir(staging)
    try:
        yield staging
        check_output_dir(output_dir)  # Still new or empty?
        os.rename(staging, output_dir)  # Replaces an empty directory (POSIX).
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in created:  # Deepest first.
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def _auto_shards(num_bytes):
    return max(1, math.ceil(num_bytes / DEFAULT_SHARD_BYTES))


def _write_split(
    staging, split, examples, count, num_shards, class_names, compression, progress
):
    if num_shards > count:
        flag = "--num_eval_shards" if split == "validation" else "--num_shards"
        raise ValueError(f"{flag}={num_shards}: more shards than the {count} {split} images")
    reencoded = [0]
    bar = None
    if progress:
        # pylint: disable-next=g-import-not-at-top
        from efficientnet_advprop.utils.progress import Progress

        bar = Progress(count, unit="img")

    def counted():
        for i, ex in enumerate(examples):
            reencoded[0] += ex.pop("reencoded")
            yield ex
            if bar is not None:
                bar.update(1, 1, postfix=split, force=i + 1 == count)

    paths = tfrecord.write_tfrecords(
        counted(),
        staging,
        split,
        num_shards,
        compression=compression,
        class_names=class_names,
    )
    meta = tfrecord.read_metadata(staging)["splits"][split]
    return SplitSummary(
        split=split,
        images=int(meta["num_examples"]),
        shards=len(paths),
        reencoded=reencoded[0],
        bytes=sum(os.path.getsize(p) for p in paths),
        files=tuple(os.path.basename(p) for p in paths),
    )


# ---------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------
def list_image_folder(input_dir, split_name=None):
    """(class_names, {split: [(path, label)]}) of an image folder, in sorted order.

    ``DIR/train/<class>/`` (+ ``DIR/validation|val|test/<class>/``): train (+
    validation); ``DIR/<class>/``: everything in ``split_name`` (default
    "train").  Uses :func:`image_folder.scan` (same class ids and file
    extensions as the folder reader) but holds nothing out.
    """
    _check_split_name(split_name)
    if not input_dir:
        raise ValueError("--input_dir is required")
    if not os.path.isdir(input_dir):
        what = "is not a directory" if os.path.exists(input_dir) else "does not exist"
        raise ValueError(f"--input_dir={input_dir}: directory {what}")
    if not os.listdir(input_dir):
        raise ValueError(f"--input_dir={input_dir}: directory is empty")
    nested = image_folder.has_layout(input_dir)
    if nested and split_name is not None:
        raise ValueError(
            f"--split_name={split_name}: only for a flat DIR/<class>/ folder; "
            f"--input_dir={input_dir} has train/ (and validation/) folders"
        )
    # pylint: disable=protected-access
    if not nested and not [
        c for c in image_folder._class_dirs(input_dir) if c not in image_folder.EVAL_DIRS
    ]:
        raise ValueError(
            f"--input_dir={input_dir}: no <class>/ or train/<class>/ image folders found"
        )
    has_eval = nested and any(
        image_folder._class_dirs(os.path.join(input_dir, d)) for d in image_folder.EVAL_DIRS
    )
    # pylint: enable=protected-access
    try:
        # Uncached: the folder may have changed since an earlier scan.
        class_names, train, evals = image_folder.scan.__wrapped__(input_dir)
    except ValueError as e:
        raise ValueError(str(e).replace("--data_dir=", "--input_dir=")) from None
    if has_eval:
        splits = {"train": train}
        if evals:
            splits["validation"] = evals
    else:  # scan held out a share of the images: put them back, in order.
        items = sorted(train + evals, key=lambda it: (it[1], it[0]))
        splits = {split_name or "train": items}
    return tuple(class_names), splits


def convert_image_folder(
    input_dir,
    output_dir,
    num_shards=None,
    *,
    num_eval_shards=None,
    split_name=None,
    compress=False,
    shuffle=True,
    seed=0,
    progress=False,
):
    """Writes an image folder to ``output_dir`` in the official TFRecord layout.

    Args:
      input_dir: ``DIR/train/<class>/*`` (+ ``DIR/validation/<class>/*``) or
        ``DIR/<class>/*`` (see :func:`list_image_folder`).
      output_dir: a new or empty local directory.
      num_shards: shard files of the train split (or of the only split);
        default one per DEFAULT_SHARD_BYTES of source images.
      num_eval_shards: shard files of the validation split next to a train
        split; same default.
      split_name: "train" or "validation" for a flat ``DIR/<class>/`` folder.
      compress: GZIP-compress the TFRecord files (the reader detects it).
      shuffle: shuffle each split's file list with ``seed`` before sharding.
      seed: the shuffle seed.
      progress: show a progress bar on stderr.

    Returns:
      ConversionSummary.  Raises ValueError (one line naming the flag/path) on
      bad input; nothing is left in/at output_dir then.
    """
    num_shards = check_num_shards(num_shards)
    num_eval_shards = check_num_shards(num_eval_shards, "--num_eval_shards")
    check_output_dir(output_dir)
    class_names, splits = list_image_folder(input_dir, split_name)
    compression = "GZIP" if compress else ""
    summaries = []
    with staged_output_dir(output_dir) as staging:
        for split, items in splits.items():
            items = list(items)
            if shuffle:
                random.Random(seed).shuffle(items)
            if split == "validation" and "train" in splits:
                shards = num_eval_shards
            else:
                shards = num_shards
            if shards is None:
                shards = _auto_shards(sum(os.path.getsize(p) for p, _ in items))

            def examples(items=items):
                for path, label in items:
                    with open(path, "rb") as f:
                        data = f.read()
                    image, height, width, reencoded = encode_image(data, path)
                    yield {
                        "image": image,
                        "label": label,
                        "text": class_names[label],
                        "height": height,
                        "width": width,
                        "format": "JPEG",
                        "filename": os.path.relpath(path, input_dir),
                        "reencoded": reencoded,
                    }

            summaries.append(
                _write_split(
                    staging, split, examples(), len(items), shards, class_names,
                    compression, progress,
                )
            )
    return ConversionSummary(
        os.path.abspath(output_dir), class_names, tuple(summaries), compression
    )


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------
def convert_tfds(
    name,
    output_dir,
    num_shards=None,
    *,
    split="train",
    data_dir=None,
    split_name="train",
    eval_split=None,
    num_eval_shards=None,
    compress=False,
    progress=False,
):
    """Writes a prepared TFDS split (+ optionally an eval split) as TFRecords.

    Args:
      name: TFDS name, optionally with config/version ("cifar10/3.0.2").
      output_dir: a new or empty local directory.
      num_shards: shard files of ``split``; default one per
        DEFAULT_SHARD_BYTES of the split's TFDS size.
      split: TFDS split (TFDS slicing syntax allowed, e.g. "train[:90%]").
      data_dir: TFDS data directory (default ~/tensorflow_datasets).  Nothing
        is downloaded or prepared: an unprepared dataset is a ValueError.
      split_name: "train" or "validation": where ``split`` is written.
      eval_split: optional TFDS split written as "validation" (then
        ``split_name`` must be "train").
      num_eval_shards: shard files of ``eval_split``; same default.
      compress: GZIP-compress the TFRecord files.
      progress: show a progress bar on stderr.

    Returns:
      ConversionSummary.  Raises ValueError (one line) on bad input.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    _check_split_name(split_name)
    num_shards = check_num_shards(num_shards)
    num_eval_shards = check_num_shards(num_eval_shards, "--num_eval_shards")
    if eval_split and split_name != "train":
        raise ValueError(
            f"--tfds_eval_split={eval_split}: needs --split_name=train (it is "
            "written as the validation split)"
        )
    if not name:
        raise ValueError("--tfds_name is required")
    check_output_dir(output_dir)
    spec = f"tfds:{name}:{split}" + (f":{eval_split}" if eval_split else "")
    try:
        builder, _, split, eval_split_found = tfds_reader.load_builder(spec, data_dir)
    except ValueError as e:
        raise ValueError(
            str(e).replace(f"--dataset={spec}", f"--tfds_name={name}")
            .replace("--data_dir=", "--tfds_data_dir=", 1)
        ) from None
    image_key, label_key = tfds_reader._keys(builder)  # pylint: disable=protected-access
    label_feature = builder.info.features[label_key]
    class_names = tuple(getattr(label_feature, "names", ()) or ())
    if not class_names:
        raise ValueError(
            f"--tfds_name={name}: label feature '{label_key}' has no class names "
            "(not a ClassLabel)"
        )
    compression = "GZIP" if compress else ""
    jobs = [(split, split_name, num_shards)]
    if eval_split:
        jobs.append((eval_split_found, "validation", num_eval_shards))
    summaries = []
    with staged_output_dir(output_dir) as staging:
        for tfds_split, out_split, shards in jobs:
            info = builder.info.splits[tfds_split]
            count = int(info.num_examples)
            if count == 0:
                raise ValueError(f"--tfds_name={name}: split '{tfds_split}' is empty")
            if shards is None:
                shards = _auto_shards(int(info.num_bytes or 0))
            image_feature = builder.info.features[image_key]
            decoders = None
            if isinstance(image_feature, tfds.features.Image):
                decoders = {image_key: tfds.decode.SkipDecoding()}
            ds = builder.as_dataset(
                split=tfds_split,
                shuffle_files=False,
                decoders=decoders,
                read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=True),
            )

            def examples(ds=ds, tfds_split=tfds_split):
                for ex in ds.as_numpy_iterator():
                    tfds_id = ex.get("tfds_id", b"")
                    tfds_id = tfds_id.decode() if isinstance(tfds_id, bytes) else tfds_id
                    label = int(ex[label_key])
                    image, height, width, reencoded = encode_image(
                        ex[image_key], f"{name} {tfds_split} {tfds_id}"
                    )
                    yield {
                        "image": image,
                        "label": label,
                        "text": class_names[label],
                        "height": height,
                        "width": width,
                        "format": "JPEG",
                        "filename": tfds_id or None,
                        "reencoded": reencoded,
                    }

            summaries.append(
                _write_split(
                    staging, out_split, examples(), count, shards, class_names,
                    compression, progress,
                )
            )
    return ConversionSummary(
        os.path.abspath(output_dir), class_names, tuple(summaries), compression
    )
