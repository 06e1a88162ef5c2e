"""A small progress bar with rate and ETA (stderr; one line per update off a tty)."""

import sys
import time


class Progress:
    def __init__(self, total, initial=0, unit="img", stream=None, min_interval=1.0):
        self.total = int(total)
        self.done = int(initial)
        self.stream = stream or sys.stderr
        self.unit = unit
        self.min_interval = min_interval
        self._start = time.perf_counter()
        self._start_done = self.done
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.items = 0

    def update(self, steps, items, postfix="", force=False):
        self.done += steps
        self.items += items
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval and self.done < self.total:
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = self.items / elapsed
        steps_rate = (self.done - self._start_done) / elapsed
        remaining = (self.total - self.done) / steps_rate if steps_rate > 0 else 0.0
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {self.done}/{self.total} {rate:7.1f} {self.unit}/s "
                f"elapsed {_fmt(elapsed)} eta {_fmt(remaining)} {postfix}")
        if self._tty:
            self.stream.write("\r" + line + " " * 4)
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @property
    def rate(self):
        return self.items / max(time.perf_counter() - self._start, 1e-9)


def _fmt(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
