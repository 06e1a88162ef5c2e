"""A TensorFlow-free input path: decoded splits in memory, numpy batch streams and
on-device CIFAR-style augmentation in ``keras.ops``.

For machines with only jax + keras + numpy + Pillow (the JAX engine); nothing imported
here imports TensorFlow or protobuf. Public API::

  data = make_numpy_input(dataset, data_dir, split, batch_size, image_size, seed,
                          is_training, start_step=0, holdout_shards=0)
  # -> NumpyInput(stream, num_examples, num_classes)
  for images, labels in data.stream: ...        # uint8 [B,H,W,3], int32 [B]
  checkpoint["data"] = data.stream.state()       # resume: start_step=state["step"]
  x = pad_crop_flip(images, seed)                # float32 [B,H,W,3] in [0, 255]

Sources (``dataset``, with ``data_dir``):

* ``"embedded"``: the CIFAR-10 subset shipped in ``data/embedded`` (data_dir
  ignored), split as :func:`efficientnet_advprop.data.resolve_dataset` splits it:
  "train" = train-* and "eval" = validation-*, or with ``holdout_shards=N`` the first
  N train-* files (sorted) are "eval" and the others "train".
* ``"imagenet"``: an official-layout TFRecord directory, the same rules
  (:mod:`efficientnet_advprop.data.tfrecord_lite`; labels stored 1-based, read 0-based).
* ``"folder"``: an image-folder directory with the class ids and the train/eval split
  of :mod:`efficientnet_advprop.data.image_folder`
  (:mod:`efficientnet_advprop.data.image_folder_scan`).
* ``"cifar_tar"``: ``data_dir`` is the CIFAR-10 JPEG tarball
  (``../shared/data/cifar10-train-jpeg.tar.gz``, ``train/<class>/<name>.jpg``), split
  by :func:`efficientnet_advprop.data.cifar_tar.select` with ``eval_first=True``: per
  class, the sorted file names shuffled with ``random.Random(split_seed)``, the first
  ``eval_per_class`` held out ("eval") and the next ``train_per_class`` (None: all
  the rest) "train". The defaults (500 held out per class, split seed 0) are the
  claims suite's 45,000 / 5,000 split (:mod:`efficientnet_advprop.claims`).
* ``None``: the embedded set without a data_dir; with one, "imagenet" when it holds
  train-*/validation-* files, "folder" when it has class folders, "cifar_tar" for a
  ``.tar.gz``/``.tgz`` file. (``tfds:`` datasets need TensorFlow: ValueError.)

Decoding: Pillow, to uint8 RGB (grayscale/palette/CMYK converted, alpha dropped, the
first frame of a GIF). An image is resized to ``image_size x image_size`` only when it
is not already that size, with Pillow's bicubic filter (``Image.BICUBIC``, Keys cubic
a = -0.5, which widens its support when shrinking, i.e. antialiases; aspect ratio not
kept). The TensorFlow pipeline's bicubic (``tf.image.resize``, no antialiasing) gives
different pixels for resized images (on the embedded set, against the TF pipeline:
mean 1 level, max 9, enlarged 32 -> 48 px; mean 2.5, max 47, shrunk to 24 px). Images
at their native size differ only by JPEG decoding: both use libjpeg-turbo, but
TensorFlow's ``decode_jpeg``/``decode_image`` default to the fast integer IDCT and
Pillow uses the accurate one (bit-identical to TF's
``dct_method="INTEGER_ACCURATE"``); on the embedded validation set the TF pipeline's
pixels differ by at most 5 levels, 1 on average (tests/test_numpy_input.py). There is
no Inception crop or padded center crop here: eval images are whole-image resizes (the
TF pipeline's ``augmentation="none"``/"cifar" eval).

Memory: a split is decoded once and kept as one read-only uint8 array [N, H, W, 3]
(N * H * W * 3 bytes: 45,000 CIFAR images at 32 px take 138 MB) plus int32 labels;
the last few splits loaded are cached in the process (:func:`load_split`). This path
is meant for CIFAR-sized data, not a full ImageNet.

Streams (:class:`NumpyStream`): training streams are infinite; epoch ``e`` is the
permutation ``np.random.default_rng([seed, e]).permutation(N)`` cut into
``N // batch_size`` batches (the remainder of each epoch is dropped), so the batch of
any step is computed directly and ``start_step`` resumes exactly. Eval streams are one
pass in order with the last, partial batch kept. The permutation is not the TF
pipeline's (a different generator): the two engines see the same examples per epoch in
different orders.

Augmentation (:func:`pad_crop_flip`): the TF pipeline's ``augmentation="cifar"``
(reflect padding; ``mode="constant"`` is ``"cifar_zeros"``) on a whole batch, in
``keras.ops`` and the seam's stateless random ops, so it runs jitted on JAX and on
TensorFlow. Its random numbers differ from the TF pipeline's per-example ones.
"""

