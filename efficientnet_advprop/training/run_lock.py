"""One training run per model_dir: a lock file holding the owner's pid and host.

Two runs writing checkpoints into the same directory interleave them (each one's
CheckpointManager deletes the other's files and rewrites the `checkpoint` state), so a
run takes `RunLock(model_dir)` before it trains:

    with RunLock(model_dir):
        trainer.train(...)

The lock is the file `model_dir/run.lock`, created atomically (O_CREAT | O_EXCL: of two
runs starting at once exactly one creates it) and holding the owner's pid, host, process
start time and a random token. It is removed when the block exits (an exception
included). A run killed without cleaning up (SIGKILL, a crash, a lost machine) leaves
it behind: the next run on the same host sees that the pid is no longer alive (or is
now another process: the start time differs) and takes the lock over, with a note on
stderr. A lock written on another host cannot be checked from here and is never
taken over: the error says which file to delete if that run is gone.

Directories on remote file systems (gs://..., any path with "://") have no atomic
exclusive create through tf.io.gfile: there the lock does nothing and says so
(`RunLock.active` is False).
"""

import json
import os
import secrets
import socket
import sys
import time

from efficientnet_advprop.training.loop import TrainingError

LOCK_NAME = "run.lock"


class RunLockedError(TrainingError):
    """Another live run holds the model_dir's lock."""


def _process_start_time(pid):
    """The kernel's start time of `pid` (clock ticks since boot, Linux), or None where
    /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # Field 2 (the command) is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22: starttime


def _process_state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] if fields else None


def pid_alive(pid, start_time=None):
    """Is process `pid` of this host running (and, when `start_time` is given and
    /proc can tell, the same process that had that start time)?"""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return False
    if _process_state(pid) in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    if start_time is not None:
        now = _process_start_time(pid)
        if now is not None and str(now) != str(start_time):
            return False  # the pid was reused by another process
    return True


class RunLock:
    """Exclusive ownership of `model_dir` by this process, as a context manager.

    Args:
      model_dir: the run's directory (created if missing).
      log: callable(str) for the stale-lock note (default: a line on stderr).

    `acquire()` raises RunLockedError (naming the directory, the owner's pid and host)
    when a live run holds the lock, and takes over a stale one; `release()` removes the
    lock file if it is still this lock's. After a takeover, `taken_over` holds the
    stale owner's record (a dict), else None.
    """

    def __init__(self, model_dir, log=None):
        self.model_dir = os.fspath(model_dir)
        self.path = os.path.join(self.model_dir, LOCK_NAME)
        self.active = "://" not in self.model_dir
        self.held = False
        self.taken_over = None
        self._token = None
        self._log = log or (lambda message: print(message, file=sys.stderr))

    # ----------------------------------------------------------------- public
    def acquire(self):
        if self.held:
            raise RuntimeError(f"{self.path}: already held by this RunLock")
        if not self.active:
            self._log(f"note: no run lock on {self.model_dir} (a remote file system has "
                      "no atomic exclusive create); do not start two runs on it")
            return self
        os.makedirs(self.model_dir, exist_ok=True)
        for _ in range(3):  # a takeover races at most with other takeovers
            if self._create():
                self.held = True
                return self
            owner = self._read()
            if owner is None:
                raise RunLockedError(
                    f"--model_dir={self.model_dir} is locked by {self.path}, which is "
                    "empty or unreadable (another run is creating it right now?). If no "
                    "run uses this directory, delete that file.")
            if not self._is_stale(owner):
                raise RunLockedError(self._locked_message(owner))
            self._take_over(owner)
        raise RunLockedError(f"--model_dir={self.model_dir}: could not take over the "
                             f"stale lock {self.path} (other runs are racing for it)")

    def release(self):
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner is not None and owner.get("token") == self._token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def owner(self):
        """The lock file's record (dict) or None when there is none."""
        return self._read() if self.active else None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    # ---------------------------------------------------------------- private
    def _record(self):
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "start_time": _process_start_time(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join(sys.argv)[:500], "token": self._token}

    def _create(self):
        """Creates the lock file with this process' record; False if it exists."""
        self._token = secrets.token_hex(8)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.remove(self.path)  # an empty lock would refuse every later run
            raise
        return True

    def _read(self, path=None):
        try:
            with open(path or self.path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "pid" in record else None

    @staticmethod
    def _is_stale(owner):
        if owner.get("host") != socket.gethostname():
            return False  # cannot be checked from this host
        return not pid_alive(owner.get("pid"), owner.get("start_time"))

    def _locked_message(self, owner):
        where = owner.get("host", "?")
        other_host = where != socket.gethostname()
        return (f"--model_dir={self.model_dir} is in use by another run: pid "
                f"{owner.get('pid')} on {where}"
                f"{' (another host: not checked)' if other_host else ''}, since "
                f"{owner.get('started', '?')} (lock file {self.path}). Wait for it to "
                "end or choose another --model_dir"
                + ("; if that run is gone, delete the lock file." if other_host else "."))

    def _take_over(self, stale):
        """Removes the stale lock `stale`, unless another process replaced it first.

        A guard file created with O_EXCL lets one process at a time check and remove
        the lock, so that a run cannot delete a lock that another run has just taken
        over. A guard left by a process that died during the takeover is removed."""
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read(guard)
            if holder is not None and not self._is_stale(holder):
                return  # another run is taking it over: the caller retries
            try:
                os.remove(guard)
            except FileNotFoundError:
                pass
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "start_time": _process_start_time(os.getpid())}, f)
            current = self._read()
            if current is not None and current.get("token") == stale.get("token") \
                    and current.get("pid") == stale.get("pid"):
                os.remove(self.path)
                self.taken_over = stale
                self._log(
                    f"note: took over the stale run lock {self.path} of pid "
                    f"{stale.get('pid')} on {stale.get('host')} (started "
                    f"{stale.get('started', '?')}; that process is gone)")
        finally:
            try:
                os.remove(guard)
            except FileNotFoundError:
                pass
