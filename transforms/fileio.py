"""Writing outputs through Beam's filesystems (local paths, gs://, ...), atomically.

Every output is written under a temporary name and renamed, so a reader never
sees half a file (docs/design.md, Conventions).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def settle_gcs_auth(log=None) -> None:
    """Decide once per process how Beam's gs:// filesystem authenticates, skipping its silent pause.

    Without credentials, Beam retries ``google.auth.default()`` with backoff for about 30 s
    before it connects anonymously. With ``STORAGE_EMULATOR_HOST`` set (a local emulator),
    anonymous access is chosen at once, with no lookup. Otherwise credentials are looked up
    once; when there are none, ``log`` (if given) says so and anonymous access is chosen at once
    (public buckets only). Uses Beam's credential cache (``apache_beam.internal.gcp.auth``),
    the one place Beam keeps that choice (docs/reliability.md)."""
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:  # no apache-beam[gcp]: gs:// paths fail later with Beam's own message
        return
    cache = getattr(auth, "_Credentials", None)
    if cache is None or cache._credentials_init:  # another Beam version (the tests would say), or settled
        return
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        if log:
            log("gs:// paths: looking up Google Cloud credentials (Application Default Credentials)")
        try:
            google.auth.default()
            return  # Beam finds them too
        except DefaultCredentialsError as exc:
            if log:
                log(f"no Google Cloud credentials ({str(exc).splitlines()[0]}); connecting to gs:// anonymously, "
                    "which reads public buckets only. Set GOOGLE_APPLICATION_CREDENTIALS or run "
                    "`gcloud auth application-default login` to write")
    with cache._credentials_lock:
        cache._credentials, cache._credentials_init = None, True


if os.environ.get("STORAGE_EMULATOR_HOST"):
    settle_gcs_auth()  # also in Beam worker processes, which import this module


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


def is_remote(path: str) -> bool:
    """True for a URL of a Beam filesystem other than the local one (``gs://...``)."""
    return FileSystems.get_scheme(str(path)) not in (None, "file")


def under(folder: str, path: str) -> str:
    """A path recorded relative to ``folder`` (as metadata.json records inputs inside the output
    folder, see ``pipeline.build.relative_to``) made usable: joined to ``folder`` unless it is
    absolute or a URL."""
    path = str(path)
    if is_remote(path) or os.path.isabs(path):
        return path
    return join(str(folder), path)


def exists(path: str) -> bool:
    """Whether a file (or local directory) exists, on any Beam filesystem."""
    return FileSystems.exists(str(path))


def list_files(base: str, pattern: str) -> list[str]:
    """Files under ``base`` matching ``pattern`` (``*`` stays within one folder), sorted; [] when none."""
    try:
        found = FileSystems.match([join(str(base), pattern)])[0].metadata_list
    except Exception:  # noqa: BLE001 - Beam raises BeamIOError for a folder that does not exist
        return []
    paths = [m.path for m in found]
    if not is_remote(str(base)):
        paths = [p for p in paths if os.path.isfile(p)]
    return sorted(paths)


def file_sizes(paths: list[str]) -> dict[str, int]:
    """Size in bytes of each file, from the filesystem's listing (no download)."""
    if not paths:
        return {}
    found = FileSystems.match(list(paths))
    return {m.path: m.size_in_bytes for result in found for m in result.metadata_list}


def open_read(path: str):
    """A seekable binary reader of a file on any Beam filesystem, bytes as stored (no decompression)."""
    return FileSystems.open(str(path), compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    """Read a whole file from any Beam filesystem."""
    with open_read(path) as fh:
        return fh.read()


def read_text(path: str) -> str:
    """Read a whole UTF-8 text file from any Beam filesystem."""
    return read_bytes(path).decode("utf-8")


def parquet_schema_and_rows(path: str) -> tuple[pa.Schema, int]:
    """(arrow schema, row count) of a parquet file from its footer alone (works on gs:// too)."""
    with open_read(path) as fh:
        meta = pq.ParquetFile(fh).metadata
        return meta.schema.to_arrow_schema(), meta.num_rows


@contextmanager
def local_folder(folder: str, patterns: tuple[str, ...]):
    """A local view of an output folder: the folder itself when local, else a temporary copy of
    the files matching ``patterns`` (relative to ``folder``), deleted on exit. Yields the local Path."""
    if not is_remote(folder):
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="daco-remote-") as tmp:
        for pattern in patterns:
            download_tree(folder, pattern, tmp)
        yield Path(tmp)


def upload_tree(local_dir: str | Path, remote_dir: str) -> int:
    """Copy every file under ``local_dir`` to the same relative path under ``remote_dir`` (atomic
    writes); returns the number of files copied."""
    n = 0
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            write_bytes_atomic(join(remote_dir, *path.relative_to(local_dir).parts), path.read_bytes())
            n += 1
    return n


def download_tree(remote_dir: str, pattern: str, local_dir: str | Path) -> int:
    """Copy the files of ``remote_dir`` matching ``pattern`` to ``local_dir`` (same relative paths)."""
    n = 0
    for path in list_files(remote_dir, pattern):
        target = Path(local_dir) / path[len(remote_dir.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(path))
        n += 1
    return n


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
