"""Input pipelines: dataset resolution and deterministic, resumable tf.data.

Public API::

  info = resolve_dataset(dataset=None, data_dir=None,
                         holdout_shards=None,
                         skip_bad_records=False)       # -> DatasetInfo
  options = InputOptions(augmentation="inception", auto_augment=None,
                         randaugment_layers=2, randaugment_magnitude=10,
                         auto_augment_fraction=1.0, auto_augment_constants="auto",
                         source_tags=False, extra_views=(), cache=False,
                         shuffle_buffer=None, holdout_shards=None,
                         skip_bad_records=False)    # these are the defaults
  options = InputOptions.from_data_config(config.data, recipe)  # or from a config
  ds = make_dataset(info, data_dir, "train", batch_size=..., image_size=...,
                    is_training=True, seed=0, start_step=0,
                    input_context=None, skip_counter=None,
                    options=InputOptions())
  # -> (images, labels), or (images, labels, extras) with source_tags/extra_views
  counter = make_skip_counter()     # int64 variable for skip_counter
  image = distort_image_with_autoaugment(image, seed)            # policy v0
  image = distort_image_with_randaugment(image, 2, 10, seed)
  autoaugment_constants(image_size)  # {"translate_const", "cutout_const", "scaled"}

Datasets:

* ``embedded`` (default): 15,000 train / 2,000 validation CIFAR-10 images
  shipped in ``efficientnet_advprop/data/embedded`` (official TFRecord layout).
* ``imagenet``: official ImageNet TFRecord layout (``train-*``,
  ``validation-*``) in ``data_dir``; ``scripts/build_tfrecords.py`` converts an
  image folder or a prepared TFDS split to it.
* ``folder``: ``data_dir/train/<class>/*`` (+ ``validation/<class>/*``).
* ``tfds:NAME[:TRAIN_SPLIT[:EVAL_SPLIT]]``: a prepared TFDS dataset.

Training streams are infinite and a deterministic function of (seed,
start_step): each input pipeline's shard is split into epochs of
``count // batch_size`` batches (the remainder of each epoch is dropped);
epoch ``e`` is shuffled with a seed derived from (seed, e) and example ``i``
of epoch ``e`` is augmented with a stateless seed derived from (seed, e, i).
``start_step=s`` starts at epoch ``s // steps_per_epoch`` and skips the
remaining batches at the record level, before any decoding.

Small shards (<= 256 MiB of records, or ``cache=True``) are held in memory
(encoded) and fully permuted each epoch; larger TFRecord shards are streamed:
files permuted per epoch, read with a deterministic parallel interleave and
shuffled in blocks of ``shuffle_buffer`` records (stateless, seeded per epoch
and block).

Training images can additionally be augmented with AutoAugment policy v0 or
RandAugment (``auto_augment``; :mod:`efficientnet_advprop.data.autoaugment`),
on all of them or on a random, per-example share (``auto_augment_fraction``).
Their translate/cutout pixel constants are the official ImageNet ones from 64 px
and scaled to the image below (``auto_augment_constants``, see
:func:`autoaugment_constants`).

Training elements are ``(images, labels)``, or ``(images, labels, extras)`` when
per-image side information is asked for; ``extras`` is a dict:

* ``"source_tags"`` (``source_tags=True``): int32 [B], 0 clean, 1 augmented by
  AutoAugment/RandAugment;
* ``"tda_images"`` (``extra_views=("tda",)``): float32 [B, H, W, 3] in [0, 255],
  the texture-debiased view of each image (NoFrost*), made from the *decoded*
  image -- random resized crop with scale (0.64, 1), flip, colour distortion
  (:func:`efficientnet_advprop.data.tda.tda_view`) -- and seeded from the same
  (seed, epoch, index) as the image's other augmentation.

Recipes say what they need (``Recipe.needs_source_tags``, ``Recipe.input_views``):
``make_dataset(..., options=InputOptions(source_tags=recipe.needs_source_tags,
extra_views=recipe.input_views))``, which ``InputOptions.from_data_config(data_cfg,
recipe)`` sets.

Holdout shards (TFRecord layouts only, as the official EfficientNet
``--holdout_shards``): ``resolve_dataset(..., holdout_shards=N)`` makes the
first N ``train-*`` files (sorted) the eval split and trains on the other
train-* files only; ``validation-*`` files are not read.  The returned
DatasetInfo carries N (and the matching num_train/num_eval), and make_dataset
uses it.

Bad records (``skip_bad_records=True``, training split only): images that do
not decode, records that are not ``tf.train.Example`` protos and the unreadable
tail of a damaged TFRecord file are dropped instead of stopping the run (see
:mod:`efficientnet_advprop.data.tfrecord` for damaged files).  The number
dropped is added to ``skip_counter`` as the pipeline reads, read-ahead included,
each time a bad record is read (once per epoch for an undecodable image).
Each example keeps the augmentation seed of its (epoch, index), but the batches
after a dropped image shift by one image, and a resumed run skips
``start_step * batch`` records without knowing how many of them were dropped, so
with bad records a resumed run may see a slightly different stream than an
uninterrupted one.  Evaluation never skips: a bad held-out image stops the run
(an accuracy over a silently smaller set would not compare with others).
"""