import collections
import functools
import io
import os

import keras
import numpy as np
from keras import ops
from PIL import Image

from efficientnet_advprop import seam
from efficientnet_advprop.data import cifar_tar
from efficientnet_advprop.data import image_folder_scan
from efficientnet_advprop.data import tfrecord_lite
from efficientnet_advprop.data.info import DatasetInfo

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
EMBEDDED_IMAGE_SIZE = 32
DATASETS = ("embedded", "imagenet", "folder", "cifar_tar")
# The claims suite's split of the CIFAR-10 tarball (efficientnet_advprop.claims).
CIFAR_EVAL_PER_CLASS = 500
CIFAR_SPLIT_SEED = 0
CIFAR_PAD = 4
PAD_MODES = ("reflect", "constant")
IMAGENET_NUM_CLASSES = 1000

SplitArrays = collections.namedtuple(
    "SplitArrays", ["images", "labels", "num_classes", "class_names"])
SplitArrays.__doc__ = """One decoded split: images uint8 [N,H,W,3] and labels int32 [N]
(both read-only), the dataset's number of classes and its class names (may be ())."""

NumpyInput = collections.namedtuple("NumpyInput", ["stream", "num_examples", "num_classes"])
NumpyInput.__doc__ = """make_numpy_input's result: the NumpyStream, the number of
examples in the split and the dataset's number of classes."""


