"""One writing logger per log dir: an ``flock`` that the kernel drops with its process."""

from __future__ import annotations

import fcntl
import os
import socket


class LogDirLock:
    """An exclusive lock on a log dir for one writing logger, held until ``release`` or process exit.

    The lock is an ``flock`` on ``.convviz.lock`` (which names the holder), so a crashed
    process never leaves a stale lock behind: the kernel drops it with the process.
    """

    NAME = ".convviz.lock"
    _fd: int | None = None

    def __init__(self, log_dir: str) -> None:
        self.path = path = os.path.join(log_dir, self.NAME)
        try:
            os.makedirs(log_dir, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, (
                f"cannot create {path} ({e.strerror}): tb-convviz keeps this lock file in the log dir, so that two "
                "loggers never write into one run, and writes its event files there, so the log dir must be "
                f"writable. Pass a log dir you can write to, or make {log_dir!r} writable")) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            fd, self._fd = self._fd, None
            os.close(fd)
            raise RuntimeError(
                f"another ConvVizLogger ({holder}) is writing to {log_dir!r}: two loggers on one log dir would "
                "mix their checkpoints. close() the other logger first, or log into another directory"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    def held(self) -> bool:
        """Whether the lock file at the log dir is still the one locked (not deleted with its log dir)."""
        return self._fd is not None and still_at(self._fd, self.path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def still_at(fd: int, path: str) -> bool:
    """Whether the file open as ``fd`` is still the one at ``path`` (not deleted, moved or replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return here.st_nlink > 0 and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
