"""Output folders: checked before any work, and locked by the run that writes them.

A run learns that it cannot write its folder before it builds a model, not after an hour of
attacks. Two runs writing one store would race (duplicate-row errors, runs left `running`), so
a run holds an exclusive, non-blocking `flock` on OUT/.benchkit.lock for as long as it writes;
the file names the holder (pid, host, start time) for the one line the next run answers with.
The kernel drops the lock when its process dies, so a killed run never leaves the folder locked.
`report` only reads, from a snapshot (see store.Store.read_only), and takes no lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

from benchkit.errors import BadInput

LOCK_NAME = ".benchkit.lock"


def _why(folder: Path, exc: OSError) -> str:
    """Why a folder cannot be made: the ancestor that is a file, else the system's reason."""
    for parent in [folder, *folder.parents]:
        try:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file"
        except OSError:
            continue
    return exc.strerror or str(exc)


def folder_problem(folder: Path, label: str, *, parent_of: Path | None = None) -> str | None:
    """None when `folder` is (now) a folder this process can write, creating it and its parents;
    else the one line saying why not, starting with `label` (e.g. '--out runs/x'). `parent_of`:
    the folder is that file's parent, and the line names the folder."""
    name = f"{folder} " if parent_of is not None else ""
    try:
        if folder.exists() and not folder.is_dir():
            return f"{label}: {name}is a file, not a folder"
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{label}: cannot create the folder {name}".rstrip() + f": {_why(folder, exc)}"
    # os.access answers for the real user (root: always yes); the probe below is the real test
    # (a read-only mount, a full disk, an ACL).
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{label}: {name}not writable (permission denied)"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".benchkit-probe-") as probe:
            probe.write(b"benchkit")
            probe.flush()
    except OSError as exc:
        return f"{label}: {name}not writable ({exc.strerror or exc})"
    return None


def prepare(folder: Path, flag: str = "--out") -> Path:
    """`folder`, created if needed; BadInput (one line naming the flag) if it cannot be written."""
    if problem := folder_problem(folder, f"{flag} {folder}"):
        raise BadInput(problem)
    return folder


def prepare_file(path: Path, flag: str) -> Path:
    """`path` as a file to write (e.g. --html x/page.html): its folder created if needed;
    BadInput naming the flag when that is impossible or `path` is a folder."""
    if path.is_dir():
        raise BadInput(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'leaderboard.html'}")
    if problem := folder_problem(path.parent, f"{flag} {path}", parent_of=path):
        raise BadInput(problem)
    return path


# ------------------------------------------------------------------ the run's lock

class OutLock:
    """An exclusive lock on an output folder, held until `release` (or process exit). `created`:
    the folders `claim` made for it, deepest first (none when the folder was there already)."""

    def __init__(self, folder: Path, fd: int, created: list[Path] | None = None):
        self.folder, self.fd, self.created = folder, fd, created or []

    def discard(self, files: list[Path]) -> None:
        """Undo a run that stored nothing (refused after the claim, e.g. a checkpoint missing when
        its model is built): remove `files` (what it created) and, when `claim` made the folder,
        the lock file and the folders, so bad input leaves no trace."""
        for f in files:
            f.unlink(missing_ok=True)
        if not self.created:
            return
        (self.folder / LOCK_NAME).unlink(missing_ok=True)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break   # not empty: something else lives there now

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)   # before unlocking: afterwards the file is the next holder's
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "OutLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """'pid 1234, since 14:02:11' from the holder's lock file (it writes just after locking:
    wait a moment for it)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "pid" in info:
            break
        time.sleep(0.05)
    else:
        return "pid unknown"
    started = time.localtime(float(info.get("started", 0)))
    when = time.strftime("%H:%M:%S" if started[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S", started)
    host = f" on {info['host']}" if info.get("host") not in (None, socket.gethostname()) else ""
    return f"pid {info['pid']}{host}, since {when}"


def lock(folder: Path, flag: str = "--out") -> OutLock:
    """Take the folder's lock without waiting; BadInput naming the holder when another run has it."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BadInput(f"{flag} {folder}: cannot create its lock file {LOCK_NAME} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
        os.close(fd)
        if holder is None:
            raise BadInput(f"{flag} {folder}: cannot lock {LOCK_NAME} ({exc.strerror or exc})") from None
        raise BadInput(f"{flag} {folder}: in use by another benchkit run ({holder}); wait for it to finish "
                       f"or use another {flag}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0)
    return OutLock(folder, fd)


def claim(folder: Path, flag: str = "--out") -> OutLock:
    """What a run does first: the folder checked (created if needed) and locked, or one line."""
    missing = []
    for f in [folder, *folder.parents]:
        if f.exists() or f.is_symlink():
            break
        missing.append(f)
    held = lock(prepare(folder, flag), flag)
    held.created = missing
    return held


# ------------------------------------------------------------------ a full disk

def is_disk_full(exc: BaseException) -> bool:
    """SQLite's 'database or disk is full' or the system's ENOSPC / EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(exc: BaseException) -> str:
    """The one line for a full disk found outside a run's store (e.g. writing an --html page)."""
    where = getattr(exc, "filename", None)
    return f"{where or 'writing'}: disk full; free space and run the command again"