# ---------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------
def decode_image(data, image_size=None):
    """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] RGB; bicubic-resized (Pillow)
    to image_size x image_size when image_size is given and differs from the image."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(image, np.uint8)


def decode_images(encoded, image_size=None, names=None):
    """uint8 [N, S, S, 3] of a list of encoded images (see :func:`decode_image`).

    image_size None: keep every image's size, which must then be the same for all.
    names: per-image names (paths) for the error messages. Raises a one-line ValueError
    naming the image that does not decode or does not match.
    """
    out = None
    for i, data in enumerate(encoded):
        name = names[i] if names is not None else f"image {i}"
        try:
            image = decode_image(data, image_size)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{name}: cannot decode image ({' '.join(str(e).split())})"
                             ) from None
        if out is None:
            out = np.empty((len(encoded),) + image.shape, np.uint8)
        elif image.shape != out.shape[1:]:
            raise ValueError(f"{name}: image is {image.shape[1]}x{image.shape[0]}, the "
                             f"first one {out.shape[2]}x{out.shape[1]}; pass image_size")
        out[i] = image
    if out is None:
        size = image_size or 0
        out = np.empty((0, size, size, 3), np.uint8)
    return out


# ---------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------
def canonical_split(split):
    """"train" or "eval" ("validation" and "test" are "eval"); ValueError otherwise."""
    if split in ("validation", "test"):
        split = "eval"
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    return split


def resolve_source(dataset=None, data_dir=None):
    """(dataset name from DATASETS, data_dir) for the given flags; a one-line
    ValueError naming the path or the name when they do not describe a source."""
    dataset = str(dataset).strip() if dataset is not None else ""
    data_dir = os.fspath(data_dir) if data_dir else None
    if not dataset:
        if data_dir is None:
            return "embedded", None
        if os.path.isfile(data_dir) and data_dir.endswith((".tar.gz", ".tgz")):
            return "cifar_tar", data_dir
        _check_dir(data_dir, "(auto)")
        if (tfrecord_lite.list_files(data_dir, "train")
                or tfrecord_lite.list_files(data_dir, "eval")):
            return "imagenet", data_dir
        if image_folder_scan.has_layout(data_dir):
            return "folder", data_dir
        raise ValueError(f"--data_dir={data_dir}: no train-* TFRecord files or train/ "
                         "class folders found")
    if dataset == "embedded":
        return dataset, None
    if dataset in ("imagenet", "folder"):
        _check_dir(data_dir, dataset)
        return dataset, data_dir
    if dataset == "cifar_tar":
        if not data_dir:
            raise ValueError("--dataset=cifar_tar needs --data_dir (the CIFAR-10 JPEG "
                             "tar.gz; none given)")
        if not os.path.isfile(data_dir):
            raise ValueError(f"--data_dir={data_dir}: no such file (--dataset=cifar_tar "
                             "reads the CIFAR-10 JPEG tar.gz)")
        return dataset, data_dir
    if dataset.startswith("tfds:"):
        raise ValueError(f"--dataset={dataset}: TFDS datasets need TensorFlow; the numpy "
                         f"input reads {', '.join(DATASETS)}")
    raise ValueError(f"--dataset={dataset}: unknown dataset; the numpy input reads "
                     f"{', '.join(DATASETS)}")


def _check_dir(data_dir, dataset):
    if not data_dir:
        raise ValueError(f"--dataset={dataset} needs --data_dir (none given)")
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir}: directory does not exist")


def _tfrecord_split(data_dir, split, image_size, holdout_shards, verify_crc):
    encoded, labels = tfrecord_lite.read_split(data_dir, split, holdout_shards,
                                               verify_crc=verify_crc)
    meta = tfrecord_lite.read_metadata(data_dir) or {}
    class_names = tuple(meta.get("class_names", ()))
    num_classes = int(meta.get("num_classes", len(class_names) or IMAGENET_NUM_CLASSES))
    names = [f"{data_dir}: {split} record {i}" for i in range(len(encoded))]
    return decode_images(encoded, image_size, names), labels, num_classes, class_names


@functools.lru_cache(maxsize=1)
def _read_tar(path):
    return cifar_tar.read_tar(path)


def cifar_split(path, train_per_class=None, eval_per_class=CIFAR_EVAL_PER_CLASS,
                split_seed=CIFAR_SPLIT_SEED):
    """(class_names, train, evals) of the CIFAR-10 tarball at ``path``: lists of
    (class, file name, label) drawn by ``cifar_tar.select(..., eval_first=True)``
    (disjoint; per class the held-out images are drawn first, so which images are held
    out does not depend on train_per_class, though their shuffled order does). The
    tarball's contents stay cached (one path at a time)."""
    if not os.path.isfile(path):
        raise ValueError(f"--data_dir={path}: no such file (the CIFAR-10 JPEG tar.gz)")
    images = _read_tar(path)
    if not images:
        raise ValueError(f"--data_dir={path}: no train/<class>/*.jpg images in the tarball")
    return cifar_tar.select(images, train_per_class, eval_per_class, split_seed,
                            eval_first=True)


def _cifar_tar_split(path, split, image_size, train_per_class, eval_per_class,
                     split_seed):
    class_names, train, evals = cifar_split(path, train_per_class, eval_per_class,
                                            split_seed)
    items = train if split == "train" else evals
    images = _read_tar(path)
    encoded = [images[cls][name] for cls, name, _ in items]
    names = [f"{path}: train/{cls}/{name}" for cls, name, _ in items]
    labels = np.asarray([label for _, _, label in items], np.int32)
    return (decode_images(encoded, image_size, names), labels, len(class_names),
            tuple(class_names))