import dataclasses
import numbers
import os

import tensorflow as tf

from efficientnet_advprop.data import autoaugment
from efficientnet_advprop.data import image_folder
from efficientnet_advprop.data import preprocessing
from efficientnet_advprop.data import tfds_reader
from efficientnet_advprop.data import tfrecord
from efficientnet_advprop.data.autoaugment import autoaugment_constants
from efficientnet_advprop.data.autoaugment import distort_image_with_autoaugment
from efficientnet_advprop.data.autoaugment import distort_image_with_randaugment
from efficientnet_advprop.data.info import DatasetInfo  # noqa: F401 (re-exported)
from efficientnet_advprop.data.tfrecord import write_tfrecords

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
AUGMENTATIONS = preprocessing.AUGMENTATIONS
AUTO_AUGMENTS = preprocessing.AUTO_AUGMENTS
EXTRA_VIEWS = preprocessing.EXTRA_VIEWS
# extra view name -> key of the extras dict it fills.
EXTRA_VIEW_KEYS = {"tda": "tda_images"}
# Splits above this total size are not counted at resolve time when no
# dataset_info.json is present (official ImageNet sizes are used instead).
_COUNT_LIMIT_BYTES = 2 * 1024**3



# ---------------------------------------------------------------------------
# resolve_dataset
# ---------------------------------------------------------------------------
def _count(infos, default, tolerant=False):
    """Records in [(path, compression, count or None)]; default when too big to scan.
    `tolerant`: a truncated file counts its complete records instead of failing."""
    if not infos:
        return 0
    if all(c is not None for _, _, c in infos):
        return sum(c for _, _, c in infos)
    total = sum(tf.io.gfile.stat(p).length for p, _, _ in infos)
    if total > _COUNT_LIMIT_BYTES:
        return default
    return sum(c if c is not None else tfrecord.count_records(p, comp, tolerant)
               for p, comp, c in infos)


def _tfrecord_info(name, data_dir, default_size=224, holdout_shards=0, tolerant=False):
    meta = tfrecord.read_metadata(data_dir) or {}
    class_names = tuple(meta.get("class_names", ()))
    num_classes = int(
        meta.get("num_classes", len(class_names) or tfrecord.IMAGENET_NUM_CLASSES)
    )
    train = tfrecord.split_file_infos(data_dir, "train", holdout_shards)
    evals = tfrecord.split_file_infos(data_dir, "eval", holdout_shards)
    if holdout_shards:
        # Unscannable (> 2 GiB, no metadata): assume ImageNet's train size, split
        # between the held-out and the training files by their number.
        num_files = len(train) + len(evals)
        num_eval = _count(evals, None)
        if num_eval is None:
            num_eval = round(tfrecord.IMAGENET_NUM_TRAIN * len(evals) / num_files)
        num_train = _count(train, None, tolerant)
        if num_train is None:
            num_train = tfrecord.IMAGENET_NUM_TRAIN - num_eval
    else:
        num_train = _count(train, tfrecord.IMAGENET_NUM_TRAIN, tolerant)
        num_eval = _count(evals, tfrecord.IMAGENET_NUM_EVAL)
    return DatasetInfo(
        name=name,
        num_classes=num_classes,
        num_train=num_train,
        num_eval=num_eval,
        image_size=int(meta.get("image_size", default_size)),
        class_names=class_names,
        holdout_shards=int(holdout_shards),
    )


