"""The TFRecord container without TensorFlow: CRC-32C and record framing.

A record is: uint64 length, uint32 masked CRC-32C of the length bytes, the data,
uint32 masked CRC-32C of the data (little-endian). TensorBoard event files and
TFRecord datasets use it. Pure Python and numpy: the JAX engine's TensorBoard
scalars and the TF-free input path use it where TensorFlow is not installed.
"""

import struct

import numpy as np


def _table():
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # Castagnoli, reflected polynomial 0x82F63B78
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


CRC32C_TABLE = _table()  # numpy uint32 [256]; data/tfrecord_lite.py vectorises with it
_TABLE = [int(v) for v in CRC32C_TABLE]


def crc32c(data):
    """CRC-32C of bytes (or a sequence of byte values), in Python."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data):
    """The bytes of one record holding `data`."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))
