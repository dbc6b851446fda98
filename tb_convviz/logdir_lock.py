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
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, self.NAME)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()