def _embedded_info(holdout_shards=0):
    info = _tfrecord_info("embedded", EMBEDDED_DIR, holdout_shards=holdout_shards)
    return dataclasses.replace(info, image_size=32)


def _check_holdout_shards(holdout_shards):
    """None/0 -> 0; a positive int -> itself; anything else -> ValueError."""
    if holdout_shards is None:
        return 0
    try:
        n = int(holdout_shards)
    except (TypeError, ValueError):
        n = None
    if isinstance(holdout_shards, bool) or n is None or n != holdout_shards:
        raise ValueError(f"--holdout_shards={holdout_shards}: expected an integer")
    if n < 0:
        raise ValueError(f"--holdout_shards={holdout_shards}: must be >= 0")
    return n


def _no_holdout(dataset, holdout_shards):
    if holdout_shards:
        raise ValueError(
            f"--holdout_shards={holdout_shards}: only for TFRecord data "
            f"(--dataset=imagenet or embedded), not --dataset={dataset}"
        )


def _check_dir(data_dir, dataset):
    if not data_dir:
        raise ValueError(f"--dataset={dataset} needs --data_dir (none given)")
    if not tf.io.gfile.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir}: directory does not exist")


def _folder_info(data_dir):
    class_names, train, evals = image_folder.scan(data_dir)
    return DatasetInfo(
        name="folder",
        num_classes=len(class_names),
        num_train=len(train),
        num_eval=len(evals),
        image_size=image_folder.native_image_size(train[0][0]),
        class_names=tuple(class_names),
    )


def resolve_dataset(dataset=None, data_dir=None, holdout_shards=None,
                    skip_bad_records=False) -> DatasetInfo:
    """Describes the dataset selected by --dataset / --data_dir.

    dataset None and data_dir None: the embedded default.  dataset None with a
    data_dir: "imagenet" when data_dir has train-* TFRecord files, "folder"
    when it has train/<class>/ folders.  Otherwise "tfds:NAME[...]",
    "imagenet", "folder" or "embedded".  Raises ValueError (one line naming the
    flag/path) on problems.

    holdout_shards: None/0, or N >= 1 for TFRecord data ("imagenet",
    "embedded"): the first N train-* files (sorted by name) become the eval
    split, the other train-* files the training split, and validation-* files
    are ignored (the official EfficientNet ``--holdout_shards``).  num_train /
    num_eval then count those files, and the returned info carries N, which
    make_dataset applies.  N must leave at least one train-* file; other
    datasets raise ValueError.

    skip_bad_records: a truncated train-* TFRecord file (without metadata)
    counts its complete records instead of raising ValueError.
    """
    holdout_shards = _check_holdout_shards(holdout_shards)
    tolerant = bool(skip_bad_records)
    if dataset is not None:
        dataset = str(dataset).strip()
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if not data_dir:
            data_dir = None
    if not dataset:
        if data_dir is None:
            return _embedded_info(holdout_shards)
        _check_dir(data_dir, "(auto)")
        if tfrecord.list_files(data_dir, "train") or tfrecord.list_files(data_dir, "eval"):
            return _tfrecord_info("imagenet", data_dir, holdout_shards=holdout_shards,
                                  tolerant=tolerant)
        if "://" not in data_dir and image_folder.has_layout(data_dir):
            _no_holdout("folder", holdout_shards)
            return _folder_info(data_dir)
        raise ValueError(
            f"--data_dir={data_dir}: no train-* TFRecord files or "
            "train/ class folders found"
        )
    if dataset == "embedded":
        return _embedded_info(holdout_shards)
    if dataset == "imagenet":
        _check_dir(data_dir, dataset)
        if not (
            tfrecord.list_files(data_dir, "train") or tfrecord.list_files(data_dir, "eval")
        ):
            raise ValueError(
                f"--data_dir={data_dir}: no train-* or validation-* "
                "TFRecord files found (--dataset=imagenet)"
            )
        return _tfrecord_info("imagenet", data_dir, holdout_shards=holdout_shards,
                              tolerant=tolerant)
    if dataset == "folder":
        _no_holdout(dataset, holdout_shards)
        _check_dir(data_dir, dataset)
        return _folder_info(data_dir)
    if dataset.startswith("tfds:"):
        _no_holdout(dataset, holdout_shards)
        num_classes, num_train, num_eval, image_size, names = tfds_reader.describe(
            dataset, data_dir
        )
        return DatasetInfo(dataset, num_classes, num_train, num_eval, image_size, names)
    raise ValueError(
        f"--dataset={dataset}: unknown dataset; expected embedded, "
        "imagenet, folder or tfds:NAME"
    )


