"""TFRecord files and ``tf.train.Example`` protos read without TensorFlow or protobuf.

Reads the official EfficientNet/ImageNet TFRecord layout that
:mod:`efficientnet_advprop.data.tfrecord` writes and reads (``data_dir/train-*`` and
``data_dir/validation-*`` shards, an optional ``dataset_info.json``), with the same
split rules, for machines that have only numpy (the JAX engine's input path,
:mod:`efficientnet_advprop.data.numpy_input`). Local files only (no ``gs://``).

Record framing (each record of a file, little-endian)::

  uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8 (mod 2**32), crc the CRC-32C
(Castagnoli) of x. Both checksums of every record are verified (``verify_crc=True``,
the default): CRC-32C is computed with a 256-entry table in numpy, all records of a
file at once (:func:`crc32c_many`; about 60 MB/s on one CPU core). A
truncated or corrupt file raises a one-line ValueError naming the file and the record.

Compression: GZIP or ZLIB files (TFRecordOptions) are decompressed whole in memory,
as one file is read at a time; the compression comes from ``dataset_info.json`` when
it names it for the split, else from the file's first bytes (gzip magic 1f 8b 08), as
in the TensorFlow reader.

Example protos are decoded with a minimal protobuf wire-format parser
(:func:`parse_example`): ``Example.features`` (field 1) -> ``Features.feature`` (field
1, map<string, Feature> entries: key 1, value 2) -> ``Feature`` oneof ``bytes_list``
(1), ``float_list`` (2), ``int64_list`` (3), each a ``repeated value = 1``, packed or
not. Unknown fields are skipped; a repeated map key or oneof keeps the last one, as
protobuf does.

Labels follow :func:`efficientnet_advprop.data.tfrecord.parse_example`: the stored
``image/class/label`` is 1-based (1..num_classes, the official convention, also used
by the embedded set and by ``write_tfrecords``) and the reader always subtracts 1,
whatever ``label_offset`` dataset_info.json records (the TensorFlow reader ignores it
too). ``image/encoded`` and ``image/class/label`` must each hold exactly one value
(``tf.io.FixedLenFeature([])``).
"""

import functools
import glob
import gzip
import json
import os
import struct
import zlib

import numpy as np

from efficientnet_advprop.utils.records import CRC32C_TABLE
from efficientnet_advprop.utils.records import crc32c as crc32c_bytes

METADATA_FILE = "dataset_info.json"
SPLIT_PREFIX = {"train": "train", "eval": "validation", "validation": "validation"}
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"

# ---------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78.
# ---------------------------------------------------------------------------
_MASK_DELTA = 0xA282EAD8
_TABLE = CRC32C_TABLE
_crc32c_py = crc32c_bytes  # one record at a time, in Python (short records)


@functools.lru_cache(maxsize=16)
def _zeros_operator(n):
    """[4, 256] uint32 tables Z with raw(x, n zero bytes) = Z[0][x & 0xFF] ^
    Z[1][(x >> 8) & 0xFF] ^ Z[2][(x >> 16) & 0xFF] ^ Z[3][x >> 24]: the register after
    n zero bytes from register x (the map is linear over GF(2))."""
    byte = np.arange(256, dtype=np.uint32)[None, :]
    position = 8 * np.arange(4, dtype=np.uint32)[:, None]
    state = (byte << position).reshape(-1)
    for _ in range(n):
        state = _TABLE[state & 0xFF] ^ (state >> 8)
    return state.reshape(4, 256)


def _apply_zeros(tables, x):
    return (tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF]
            ^ tables[2][(x >> 16) & 0xFF] ^ tables[3][x >> 24])


