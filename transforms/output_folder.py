"""Reading a finished output folder of ``daco build``: the one reader ``daco report``
(pipeline/report.py) and ``daco publish``'s validation (:func:`transforms.write.validate_output_folder`)
share.

:func:`open_folder` gives a local view of the folder (a temporary copy of the files a reader
needs when it is remote) and turns every :class:`FolderUnreadable` raised inside into the
caller's own error type, with the remote path in the message instead of the temporary copy's.
:func:`read_metadata`, :func:`read_table` and :func:`read_schema` read ``metadata.json`` and the
parquet files; a missing or damaged file raises :class:`FolderUnreadable` naming it and the fix.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from transforms import fileio


class FolderUnreadable(ValueError):
    """A file of an output folder is missing or damaged (the message names it and the fix)."""


@contextlib.contextmanager
def open_folder(out_dir: str | Path, patterns: Sequence[str], error: type[ValueError]) -> Iterator[Path]:
    """A local Path of the output folder ``out_dir`` (local, or a temporary copy of the files
    matching ``patterns`` for a remote one). A :class:`FolderUnreadable` (or subclass) raised
    inside is re-raised as ``error`` naming the folder's own paths (callers' errors subclass
    :class:`FolderUnreadable` so theirs are renamed too); the folder must be a directory."""
    out = str(out_dir).rstrip("/") or "/"
    with fileio.local_folder(out, tuple(patterns)) as local:
        try:
            if not local.is_dir():
                raise FolderUnreadable(f"{local}: not a directory; pass the output folder of `daco build`")
            yield local
        except FolderUnreadable as exc:
            message = str(exc).replace(str(local), out) if fileio.is_remote(out) else str(exc)
            raise error(message) from None


def read_metadata(folder: Path) -> dict:
    """``metadata.json`` of a local output folder, as a dict."""
    path = folder / "metadata.json"
    if not path.is_file():
        raise FolderUnreadable(f"{path}: missing; it is written by `daco build` (run `daco build --out {folder}`)")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FolderUnreadable(f"{path}: not valid JSON ({exc}); re-run `daco build`") from None
    if not isinstance(metadata, dict):
        raise FolderUnreadable(f"{path}: expected a JSON object; re-run `daco build`")
    return metadata


def _parquet(read, path: Path, **kwargs):
    try:
        return read(path, **kwargs)
    except (pa.ArrowException, OSError) as exc:
        raise FolderUnreadable(f"{path}: not a readable parquet file ({exc}); re-run `daco build`") from None


def read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A parquet file (optionally only ``columns``)."""
    return _parquet(pq.read_table, path, columns=columns)


def read_schema(path: Path) -> pa.Schema:
    """A parquet file's schema, reading nothing else."""
    return _parquet(pq.read_schema, path)
