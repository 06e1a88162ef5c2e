"""TensorBoard scalars without TensorFlow: an event file written by hand.

An event file is a sequence of records (efficientnet_advprop.utils.records) each holding
a serialised `Event` protocol buffer; the few fields used are encoded here:
Event{wall_time: double = 1, step: int64 = 2, file_version: string = 3,
summary: Summary = 5}, Summary{value: repeated Value = 1}, Value{tag: string = 1,
simple_value: float = 2}. TensorBoard (and tf.compat.v1.train.summary_iterator)
reads the files the TF engine's tf.summary writes and these alike.
"""

import os
import socket
import struct
import time

from efficientnet_advprop.utils.records import frame


def _varint(value):
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, wire_type):
    return _varint((number << 3) | wire_type)


def _bytes_field(number, payload):
    return _field(number, 2) + _varint(len(payload)) + payload


def _event(step, wall_time, summary=None, file_version=None):
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    return out


def _summary(scalars):
    values = b""
    for tag, value in scalars.items():
        item = _bytes_field(1, str(tag).encode()) + _field(2, 5) + struct.pack(
            "<f", float(value))
        values += _bytes_field(1, item)
    return values


class ScalarWriter:
    """Appends scalar summaries to a new events file in `log_dir`."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        now = time.time()
        self.path = os.path.join(
            log_dir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.jax")
        self._file = open(self.path, "ab")
        self._file.write(frame(_event(0, now, file_version="brain.Event:2")))
        self._file.flush()

    def write(self, step, scalars):
        self._file.write(frame(_event(step, time.time(), summary=_summary(scalars))))
        self._file.flush()

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()