# ---------------------------------------------------------------------------
# make_dataset
# ---------------------------------------------------------------------------
def _epoch_seed(seed, epoch):
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0xE90C, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))


def _source(info, data_dir, split, input_context, is_training, cache, holdout_shards=0,
            skip_bad_records=False, skip_counter=None):
    kwargs = dict(input_context=input_context, is_training=is_training, cache=cache)
    skip = dict(skip_bad_records=skip_bad_records, skip_counter=skip_counter)
    if info.name == "embedded":
        return tfrecord.make_source(
            EMBEDDED_DIR, split, holdout_shards=holdout_shards, **kwargs, **skip
        )
    if info.name == "imagenet":
        _check_dir(data_dir, info.name)
        return tfrecord.make_source(data_dir, split, holdout_shards=holdout_shards,
                                    **kwargs, **skip)
    _no_holdout(info.name, holdout_shards)
    if info.name == "folder":
        _check_dir(data_dir, info.name)
        return image_folder.make_source(data_dir, split, **kwargs)
    if info.name.startswith("tfds:"):
        return tfds_reader.make_source(info.name, data_dir, split, **kwargs)
    raise ValueError(f"--dataset={info.name}: unknown dataset")


def _element(source, el):
    if isinstance(el, tuple):
        return source.element_fn(*el)
    return source.element_fn(el)


def make_skip_counter():
    """A host (CPU) int64 variable for make_dataset's `skip_counter`, at 0."""
    with tf.device("/cpu:0"):
        return tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records")


def _drop_bad(ds, first_position, per_epoch, counter):
    """Drops elements (epoch, index, *rest) whose processing failed; adds the number
    dropped (gaps in the positions epoch * per_epoch + index) to `counter`."""
    ds = ds.ignore_errors()

    def count_gap(last, element):
        position = element[0] * per_epoch + element[1]
        if counter is not None:
            counter.assign_add(position - last - 1)
        return position, element[2:]

    return ds.scan(tf.constant(first_position - 1, tf.int64), count_gap)


def _block_shuffle(ds, block, epoch_seed):
    def shuffle(b, x):
        n = tf.shape(tf.nest.flatten(x)[0])[0]
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.random.experimental.stateless_fold_in(epoch_seed, b)
        )
        return tf.nest.map_structure(lambda t: tf.gather(t, perm), x)

    return ds.batch(block).enumerate().map(shuffle).unbatch()