def crc32c_many(buffer, starts, lengths):
    """CRC-32C of the byte ranges ``buffer[s:s + n]`` (uint32 array, one per range).

    Vectorised over all ranges at once: every range is cut into chunks of C bytes
    (C a power of two near the square root of the longest range), all chunks are run
    through the byte table together (C numpy steps), and each range's chunk registers
    are then folded together with a "C zero bytes" operator (one numpy step per chunk
    of the longest range). Three facts make this exact for a reflected CRC with a zero
    register: leading zero bytes leave the register at zero (so ranges are zero-padded
    in front to a whole number of chunks); raw(A + B) = zeros_|B|(raw(A)) ^ raw(B);
    and the standard initial register 0xFFFFFFFF equals XOR-ing 0xFF into the first
    four bytes (ranges shorter than 4 bytes take the plain byte loop).
    """
    if not isinstance(buffer, np.ndarray):
        buffer = np.frombuffer(buffer, np.uint8)
    starts = np.asarray(starts, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    out = np.zeros(len(starts), np.uint32)
    short = np.flatnonzero(lengths < 4)
    for i in short:
        out[i] = _crc32c_py(buffer[starts[i]:starts[i] + lengths[i]].tolist())
    long_ = np.flatnonzero(lengths >= 4)
    if not len(long_):
        return out
    starts, lengths = starts[long_], lengths[long_]
    chunk = int(np.clip(1 << int(np.ceil(np.log2(np.sqrt(lengths.max())))), 16, 1 << 14))
    num_chunks = -(-lengths // chunk)
    first_chunk = np.concatenate([[0], np.cumsum(num_chunks)[:-1]])
    padded = np.zeros(int(num_chunks.sum()) * chunk, np.uint8)
    message_starts = (first_chunk + num_chunks) * chunk - lengths
    for s, n, d in zip(starts.tolist(), lengths.tolist(), message_starts.tolist()):
        padded[d:d + n] = buffer[s:s + n]
    for k in range(4):  # the initial register 0xFFFFFFFF
        padded[message_starts + k] ^= 0xFF
    columns = np.ascontiguousarray(padded.reshape(-1, chunk).T)
    registers = np.zeros(columns.shape[1], np.uint32)
    for column in columns:
        registers = _TABLE[(registers ^ column) & 0xFF] ^ (registers >> 8)
    # Fold the chunks of each range, right-aligned: a range with fewer chunks than the
    # longest sees zero chunks first, which keep its register at zero.
    shift = _zeros_operator(chunk)
    most = int(num_chunks.max())
    crc = np.zeros(len(starts), np.uint32)
    for j in range(most):
        index = first_chunk + j - (most - num_chunks)
        valid = j >= most - num_chunks
        crc = _apply_zeros(shift, crc) ^ np.where(valid, registers[np.maximum(index, 0)], 0)
    out[long_] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def crc32c(data):
    """CRC-32C of a bytes-like object (int)."""
    data = np.frombuffer(bytes(data), np.uint8)
    return int(crc32c_many(data, [0], [len(data)])[0])


def mask_crc(crc):
    """TFRecord's masked CRC of an unmasked CRC-32C value (int or uint32 array)."""
    crc = np.asarray(crc, np.uint64)
    masked = (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
    return masked.astype(np.uint32)


# ---------------------------------------------------------------------------
# TFRecord files.
# ---------------------------------------------------------------------------
def detect_compression(path):
    """ "GZIP" when the file starts with the gzip magic (1f 8b 08), else ""."""
    with open(path, "rb") as f:
        return "GZIP" if f.read(3) == b"\x1f\x8b\x08" else ""


def _file_bytes(path, compression):
    """The decompressed contents of one TFRecord file."""
    compression = (compression or "").upper()
    try:
        if compression == "GZIP":
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            data = f.read()
        if compression == "ZLIB":
            return zlib.decompress(data)
        if compression:
            raise ValueError(f"{path}: unknown TFRecord compression {compression!r}")
        return data
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise ValueError(f"{path}: no such TFRecord file") from None
        message = " ".join(str(e).split())
        raise ValueError(f"{path}: truncated or corrupt {compression} TFRecord file "
                         f"({message})") from None


def read_records(path, compression=None, verify_crc=True):
    """The records (list of bytes) of one TFRecord file, in file order.

    compression: None (from the file's first bytes), "" , "GZIP" or "ZLIB".
    verify_crc: check both masked CRC-32Cs of every record. A record running past the
    end of the file or a checksum mismatch raises a one-line ValueError naming the
    file and the record number.
    """
    if compression is None:
        compression = detect_compression(path)
    data = _file_bytes(path, compression)
    size = len(data)
    starts, lengths = [], []
    pos = n = 0
    while pos < size:
        if pos + 12 > size:
            raise ValueError(f"{path}: truncated or corrupt TFRecord file (record {n}: "
                             "incomplete header at the end of the file)")
        (length,) = struct.unpack_from("<Q", data, pos)
        if length > size - pos - 16:
            raise ValueError(f"{path}: truncated or corrupt TFRecord file (record {n} "
                             "runs past the end of the file)")
        starts.append(pos)
        lengths.append(length)
        pos += 16 + length
        n += 1
    if verify_crc and starts:
        buffer = np.frombuffer(data, np.uint8)
        starts_a = np.asarray(starts, np.int64)
        lengths_a = np.asarray(lengths, np.int64)
        header_crc = mask_crc(crc32c_many(buffer, starts_a, np.full(len(starts), 8)))
        data_crc = mask_crc(crc32c_many(buffer, starts_a + 12, lengths_a))
        stored_header = _u32_at(buffer, starts_a + 8)
        stored_data = _u32_at(buffer, starts_a + 12 + lengths_a)
        for what, got, want in (("length", header_crc, stored_header),
                                ("data", data_crc, stored_data)):
            bad = np.flatnonzero(got != want)
            if len(bad):
                raise ValueError(f"{path}: corrupt TFRecord file (record {int(bad[0])}: "
                                 f"{what} checksum mismatch)")
    return [data[s + 12:s + 12 + n] for s, n in zip(starts, lengths)]


def _u32_at(buffer, offsets):
    """Little-endian uint32 values at byte offsets of a uint8 array."""
    parts = [buffer[offsets + k].astype(np.uint32) << np.uint32(8 * k) for k in range(4)]
    return parts[0] | parts[1] | parts[2] | parts[3]


# ---------------------------------------------------------------------------
# tf.train.Example wire format.
# ---------------------------------------------------------------------------
def _varint(buf, pos, end):
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf, pos, end):
    """(field number, wire type, value) of the message buf[pos:end]: value is an int
    for varints, (start, stop) offsets for length-delimited fields, and the raw bytes
    for fixed32/fixed64."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if size > end - pos:
                raise ValueError(f"field {number} runs past the end of its message")
            value = (pos, pos + size)
            pos += size
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise ValueError(f"field {number} runs past the end of its message")
            value = buf[pos:pos + width]
            pos += width
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _signed64(v):
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >> 63 else v


def _parse_feature(buf, start, end):
    """(kind, values) of one Feature message: kind "bytes", "float" or "int64"."""
    kind, values = None, []
    for number, wire, value in _fields(buf, start, end):
        if number not in (1, 2, 3) or wire != 2:
            continue
        kind = {1: "bytes", 2: "float", 3: "int64"}[number]
        values = []
        s, e = value
        for inner, inner_wire, v in _fields(buf, s, e):
            if inner != 1:
                continue
            if kind == "bytes" and inner_wire == 2:
                values.append(bytes(buf[v[0]:v[1]]))
            elif kind == "int64" and inner_wire == 0:
                values.append(_signed64(v))
            elif kind == "int64" and inner_wire == 2:  # packed
                p, stop = v
                while p < stop:
                    x, p = _varint(buf, p, stop)
                    values.append(_signed64(x))
            elif kind == "float" and inner_wire == 5:
                values.append(struct.unpack("<f", v)[0])
            elif kind == "float" and inner_wire == 2:  # packed
                p, stop = v
                if (stop - p) % 4:
                    raise ValueError("packed float list length is not a multiple of 4")
                values.extend(struct.unpack(f"<{(stop - p) // 4}f", buf[p:stop]))
            else:
                raise ValueError(f"{kind}_list value with wire type {inner_wire}")
    return kind, values


def parse_example(serialized, keys=None):
    """{feature name: (kind, list of values)} of a serialized tf.train.Example.

    kind is "bytes", "float" or "int64" (None for a Feature with no list set, whose
    values are []). keys: decode only these feature names (others are skipped).
    Raises ValueError on a malformed message.
    """
    buf = bytes(serialized)
    wanted = None if keys is None else set(keys)
    out = {}
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number != 1 or wire != 2:
            continue
        for entry_number, entry_wire, entry in _fields(buf, *value):
            if entry_number != 1 or entry_wire != 2:
                continue
            name, feature = None, (len(buf), len(buf))
            for field, field_wire, v in _fields(buf, *entry):
                if field == 1 and field_wire == 2:
                    name = buf[v[0]:v[1]].decode("utf-8")
                elif field == 2 and field_wire == 2:
                    feature = v
            if name is None or (wanted is not None and name not in wanted):
                continue
            out[name] = _parse_feature(buf, *feature)
    return out


def image_and_label(serialized):
    """(encoded image bytes, 0-based label int) of one record, as
    :func:`efficientnet_advprop.data.tfrecord.parse_example` reads it (label - 1)."""
    features = parse_example(serialized, (IMAGE_KEY, LABEL_KEY))
    image = _single(features, IMAGE_KEY, "bytes")
    label = _single(features, LABEL_KEY, "int64")
    return image, label - 1


def _single(features, key, kind):
    if key not in features:
        raise ValueError(f"feature {key} ({kind}) is required but missing")
    got_kind, values = features[key]
    if got_kind != kind or len(values) != 1:
        raise ValueError(f"feature {key}: expected one {kind} value, got "
                         f"{len(values)} {got_kind} value(s)")
    return values[0]


# ---------------------------------------------------------------------------
# Splits (the rules of efficientnet_advprop.data.tfrecord, without TensorFlow).
# ---------------------------------------------------------------------------
def list_files(data_dir, split):
    """Sorted shard files of ``split`` ("train", "eval" or "validation")."""
    prefix = SPLIT_PREFIX.get(split, split)
    files = glob.glob(os.path.join(data_dir, prefix + "-*"))
    return sorted(f for f in files if not f.endswith((".json", ".txt", ".md")))


def read_metadata(data_dir):
    """dataset_info.json of data_dir as a dict, or None when there is none."""
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _file_infos(data_dir, split):
    meta = read_metadata(data_dir) or {}
    prefix = SPLIT_PREFIX.get(split, split)
    split_meta = meta.get("splits", {}).get(prefix, {})
    counts = split_meta.get("files", {})
    compression = split_meta.get("compression")
    return [(path, compression if compression is not None else detect_compression(path),
             counts.get(os.path.basename(path)))
            for path in list_files(data_dir, split)]


def holdout_file_infos(file_infos, data_dir, split, holdout_shards=0):
    """The holdout rule over a listing ``file_infos(data_dir, split)`` (this module's,
    or the TensorFlow reader's, which also lists gs:// folders): ``holdout_shards=N``
    >= 1 makes the first N train-* files (sorted) the "eval"/"validation" split and the
    other train-* files "train" (validation-* files are then not read), as the official
    EfficientNet input pipeline's holdout option; N must leave a train-* file."""
    holdout_shards = int(holdout_shards or 0)
    if holdout_shards < 0:
        raise ValueError(f"--holdout_shards={holdout_shards}: must be >= 0")
    if not holdout_shards:
        return file_infos(data_dir, split)
    infos = file_infos(data_dir, "train")
    if holdout_shards >= len(infos):
        raise ValueError(
            f"--holdout_shards={holdout_shards}: must be less than the "
            f"{len(infos)} train-* TFRecord files in --data_dir={data_dir}")
    if SPLIT_PREFIX.get(split, split) == "train":
        return infos[holdout_shards:]
    return infos[:holdout_shards]


def split_file_infos(data_dir, split, holdout_shards=0):
    """[(path, compression, record count or None)] of ``split``'s shard files, with
    the TensorFlow reader's rules (:func:`holdout_file_infos`)."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir}: directory does not exist")
    return holdout_file_infos(_file_infos, data_dir, split, holdout_shards)


def read_split(data_dir, split, holdout_shards=0, verify_crc=True):
    """(list of encoded images, int32 [N] 0-based labels) of a whole split, in file
    order (files sorted by name, records in file order), as the TensorFlow eval
    pipeline reads it. Raises a one-line ValueError naming the directory or file on a
    missing split, a damaged file, a record that is not a usable Example or a file
    whose record count contradicts dataset_info.json."""
    infos = split_file_infos(data_dir, split, holdout_shards)
    if not infos:
        raise ValueError(f"--data_dir={data_dir}: no {SPLIT_PREFIX.get(split, split)}-* "
                         "TFRecord files found")
    images, labels = [], []
    for path, compression, count in infos:
        records = read_records(path, compression, verify_crc=verify_crc)
        if count is not None and count != len(records):
            raise ValueError(f"{path}: {len(records)} records, but {METADATA_FILE} "
                             f"says {count}")
        for i, record in enumerate(records):
            try:
                image, label = image_and_label(record)
            except (ValueError, UnicodeDecodeError, struct.error) as e:
                raise ValueError(f"{path}: record {i} is not a usable tf.train.Example "
                                 f"({e})") from None
            images.append(image)
            labels.append(label)
    return images, np.asarray(labels, np.int32)