def _folder_split(data_dir, split, image_size):
    class_names, train, evals = image_folder_scan.scan(data_dir)
    items = train if split == "train" else evals
    encoded = []
    for path, _ in items:
        with open(path, "rb") as f:
            encoded.append(f.read())
    labels = np.asarray([label for _, label in items], np.int32)
    names = [path for path, _ in items]
    return (decode_images(encoded, image_size, names), labels, len(class_names),
            tuple(class_names))


@functools.lru_cache(maxsize=4)
def load_split(dataset=None, data_dir=None, split="train", image_size=None,
               holdout_shards=0, *, verify_crc=True, train_per_class=None,
               eval_per_class=CIFAR_EVAL_PER_CLASS, split_seed=CIFAR_SPLIT_SEED):
    """Decodes one whole split into memory -> :class:`SplitArrays` (cached: the last
    four calls' results are kept, as read-only arrays).

    dataset, data_dir: see the module docstring (:func:`resolve_source`).
    split: "train" or "eval" ("validation"/"test" = "eval").
    image_size: output height and width; None keeps the native size (32 for the
      embedded set; other sources need all images of one size).
    holdout_shards: TFRecord sources only (embedded, imagenet): N >= 1 takes "eval"
      from the first N train-* files and "train" from the others.
    verify_crc: check the TFRecord checksums.
    train_per_class, eval_per_class, split_seed: the cifar_tar split
      (:func:`cifar_split`).

    Order: files sorted by name and records in file order (TFRecord), sorted (class,
    file name) (folder), the split's shuffled order (cifar_tar). Raises a one-line
    ValueError naming the path on a missing/damaged source or a label outside
    [0, num_classes) (e.g. a TFRecord written with 0-based labels).
    """
    split = canonical_split(split)
    dataset, data_dir = resolve_source(dataset, data_dir)
    if image_size is not None:
        image_size = int(image_size)
        if image_size < 1:
            raise ValueError(f"image_size={image_size}: must be positive")
    holdout_shards = int(holdout_shards or 0)
    if holdout_shards and dataset not in ("embedded", "imagenet"):
        raise ValueError(f"--holdout_shards={holdout_shards}: only for TFRecord data "
                         f"(--dataset=imagenet or embedded), not --dataset={dataset}")
    if dataset == "embedded":
        where = EMBEDDED_DIR
        images, labels, num_classes, class_names = _tfrecord_split(
            EMBEDDED_DIR, split, image_size or EMBEDDED_IMAGE_SIZE, holdout_shards,
            verify_crc)
    elif dataset == "imagenet":
        where = data_dir
        images, labels, num_classes, class_names = _tfrecord_split(
            data_dir, split, image_size, holdout_shards, verify_crc)
    elif dataset == "folder":
        where = data_dir
        images, labels, num_classes, class_names = _folder_split(data_dir, split,
                                                                 image_size)
    else:
        where = data_dir
        images, labels, num_classes, class_names = _cifar_tar_split(
            data_dir, split, image_size, train_per_class, eval_per_class, split_seed)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"--data_dir={where}: {split} labels span {labels.min()}.."
                         f"{labels.max()}, outside [0, {num_classes})")
    images.setflags(write=False)
    labels.setflags(write=False)
    return SplitArrays(images, labels, num_classes, class_names)