def _train_dataset(
    source,
    *,
    batch_size,
    image_size,
    seed,
    start_step,
    augmentation,
    shuffle_buffer,
    auto_augment_options,
    source_tags,
    extra_views=(),
    skip_bad_records=False,
    skip_counter=None,
):
    n = int(source.count)
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n} training "
            "examples of this input pipeline"
        )
    start_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)
    per_epoch = steps_per_epoch * batch_size
    first_skip = skip_batches * batch_size

    def skip_for(epoch):
        return tf.where(
            tf.equal(epoch, start_epoch),
            tf.constant(first_skip, tf.int64),
            tf.constant(0, tf.int64),
        )

    if source.memory is not None:
        keys, labels = source.memory

        def epoch_elements(epoch):
            skip = skip_for(epoch)
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=_epoch_seed(seed, epoch)
            )
            perm = perm[skip:per_epoch]
            idx = tf.range(skip, per_epoch, dtype=tf.int64)
            return tf.data.Dataset.from_tensor_slices((idx, perm)).map(
                lambda i, p: (epoch, i, (tf.gather(keys, p), tf.gather(labels, p)))
            )

    else:
        block = shuffle_buffer or tfrecord.DEFAULT_SHUFFLE_BUFFER

        def epoch_elements(epoch):
            eseed = _epoch_seed(seed, epoch)
            ds = source.stream_fn(eseed)
            if block > 1:
                ds = _block_shuffle(ds, block, eseed)
            ds = ds.take(per_epoch).enumerate().skip(skip_for(epoch))
            return ds.map(lambda i, el: (epoch, i, el))

    ds = tf.data.Dataset.range(start_epoch, 1 << 62).flat_map(epoch_elements)

    def process(epoch, index, el):
        image_bytes, label = _element(source, el)
        example_seed = preprocessing.example_seed(seed, epoch, index)
        image, tag = preprocessing.preprocess_for_train(
            image_bytes,
            image_size,
            example_seed,
            augmentation,
            return_source=True,
            **auto_augment_options,
        )
        extras = {}
        if source_tags:
            extras["source_tags"] = tag
        if "tda" in extra_views:
            extras[EXTRA_VIEW_KEYS["tda"]] = preprocessing.tda_view_for_train(
                image_bytes, image_size, example_seed
            )
        out = (image, tf.cast(label, tf.int32)) + ((extras,) if extras else ())
        return (epoch, index) + out if skip_bad_records else out

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad_records:
        ds = _drop_bad(ds, start_epoch * per_epoch + first_skip, per_epoch, skip_counter)
    return ds.batch(batch_size, drop_remainder=True)


