"""One writer per output folder: `lare train`, `lare build` and `lare merge` hold a lock file in the folder they write
(not in the paper).

The lock is an `fcntl.flock` on `<folder>/.lare.lock`, which the kernel releases when its process dies, so a killed
run never leaves the folder stuck; the file records the holder's pid, host and command for the error a second run
gets. A lock file left by a dead process on this host is taken over with a warning. One that names another host
cannot be checked from here (a shared filesystem may not carry flocks between hosts): it is refused, naming the
file to delete once that run is known to be gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from transformers.utils import logging

from .destinations import LOCK_NAME

logger = logging.get_logger(__name__)


class OutputFolderLockedError(OSError):
    """Another LaRe process is writing the same output folder."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')!r} (`{holder.get('command', '?')}`, started "
        f"{holder.get('started', '?')})"
    )


class OutputLock:
    """Context manager holding `<folder>/.lare.lock` while a command writes `folder`.

    Raises `OutputFolderLockedError` at once when another live process holds it."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(["lare", *sys.argv[1:]])[:300]
        self._descriptor: int | None = None
        self._created_folder = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(descriptor)
                os.close(descriptor)
                self._created_folder = False
                raise OutputFolderLockedError(
                    f"{self.folder} is being written by another LaRe run: {_describe(holder)}; nothing was written. "
                    "Wait for it to finish, stop it, or choose another output folder."
                ) from None
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file between our open and flock: try again
                os.close(descriptor)
                continue
            break
        holder = self._read(descriptor)
        if holder.get("pid") is not None:  # a lock file its holder did not remove: that process died
            if holder.get("host") not in (None, host):
                os.close(descriptor)
                self._created_folder = False
                raise OutputFolderLockedError(
                    f"{self.folder} is locked by {_describe(holder)}, another host, which cannot be checked from "
                    f"here; nothing was written. If that run is no longer running, delete {self.path} and run again."
                )
            state = "no longer running" if not _process_alive(int(holder["pid"])) else "holding no lock (pid reused)"
            logger.warning(f"Taking over the stale lock {self.path} left by {_describe(holder)}, {state}.")
        record = {"pid": os.getpid(), "host": host, "command": self.command, "started": time.strftime("%FT%T%z")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        os.fsync(descriptor)
        self._descriptor = descriptor

    @staticmethod
    def _read(descriptor: int) -> dict:
        try:
            content = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        except ValueError:
            return {}
        return content if isinstance(content, dict) else {}

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self._descriptor)  # closing drops the flock
        self._descriptor = None
        if self._created_folder:  # a command that failed before writing leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:
                pass


def is_main_process() -> bool:
    """Only the first process of a distributed launch (torchrun / accelerate set RANK) locks the folder."""
    return int(os.environ.get("RANK", "0")) == 0


__all__ = ["OutputFolderLockedError", "OutputLock", "is_main_process"]
