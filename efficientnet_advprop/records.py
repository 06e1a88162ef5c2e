"""The TFRecord container without TensorFlow: CRC-32C and record framing.

A record is: uint64 length, uint32 masked CRC-32C of the length bytes, the data,
uint32 masked CRC-32C of the data (little-endian). TensorBoard event files and
TFRecord datasets use it. Pure Python and numpy: the JAX engine's TensorBoard
scalars and the TF-free input path use it where TensorFlow is not installed.
"""

import struct

import numpy as np


def _table():
    poly = 0x82F63B78  # Castagnoli, reflected
    table = np.zeros(256, np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[n] = c
    return [int(x) for x in table]


_TABLE = _table()


def crc32c(data):
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