def _eval_dataset(source, *, batch_size, image_size, augmentation, cache, source_tags):
    if source.memory is not None:
        ds = tf.data.Dataset.from_tensor_slices(source.memory)
    else:
        ds = source.stream_fn(None)

    def process(*el):
        image_bytes, label = _element(source, el if len(el) > 1 else el[0])
        image = preprocessing.preprocess_for_eval(image_bytes, image_size, augmentation)
        if source_tags:
            return image, tf.cast(label, tf.int32), {"source_tags": tf.constant(0, tf.int32)}
        return image, tf.cast(label, tf.int32)

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
    return ds.batch(batch_size, drop_remainder=False)


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How make_dataset reads and augments the data (everything but the split,
    batch and image size, seed, position and distribution).

    Frozen; ``dataclasses.replace(options, field=value)`` makes a changed copy.
    Invalid values raise ValueError naming the field.  ``randaugment_layers`` is
    stored as an int, ``randaugment_magnitude`` and ``auto_augment_fraction`` as
    floats and ``extra_views`` as a tuple in EXTRA_VIEWS order without repeats.

    Fields:
      augmentation: "inception", "cifar", "cifar_zeros" or "none".  Eval uses
        the padded center crop for "inception" and a whole-image resize
        otherwise.
      auto_augment: None, "v0" (AutoAugment policy v0) or "randaugment": extra
        training augmentation applied after crop + flip + resize, as in the
        official EfficientNet; augmented images are rounded to integers.
        Eval never augments.
      randaugment_layers: RandAugment's number of ops per image (N), >= 0.
      randaugment_magnitude: RandAugment's shared level (M), >= 0 (typically
        5..30; levels above 10 extrapolate the magnitude mapping linearly, see
        efficientnet_advprop.data.autoaugment).
      auto_augment_fraction: share of training images, in [0, 1], that get
        ``auto_augment`` (a stateless coin per example from the run seed, epoch
        and index); the others are exactly the images of ``auto_augment=None``.
      auto_augment_constants: "auto" (default), "official" or "scaled": the
        translate/cutout pixel constants of ``auto_augment``.  "auto": the
        official ImageNet constants when ``image_size >= 64``, scaled to the
        image below (``autoaugment_constants(image_size, ...)`` says which).
      source_tags: True or False: also yield the per-image source tags (eval:
        all 0), as ``extras["source_tags"]``.
      extra_views: names from EXTRA_VIEWS of extra per-image views to add to
        each training element's extras: "tda" -> ``extras["tda_images"]``, the
        texture-debiased view made from the decoded image (NoFrost*).
        Training only (make_dataset refuses them for eval).
      cache: True or False.  Training: hold the encoded records in memory even
        when large; eval: cache the preprocessed images in memory after the
        first pass.
      shuffle_buffer: None (1024) or a positive int: block size of the
        stateless block shuffle for streamed (large) training data.
      holdout_shards: None: use ``info.holdout_shards`` (set by
        ``resolve_dataset(..., holdout_shards=N)``, the way to use it, since
        the info's num_train/num_eval then match).  N >= 1 (TFRecord data
        only): "train" reads all train-* files but the first N, "eval" reads
        exactly the first N train-* files (one pass, file order); 0: no
        holdout.  make_dataset refuses a value that contradicts a nonzero
        ``info.holdout_shards``.
      skip_bad_records: True or False.  Training only (make_dataset refuses it
        for eval): drop undecodable images, non-Example records and damaged
        TFRecord tails instead of failing (module docstring).
    """

    augmentation: str = "inception"
    auto_augment: str = None
    randaugment_layers: int = 2
    randaugment_magnitude: float = 10.0
    auto_augment_fraction: float = 1.0
    auto_augment_constants: str = "auto"
    source_tags: bool = False
    extra_views: tuple = ()
    cache: bool = False
    shuffle_buffer: int = None
    holdout_shards: int = None
    skip_bad_records: bool = False

    def __post_init__(self):
        preprocessing.check_augmentation(self.augmentation)
        _, layers, magnitude, fraction = preprocessing.check_auto_augment(
            self.auto_augment, self.randaugment_layers, self.randaugment_magnitude,
            self.auto_augment_fraction,
        )
        if self.auto_augment_constants not in autoaugment.CONSTANTS:
            raise ValueError(
                f"auto_augment_constants={self.auto_augment_constants!r}: expected one "
                f"of {autoaugment.CONSTANTS}"
            )
        for name in ("source_tags", "cache", "skip_bad_records"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
        extra_views = preprocessing.check_extra_views(self.extra_views)
        buffer = self.shuffle_buffer
        if buffer is not None and (
            isinstance(buffer, bool) or not isinstance(buffer, numbers.Integral)
            or buffer < 1
        ):
            raise ValueError(f"shuffle_buffer={buffer!r}: expected None or an integer >= 1")
        if self.holdout_shards is not None:
            _check_holdout_shards(self.holdout_shards)
        for name, value in (("randaugment_layers", layers),
                            ("randaugment_magnitude", magnitude),
                            ("auto_augment_fraction", fraction),
                            ("extra_views", extra_views)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_data_config(cls, data_cfg, recipe=None):
        """The options of a resolved ExperimentConfig's ``data`` section (a
        config.DataConfig, or anything with its fields) for its training data.

        ``augmentation``, ``auto_augment``, ``randaugment_layers``,
        ``randaugment_magnitude``, ``auto_augment_fraction`` (None -> 1) and
        ``skip_bad_records`` come from ``data_cfg``; the other fields keep their
        defaults (``holdout_shards=None``: the DatasetInfo resolved with the
        config's holdout_shards carries it).  With a ``recipe`` (class or
        instance), ``source_tags=recipe.needs_source_tags`` and
        ``extra_views=recipe.input_views``.
        """
        if data_cfg.augmentation is None:
            raise ValueError(
                "augmentation=None: the data config is not resolved (config.resolve "
                "picks the augmentation from the image size)"
            )
        fraction = data_cfg.auto_augment_fraction
        options = dict(
            augmentation=data_cfg.augmentation,
            auto_augment=data_cfg.auto_augment,
            randaugment_layers=data_cfg.randaugment_layers,
            randaugment_magnitude=data_cfg.randaugment_magnitude,
            auto_augment_fraction=1.0 if fraction is None else fraction,
            skip_bad_records=bool(data_cfg.skip_bad_records),
        )
        if recipe is not None:
            options.update(source_tags=bool(recipe.needs_source_tags),
                           extra_views=tuple(recipe.input_views))
        return cls(**options)


def make_dataset(
    info,
    data_dir,
    split,
    *,
    batch_size,
    image_size,
    is_training,
    seed=0,
    start_step=0,
    input_context=None,
    skip_counter=None,
    options=InputOptions(),
) -> tf.data.Dataset:
    """Batched (images float32 [B,H,W,3] in [0,255], labels int32 [B]) dataset.

    With ``options.source_tags=True`` or a non-empty ``options.extra_views``
    each element is ``(images, labels, extras)``, extras a dict (module
    docstring): with ``source_tags``, ``extras["source_tags"]`` int32 [B] (0 =
    clean image, 1 = augmented by AutoAugment/RandAugment); with "tda" in
    ``extra_views``, ``extras["tda_images"]`` float32 [B,H,W,3] in [0,255].

    Args:
      info: DatasetInfo from resolve_dataset.
      data_dir: the data directory (ignored for "embedded").
      split: "train" or "eval" ("validation" and "test" mean "eval").
      batch_size: per-pipeline batch size.
      image_size: output height and width.
      is_training: True: infinite shuffled, augmented stream with
        drop_remainder; False: one pass in file order, no augmentation,
        partial last batch kept.
      seed: run seed (shuffling and augmentation).
      start_step: number of batches to skip (resume); training only.
      input_context: tf.distribute.InputContext or None; each input pipeline
        reads a disjoint part of the split.
      skip_counter: with ``options.skip_bad_records``, an int64 tf.Variable on
        the host (``make_skip_counter()``) that the number of dropped records
        is added to; None: drop without counting.
      options: an InputOptions: augmentation and reading options (its
        docstring).  ``extra_views`` and ``skip_bad_records`` are training only
        (ValueError for eval).
    """
    if not isinstance(options, InputOptions):
        raise TypeError(f"options={options!r}: expected an InputOptions")
    augmentation = options.augmentation
    source_tags = options.source_tags
    extra_views = options.extra_views
    cache = options.cache
    skip_bad_records = options.skip_bad_records
    if split in ("validation", "test"):
        split = "eval"
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    if extra_views and not is_training:
        raise ValueError(f"extra_views={extra_views}: training data only")
    batch_size = int(batch_size)
    image_size = int(image_size)
    if batch_size < 1 or image_size < 1:
        raise ValueError(
            f"batch_size={batch_size}, image_size={image_size}: " "must be positive"
        )
    if int(start_step) < 0:
        raise ValueError(f"start_step={start_step}: must be >= 0")
    info_holdout = int(getattr(info, "holdout_shards", 0) or 0)
    holdout_shards = options.holdout_shards
    if holdout_shards is None:
        holdout_shards = info_holdout
    holdout_shards = _check_holdout_shards(holdout_shards)
    if info_holdout and holdout_shards != info_holdout:
        raise ValueError(
            f"holdout_shards={holdout_shards} contradicts the dataset info's "
            f"holdout_shards={info_holdout} (set it in resolve_dataset only)"
        )
    if split == "eval" and info.num_eval == 0 and not holdout_shards:
        raise ValueError(f"--dataset={info.name}: no eval split available")
    if skip_bad_records and not is_training:
        raise ValueError("skip_bad_records: training data only (evaluation never skips)")
    if skip_counter is not None and not skip_bad_records:
        raise ValueError("skip_counter needs skip_bad_records=True")

    source = _source(
        info, data_dir, split, input_context, is_training, cache, holdout_shards,
        skip_bad_records, skip_counter,
    )
    if is_training:
        ds = _train_dataset(
            source,
            batch_size=batch_size,
            image_size=image_size,
            seed=int(seed),
            start_step=int(start_step),
            augmentation=augmentation,
            shuffle_buffer=options.shuffle_buffer,
            auto_augment_options=dict(
                auto_augment=options.auto_augment,
                randaugment_layers=options.randaugment_layers,
                randaugment_magnitude=options.randaugment_magnitude,
                auto_augment_fraction=options.auto_augment_fraction,
                auto_augment_constants=options.auto_augment_constants,
            ),
            source_tags=source_tags,
            extra_views=extra_views,
            skip_bad_records=skip_bad_records,
            skip_counter=skip_counter,
        )
    else:
        ds = _eval_dataset(
            source,
            batch_size=batch_size,
            image_size=image_size,
            augmentation=augmentation,
            cache=cache,
            source_tags=source_tags,
        )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    tf_options = tf.data.Options()
    tf_options.deterministic = True
    tf_options.threading.max_intra_op_parallelism = 1
    tf_options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF
    )
    return ds.with_options(tf_options)