# ---------------------------------------------------------------------------
# Streams.
# ---------------------------------------------------------------------------
class NumpyStream:
    """Batches (uint8 images [B,H,W,3], int32 labels [B]) of in-memory arrays.

    Training (``is_training=True``): infinite; epoch ``e`` visits
    ``np.random.default_rng([seed, e]).permutation(N)`` in ``N // batch_size``
    batches (``drop_remainder`` must be True: the rest of each epoch is dropped).
    Step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``,
    computed directly, so ``start_step`` resumes exactly without replaying.

    Eval (``is_training=False``): one pass in array order; the last batch is partial
    unless ``drop_remainder=True``. A consumer knows a batch's real size from
    ``labels.shape[0]`` (only the last batch can be shorter; :func:`pad_batch` pads it
    back to a fixed shape with a mask). ``seed`` is not used.

    The stream is an iterator; ``position`` is the step of the next batch it yields
    and :meth:`state` a dict to checkpoint (:meth:`resume` restarts from it).
    :meth:`batch` returns any step's batch without moving the stream.
    """

    def __init__(self, images, labels, batch_size, seed=0, is_training=True,
                 start_step=0, drop_remainder=None):
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, np.int32)
        if self.images.shape[:1] != self.labels.shape[:1] or self.labels.ndim != 1:
            raise ValueError(f"images {self.images.shape} and labels {self.labels.shape}: "
                             "expected [N, ...] and [N]")
        self.batch_size = _nonnegative_int(batch_size, "batch_size")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be positive")
        self.seed = _nonnegative_int(seed, "seed")
        self.is_training = bool(is_training)
        self.position = _nonnegative_int(start_step, "start_step")
        if drop_remainder is None:
            drop_remainder = self.is_training
        self.drop_remainder = bool(drop_remainder)
        n = self.num_examples
        if self.is_training:
            if not self.drop_remainder:
                raise ValueError("drop_remainder=False: training streams drop the rest "
                                 "of each epoch (epochs of N // batch_size batches)")
            self.steps_per_epoch = n // self.batch_size
            if self.steps_per_epoch < 1:
                raise ValueError(f"batch_size={self.batch_size} is larger than the {n} "
                                 "training examples")
            self.num_batches = None
        else:
            self.steps_per_epoch = None
            self.num_batches = (n // self.batch_size if self.drop_remainder
                                else -(-n // self.batch_size))
        self._permutation = (None, None)  # (epoch, permutation)

    @property
    def num_examples(self):
        return int(self.labels.shape[0])

    @property
    def epoch(self):
        """The epoch of the next batch (training; eval: 0)."""
        return self.position // self.steps_per_epoch if self.is_training else 0

    def permutation(self, epoch):
        """Example order of a training epoch (int64 [N])."""
        if self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._permutation = (epoch, rng.permutation(self.num_examples))
        return self._permutation[1]

    def indices(self, step):
        """Example indices of batch ``step``."""
        step = _nonnegative_int(step, "step")
        b = self.batch_size
        if self.is_training:
            epoch, offset = divmod(step, self.steps_per_epoch)
            return self.permutation(epoch)[offset * b:(offset + 1) * b]
        if step >= self.num_batches:
            raise IndexError(f"step {step}: the eval stream has {self.num_batches} batches")
        return np.arange(step * b, min(self.num_examples, (step + 1) * b))

    def batch(self, step):
        """(images, labels) of batch ``step`` (new arrays; the stream does not move)."""
        idx = self.indices(step)
        return self.images[idx], self.labels[idx]

    def __iter__(self):
        return self

    def __next__(self):
        if not self.is_training and self.position >= self.num_batches:
            raise StopIteration
        out = self.batch(self.position)
        self.position += 1
        return out

    def __len__(self):
        if self.is_training:
            raise TypeError("a training NumpyStream is infinite (see steps_per_epoch)")
        return self.num_batches

    def state(self):
        """What a checkpoint needs to resume this stream (a dict of ints/bools)."""
        return {"step": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": self.num_examples, "is_training": self.is_training,
                "drop_remainder": self.drop_remainder}

    @classmethod
    def resume(cls, images, labels, state):
        """The stream of ``state`` (from :meth:`state`) over the same arrays, at its
        position; ValueError when the arrays hold another number of examples."""
        if int(state["num_examples"]) != len(labels):
            raise ValueError(f"cannot resume: the state is of {state['num_examples']} "
                             f"examples, the data has {len(labels)}")
        return cls(images, labels, state["batch_size"], state["seed"],
                   state["is_training"], start_step=state["step"],
                   drop_remainder=state["drop_remainder"])


def _nonnegative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    return int(value)


def pad_batch(images, labels, batch_size):
    """Pads a (partial) batch to ``batch_size`` rows with zeros -> (images, labels,
    mask): mask float32 [batch_size], 1 for the real examples, 0 for the padding (so
    a jitted eval step keeps one shape)."""
    n = labels.shape[0]
    if n > batch_size:
        raise ValueError(f"batch of {n} is larger than batch_size={batch_size}")
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1.0
    if n == batch_size:
        return images, labels, mask
    pad = batch_size - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return images, labels, mask


def resolve_dataset(dataset=None, data_dir=None, holdout_shards=None,
                    skip_bad_records=False):
    """The DatasetInfo of a source, as `data.resolve_dataset` gives it, read by
    decoding both splits at their native size (they are cached for the run).
    skip_bad_records is refused: this path reads every record (a damaged one raises
    a ValueError naming the file)."""
    if skip_bad_records:
        raise ValueError("--skip_bad_records: the TF-free input path reads every record; "
                         "a damaged one stops the run (install TensorFlow to skip them)")
    name, _ = resolve_source(dataset, data_dir)
    train = load_split(dataset, data_dir, "train", None, holdout_shards or 0)
    held_out = load_split(dataset, data_dir, "eval", None, holdout_shards or 0)
    return DatasetInfo(name, train.num_classes, len(train.labels), len(held_out.labels),
                       int(train.images.shape[1]), tuple(train.class_names),
                       int(holdout_shards or 0))


def make_numpy_input(dataset, data_dir, split, batch_size, image_size, seed, is_training,
                     start_step=0, holdout_shards=0, **source_options):
    """The numpy input of one split -> NumpyInput(stream, num_examples, num_classes).

    dataset, data_dir: the source (module docstring; None, None = embedded).
    split: "train" or "eval". batch_size: examples per batch. image_size: output size.
    seed: training shuffle seed (int >= 0). is_training: infinite shuffled stream
    (True) or one ordered pass (False); see :class:`NumpyStream`.
    start_step: the step to start at (resume).
    holdout_shards: TFRecord sources: the first N train-* files are the eval split.
    source_options: ``verify_crc``, and for cifar_tar ``train_per_class``,
      ``eval_per_class``, ``split_seed`` (:func:`load_split`).
    The images are uint8; :func:`pad_crop_flip` augments them on the device.
    """
    if image_size is None:
        raise ValueError("image_size: required (an int)")
    data = load_split(dataset, data_dir, split, int(image_size), holdout_shards,
                      **source_options)
    stream = NumpyStream(data.images, data.labels, batch_size, seed, is_training,
                         start_step=start_step)
    return NumpyInput(stream, stream.num_examples, data.num_classes)


# ---------------------------------------------------------------------------
# Augmentation (keras.ops; jit-able on JAX, runs on TensorFlow).
# ---------------------------------------------------------------------------
def _seed_tensor(seed):
    """A [2] integer seed tensor (the seam's seeds) from: an int (the pair [seed mod
    2**32, 0]), an integer scalar tensor (the pair [seed, 0]), a
    keras.random.SeedGenerator (advanced by one) or a [2] integer seed tensor."""
    if isinstance(seed, keras.random.SeedGenerator):
        return seed.next()
    if isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: expected an int or an integer seed tensor")
    if isinstance(seed, (int, np.integer)):
        return seam.make_seed(np.uint32(int(seed) % (1 << 32)), np.uint32(0))
    if len(ops.shape(seed)) == 0:
        return seam.make_seed(seed, 0)
    return seed


def crop_flip_params(batch_size, seed, pad=CIFAR_PAD):
    """The random draws of :func:`pad_crop_flip` -> (offset_y, offset_x, flip), int32
    [batch_size] each: crop offsets into the padded image in [0, 2 * pad] and flip
    decisions in {0, 1}. Deterministic per seed (and backend)."""
    seed = _seed_tensor(seed)
    offsets = seam.uniform((batch_size, 2), seam.fold_in(seed, 0), 0, 2 * pad + 1, "int32")
    flip = seam.uniform((batch_size,), seam.fold_in(seed, 1), 0, 2, "int32")
    return offsets[:, 0], offsets[:, 1], flip


def apply_crop_flip(images, offset_y, offset_x, flip, pad=CIFAR_PAD, mode="reflect"):
    """Pads ``pad`` pixels on each side (``mode``: "reflect" as the TF pipeline's
    augmentation="cifar", "constant" zeros as "cifar_zeros"), takes the HxW window at
    (offset_y, offset_x) of each padded image and mirrors it left-right where flip is
    1. images: [N,H,W,C] (static H, W, C), any real or integer dtype. Returns float32.

    One gather from the padded batch: output pixel (n, i, j) is padded pixel
    (n, offset_y + i, offset_x + j), or (n, offset_y + i, offset_x + W - 1 - j) when
    flipped (= crop, then flip).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {PAD_MODES}")
    _, h, w, c = images.shape
    x = ops.cast(images, "float32")
    padded = ops.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode)
    hp, wp = h + 2 * pad, w + 2 * pad
    n = ops.shape(x)[0]
    offset_y = ops.cast(offset_y, "int32")
    offset_x = ops.cast(offset_x, "int32")
    flip = ops.cast(flip, "int32")
    rows = ops.expand_dims(offset_y, 1) + ops.arange(h, dtype="int32")[None, :]
    forward = ops.arange(w, dtype="int32")[None, :]
    cols = ops.expand_dims(offset_x, 1) + ops.where(
        ops.expand_dims(flip, 1) > 0, (w - 1) - forward, forward)
    base = ops.arange(n, dtype="int32")[:, None, None] * hp
    flat = (base + rows[:, :, None]) * wp + cols[:, None, :]
    out = ops.take(ops.reshape(padded, (-1, c)), ops.reshape(flat, (-1,)), axis=0)
    return ops.reshape(out, (-1, h, w, c))


def pad_crop_flip(images, seed, pad=CIFAR_PAD, mode="reflect"):
    """CIFAR-style augmentation of a batch on the device: pad ``pad`` px (reflect, as
    the TF pipeline's augmentation="cifar"; "constant" = zeros, as "cifar_zeros"),
    random crop back to HxW, random horizontal flip, each image with its own draws.

    images: [N,H,W,C] uint8 or float in [0, 255]; returns float32 [N,H,W,C] in
    [0, 255]. seed: a [2] integer seed tensor such as ``seam.make_seed(run_seed,
    step)`` (uint32 or int32 on JAX -- a raw threefry key --, int64 on TensorFlow); or a
    non-negative int or integer scalar tensor s, used as the pair [s, 0] (an argument of
    a jitted function is traced, so changing it does not recompile); or a
    ``keras.random.SeedGenerator``, advanced by one (under JAX jit only inside a
    ``keras.StatelessScope``). The same seed gives the same output; the numbers drawn
    differ between backends and from the TF pipeline's. :func:`crop_flip_params` returns the
    draws, :func:`apply_crop_flip` applies given ones.
    """
    n = images.shape[0]
    if n is None:
        n = ops.shape(images)[0]
    offset_y, offset_x, flip = crop_flip_params(n, seed, pad)
    return apply_crop_flip(images, offset_y, offset_x, flip, pad, mode)
