"""Writing outputs through Beam's filesystems (local paths, gs://, ...), atomically.

Every output is written under a temporary name and renamed, so a reader never
sees half a file (DESIGN.md, Conventions).
"""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems


def join(base: str, *parts: str) -> str:
    """Join path parts for any Beam filesystem."""
    return FileSystems.join(base, *parts)


def makedirs(path: str) -> None:
    """Create a directory (no-op where it exists or on object stores)."""
    if not FileSystems.exists(path):
        try:
            FileSystems.mkdirs(path)
        except OSError:  # another worker process created it in between (local multi-process runs)
            if not FileSystems.exists(path):
                raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and a rename."""
    parent = FileSystems.split(path)[0]
    if parent:
        makedirs(parent)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp) as fh:
        fh.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_parquet_atomic(path: str, table: pa.Table) -> None:
    """Write a parquet file deterministically (same table, same bytes) and atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    write_bytes_atomic(path, buf.getvalue())


def write_json_atomic(path: str, obj) -> None:
    """Write JSON with sorted keys (stable bytes) atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_bytes(path: str) -> bytes:
    """Read a whole file from any Beam filesystem."""
    with FileSystems.open(path) as fh:
        return fh.read()


def read_parquet(path: str) -> pa.Table:
    """Read a parquet file from any Beam filesystem."""
    return pq.read_table(io.BytesIO(read_bytes(path)))


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` file bytes (no pickled objects)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_npy_atomic(path: str, array: np.ndarray) -> None:
    """Write an array as ``.npy`` atomically."""
    write_bytes_atomic(path, npy_bytes(array))


def read_npy(path: str) -> np.ndarray:
    """Read a ``.npy`` file from any Beam filesystem, never unpickling."""
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def remove_stale(paths: list[str], pattern: str) -> list[str]:
    """Delete files matching ``pattern`` that are not in ``paths`` (what an earlier run left);
    return ``paths`` sorted. Used after a stage wrote its parts, so reruns leave no stale files."""
    found = FileSystems.match([pattern])[0].metadata_list
    stale = sorted({m.path for m in found} - set(paths))
    if stale:
        FileSystems.delete(stale)
    return sorted(paths)
