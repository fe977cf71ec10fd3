"""Guarding an output folder: checked before work starts, one writer at a time, and marked
incomplete while a build writes it (docs/reliability.md).

* :func:`check_writable`: ``--out`` is not a file and can be written (local folders);
  checked before any pipeline work, so a bad path fails in a second, not after a stage.
* :func:`writer_lock`: an exclusive ``flock`` on ``OUT/.daco.lock`` held for the whole
  command (``daco build``, ``daco eval``); a second writer gets :class:`FolderBusy` naming
  the process that holds it. Object stores (gs://) have no lock: one writer per folder there.
* :func:`mark_incomplete` / :func:`mark_complete`: ``OUT/_INCOMPLETE`` exists from the start
  of a build until its last file (the dataset card) is written. A folder that still has it
  was left by an interrupted build and may mix two builds' files; ``daco publish`` refuses
  it (:func:`check_complete`).
"""

from __future__ import annotations

import datetime
import json
import os
from contextlib import contextmanager
from pathlib import Path

from apache_beam.io.filesystems import FileSystems

from transforms import fileio

MARKER = "_INCOMPLETE"
LOCK = ".daco.lock"


class OutputFolderError(ValueError):
    """An output folder that cannot be used as given (the message names it and the fix)."""


class FolderBusy(OutputFolderError):
    """Another process is writing the output folder."""


class IncompleteFolder(OutputFolderError):
    """A folder a build started writing and did not finish."""


def check_writable(out: str, option: str = "--out") -> None:
    """Raise :class:`OutputFolderError` when local ``out`` is a file or cannot be written
    (it, or its nearest existing parent, is read-only). Remote URLs are left to the filesystem."""
    if fileio.is_remote(out):
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{option} {out}: is a file, not a folder; choose a folder path")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{option} {out}: {existing} is not writable (read-only or not yours); "
                                "choose a folder you can write, or fix its permissions")


@contextmanager
def writer_lock(out: str, command: str):
    """Hold the exclusive writer lock of local folder ``out`` for the block; :class:`FolderBusy`
    when another process holds it. A folder created for the lock is removed again when the block
    wrote nothing into it (a command that failed its checks leaves no trace). A no-op for remote
    folders."""
    if fileio.is_remote(out):
        yield
        return
    import fcntl

    created = not Path(out).exists()
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / LOCK
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise FolderBusy(f"{out}: another daco process is writing this folder ({holder}); wait for it "
                             "to finish, or choose another output folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{command}, pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock
        if created and [p.name for p in Path(out).iterdir()] == [LOCK]:
            path.unlink()
            Path(out).rmdir()


def mark_incomplete(out: str, command: str) -> None:
    """Write ``OUT/_INCOMPLETE`` (the command and when it started) before a build writes anything."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fileio.write_json_atomic(fileio.join(out, MARKER), {"command": command, "started": started})


def mark_complete(out: str) -> None:
    """Remove ``OUT/_INCOMPLETE`` once a build has written its last file."""
    path = fileio.join(out, MARKER)
    if FileSystems.exists(path):
        FileSystems.delete([path])


def check_complete(out: str) -> None:
    """Raise :class:`IncompleteFolder` when ``OUT/_INCOMPLETE`` exists, saying which build left it."""
    path = fileio.join(out, MARKER)
    if not FileSystems.exists(path):
        return
    try:
        info = json.loads(fileio.read_text(path))
        started = f"`{info['command']}` started {info['started']}"
    except (ValueError, KeyError, TypeError):
        started = "a build"
    raise IncompleteFolder(f"{path}: {started} and did not finish (interrupted?), so the folder may mix the "
                           "files of two builds; run the build to completion into this folder, then retry")
