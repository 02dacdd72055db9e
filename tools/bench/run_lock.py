# Copyright (c) kd_detr contributors.
"""Claims on bench runs, so that several bench processes can share one output folder (and one
teacher cache) without training the same run twice or into each other's files.

A claim is an exclusive ``flock`` on the file ``<run folder>.lock`` beside the run folder
(``train_run`` empties the folder itself). The operating system drops it when the process ends,
however it ends, so a killed bench leaves no stale claim: the next process takes the run over
(and resumes it from its last checkpoint). The file holds the claiming process's pid, host and
start time for the messages of the others; it stays after the run (an empty claim).
On systems without ``fcntl`` (Windows) runs are not claimed: give parallel processes disjoint
``--arms`` / ``--seeds`` there.
"""
import json
import os
import socket
import time

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = ["RunLock"]


class RunLock:
    """This process's claim on one run folder (``out_dir``)."""

    def __init__(self, out_dir: str):
        self.path = os.path.normpath(out_dir) + ".lock"
        self._fd = None

    @property
    def owned(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict:
        """What the claiming process wrote (pid, host, since); {} when unreadable."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self):
        """Claim the run. Returns None when claimed (or claims are unsupported), else the
        holder's content: another live process has claimed it."""
        if fcntl is None or self.owned:
            return None
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: BlockingIOError (EWOULDBLOCK / EAGAIN)
            os.close(fd)
            return self.holder()
        content = {"pid": os.getpid(), "host": socket.gethostname(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(content).encode())
        self._fd = fd
        return None

    def held_by(self):
        """The holder's content if another process has claimed the run now, else None (claims
        nothing)."""
        if self.owned or fcntl is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # never claimed
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self.holder()
        finally:
            os.close(fd)  # closing drops a shared lock taken here
        return None

    def release(self):
        """Drop the claim (the file stays, emptied: removing a file others may be locking would
        let two processes hold claims on different files of the same name)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        holder = self.acquire()
        if holder is not None:
            raise RuntimeError(f"{self.path}: claimed by process {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('since')}")  # fmt: skip
        return self

    def __exit__(self, *exc):
        self.release()
