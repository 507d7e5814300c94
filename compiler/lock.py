"""One command at a time per build folder: the lock that ``tunec compile`` and ``tunec run`` share.

A compile replaces the compiled files (and, forced onto another recipe,
``runs/``); a training run reads the shards and writes ``runs/``. Two
of them on one folder at once would corrupt each other's work, so both take an
advisory lock on ``OUT/.tunec.lock`` (``fcntl.flock`` through ``filelock``) for
as long as they use the folder. The operating system releases it when the
holder exits, however it exits (``kill -9`` included), so a lock is never left
behind. Beside it, ``OUT/.tunec.lock.json`` says who holds it, for the message
the next command prints::

    error: build/demo is in use by `tunec run build/demo` (pid 4242 on gpu-3, since 2026-11-25 21:02:13 UTC);
    wait for it to finish or stop it

A compile swaps a whole new folder in at ``OUT`` (:mod:`.build`); the new
folder holds a hard link to this same lock file, so the lock stays held on
``OUT`` across the swap and the path of the lock never changes.

Readers (``tunec inspect``, ``tunec generate``) do not lock. Under ``torchrun``
rank 0 alone holds the lock for the whole job (see :mod:`tunec.runtime.run`).
This module never imports torch or the runtime.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import TunecError
from .fileio import atomic_write_json

LOCK_FILE = ".tunec.lock"
HOLDER_FILE = ".tunec.lock.json"
FILES = (LOCK_FILE, HOLDER_FILE)  # not part of a build: an "empty" folder may hold them


def command_line() -> str:
    """The command as the user typed it, near enough: ``tunec`` instead of a script's full path."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("tunec", "__main__.py", "cli.py"):
        argv[0] = "tunec"
    return shlex.join(argv)


class BuildLock:
    """``with BuildLock(out, "compile"):`` holds ``out`` or raises a one-line ``TunecError`` naming the holder.

    Never waits: a second command on a busy folder is refused at once. A folder
    that did not exist is created for the lock, and removed again on release
    when nothing but the lock files ended up in it (a compile refused early
    leaves no trace).
    """

    def __init__(self, out: str | Path, what: str):
        self.out = Path(out)
        self.what = what
        self._lock: FileLock | None = None
        self._created = False

    def acquire(self) -> BuildLock:
        if self.out.exists() and not self.out.is_dir():
            raise TunecError(f"output {self.out} exists and is not a folder")
        self._created = not self.out.exists()
        lock = FileLock(str(self.out / LOCK_FILE), timeout=0)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise TunecError(f"{self.out} is in use by {holder(self.out)}; wait for it to finish or stop it") from None
        except OSError as exc:  # a read-only or foreign folder
            raise TunecError(f"{self.out}: cannot lock the folder for `tunec {self.what}` ({exc})") from None
        self._lock = lock
        atomic_write_json(self.out / HOLDER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "command": command_line(), "what": self.what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        })
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        # The holder file goes first, while the lock is still ours: it never names a process
        # that has let go, and the next holder's file is never removed by us.
        (self.out / HOLDER_FILE).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        if self._created:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.out.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(out: Path) -> str:
    """Who holds ``out``'s lock, in words (from its holder file, which may lag a moment behind the lock)."""
    try:
        info = json.loads((Path(out) / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"`{info['command']}` (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another tunec process (it has not said which yet)"
