"""Reading image-caption webdataset shards as img2dataset writes them for LAION and CC-3M.

A shard is ``NNNNN.tar`` holding ``key.jpg``, ``key.txt`` and ``key.json`` per record
(img2dataset's layout), with a sibling ``NNNNN.parquet`` listing every URL it tried
(``key``, ``status``, ``url``, ``caption``, ...). Shards are read from local paths or
any Beam filesystem URL (``gs://...``) through ``apache_beam.io.filesystems``.

:class:`ReadShards` matches the pattern when the graph is built (a pattern matching
no shard is an error then, before anything runs), spreads the shard paths over
workers, and reads each shard in one DoFn call, streaming its tar member by member.
It yields record dicts::

    {"key": str, "shard": "00000", "caption": str, "url": str, "jpg": bytes, "sha256": str}

(``jpg`` is the image exactly as stored, whatever its format; ``sha256`` its hex digest;
``url`` is "" where the record has no ``key.json``).

Bad input is dead-lettered to ``OUT/deadletter/shards.jsonl`` (stage ``shards``; each
with the shard's path as ``source``, the record's key and the reason), and the run goes on:

- ``corrupt_tar``: a truncated or corrupt tar (also one that cannot be opened). The
  records read before the damage are kept; the ones after it are named from the
  sibling parquet (keys img2dataset marked ``success`` that were not read), or, with
  no usable parquet, one dead letter with key "" stands for the rest of the shard.
  A tar that ends without its end-of-archive block counts as truncated (Python's
  tarfile would stop there silently).
- ``missing_image``: a record with no image member (jpg, jpeg, png or webp).
- ``undecodable_image``: PIL cannot decode the image.
- ``missing_caption``: no ``key.txt``.
- ``caption_not_utf8``: the caption is not UTF-8.
- ``empty_caption``: the caption is empty or only whitespace.

Counters (namespace ``shards``): ``read`` counts records: every key met in a tar,
plus every dead letter standing for records lost to a corrupt tar; ``kept`` the
records yielded; ``deadletter_<reason>`` each reason above (counted by
``transforms.deadletter.dead_letter``); :data:`RECONCILIATION` checks
``read = kept + sum(deadletter_*)``. Outside it: ``shards_read`` (shard files
processed), ``shards_corrupt`` (of which damaged) and ``kept_without_url``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
from typing import Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from braceexpand import braceexpand
from PIL import Image

from transforms import fileio
from transforms.counters import Reconciliation
from transforms.deadletter import DEAD, WriteDeadLetters, dead_letter
from transforms.progress import ProgressLog

NAMESPACE = "shards"
REASONS = ("corrupt_tar", "missing_image", "undecodable_image", "missing_caption", "caption_not_utf8", "empty_caption")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RECONCILIATION = Reconciliation(NAMESPACE, "read", ("kept",) + tuple(f"deadletter_{r}" for r in REASONS))

# webdataset's rule: the key is the member name up to the first dot of its basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardsNotFound(ValueError):
    """A shard pattern matched no ``.tar`` file."""


class Dead(NamedTuple):
    """A record (or the rest of a shard) that could not be read."""

    key: str
    reason: str
    detail: str = ""


def _match(pattern: str) -> list[str]:
    try:
        FileSystems.get_filesystem(pattern)
    except ValueError:
        scheme = pattern.split("://", 1)[0]
        raise ShardsNotFound(f"shard pattern {pattern!r}: Beam has no filesystem for '{scheme}://' here; "
                             f"install its extra (gs:// needs apache-beam[gcp]) or copy the shards locally") from None
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # noqa: BLE001 - Beam raises BeamIOError / OSError for a path that does not exist
        return []
    return [m.path for m in result.metadata_list]


def match_shards(pattern: str | list[str]) -> list[str]:
    """Every ``.tar`` shard named by ``pattern``: a path, a glob, a brace range
    (``DIR/{00000..00099}.tar``), a directory (its ``*.tar``) or a list of those; sorted.

    Raises :class:`ShardsNotFound` naming the pattern and the fix when nothing matches."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ShardsNotFound("no shard pattern given; pass a shard path, a directory of NNNNN.tar shards or a glob")
    found: set[str] = set()
    for given in patterns:
        matched: list[str] = []
        absent: list[str] = []
        for expanded in braceexpand(given):
            if _GLOB_CHARS.search(expanded):
                matched += _match(expanded)
            elif expanded.endswith(".tar"):  # named explicitly: it must exist
                found_here = _match(expanded)
                matched += found_here
                if not found_here:
                    absent.append(expanded)
            else:  # a directory
                matched += _match(fileio.join(expanded.rstrip("/"), "*.tar"))
        tars = [p for p in matched if p.endswith(".tar")]
        if absent and tars:
            raise ShardsNotFound(
                f"shard pattern {given!r} names {len(absent)} shard(s) that do not exist (first: {absent[0]}); "
                "fix the path or range, or use a glob ('DIR/*.tar') to read whichever shards exist."
            )
        if not tars:
            raise ShardsNotFound(
                f"shard pattern {given!r} matches no .tar file. Pass an existing shard, a directory holding "
                "img2dataset's NNNNN.tar shards, or a glob such as 'DIR/*.tar' or 'gs://bucket/laion/*.tar' "
                "(quote it so the shell does not expand it)."
            )
        found.update(tars)
    return sorted(found)


def shard_name(path: str) -> str:
    """The shard's basename without extension: ``gs://b/laion/00012.tar`` -> ``00012``."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".tar")] if base.endswith(".tar") else base.rsplit(".", 1)[0]


def _sibling_parquet(path: str) -> str:
    return path[: -len(".tar")] + ".parquet" if path.endswith(".tar") else path + ".parquet"


def iter_tar_groups(fh) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a webdataset tar from the seekable file ``fh``: ``(key, {extension: bytes})`` per
    record, in archive order. Raises ``tarfile.ReadError`` at the first damage, after yielding
    every record complete before it (a record cut by the damage is not yielded)."""
    tar = tarfile.open(fileobj=fh, mode="r:")
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        m = _KEY_EXT.match(member.name)
        prefix, ext = (m.group(1), m.group(2).lower()) if m else (member.name, "")
        data = tar.extractfile(member).read()
        if prefix != key:
            if members:
                yield key, members
            key, members = prefix, {}
        members[ext] = data
    # tarfile stops silently at a truncated or garbled header; a sound archive ends with a zero block.
    fh.seek(tar.offset)
    end = fh.read(tarfile.BLOCKSIZE)
    if end != tarfile.NUL * tarfile.BLOCKSIZE:
        where = "ends" if not end else "has a damaged header"
        raise tarfile.ReadError(f"the archive {where} at byte {tar.offset} without its end-of-archive block "
                                "(truncated or corrupt)")
    if members:
        yield key, members


def decode_record(key: str, members: dict[str, bytes]) -> dict | Dead:
    """The record dict (without ``shard``) of one tar group, or why it is dead."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        return Dead(key, "missing_image", f"members: {sorted(members)}")
    if "txt" not in members:
        return Dead(key, "missing_caption", f"members: {sorted(members)}")
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return Dead(key, "caption_not_utf8", str(exc))
    if not caption.strip():
        return Dead(key, "empty_caption", repr(caption))
    image = members[image_ext]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as img:
                img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        return Dead(key, "undecodable_image", f"{type(exc).__name__}: {exc}")
    url = ""
    if "json" in members:
        try:
            url = str(json.loads(members["json"]).get("url") or "")
        except (ValueError, AttributeError):
            url = ""
    return {"key": key, "caption": caption, "url": url, "jpg": image, "sha256": hashlib.sha256(image).hexdigest()}


def _lost_keys(path: str, seen: set[str]) -> tuple[list[str], str]:
    """Keys the sibling parquet marks ``success`` that were not read, and a note on where they came from."""
    parquet = _sibling_parquet(path)
    try:
        table = fileio.read_parquet(parquet).select(["key", "status"])
    except Exception as exc:  # noqa: BLE001 - missing or unreadable parquet: fall back to one record
        return [], f"no usable sibling parquet ({type(exc).__name__})"
    lost = sorted(k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist())
                  if s == "success" and k not in seen)
    return lost, f"named by {parquet.rsplit('/', 1)[-1]}"


def iter_shard(path: str) -> Iterator[dict | Dead]:
    """Every record of one shard, in archive order: a record dict, or a :class:`Dead` for a bad
    record and for each record lost to a damaged tar (see the module docstring)."""
    shard = shard_name(path)
    seen: set[str] = set()
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            for key, members in iter_tar_groups(fh):
                seen.add(key)
                item = decode_record(key, members)
                yield item if isinstance(item, Dead) else {"shard": shard, **item}
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        detail = f"{type(exc).__name__}: {exc.args[0] if exc.args else exc} (after {len(seen)} records)"
        lost, origin = _lost_keys(path, seen)
        if lost:
            for key in lost:
                yield Dead(key, "corrupt_tar", f"{detail}; {origin}")
        else:
            yield Dead("", "corrupt_tar", f"{detail}; the rest of the shard is lost, {origin}")


def iter_records(pattern: str | list[str]) -> Iterator[dict]:
    """The good records of every shard matching ``pattern``, in shard order, in one process
    (for baselines and checks; :class:`ReadShards` is the pipeline's reader)."""
    for path in match_shards(pattern):
        yield from (item for item in iter_shard(path) if not isinstance(item, Dead))


class _ReadShard(beam.DoFn):
    """One call per shard path: yields its records; dead letters to the ``DEAD`` output."""

    def __init__(self):
        self.read = Metrics.counter(NAMESPACE, "read")
        self.kept = Metrics.counter(NAMESPACE, "kept")
        self.shards_read = Metrics.counter(NAMESPACE, "shards_read")
        self.shards_corrupt = Metrics.counter(NAMESPACE, "shards_corrupt")
        self.without_url = Metrics.counter(NAMESPACE, "kept_without_url")

    def setup(self):
        self.progress = ProgressLog(NAMESPACE, "records")

    def process(self, path):
        self.shards_read.inc()
        corrupt = False
        for item in iter_shard(path):
            self.read.inc()
            self.progress.update()
            if isinstance(item, Dead):
                corrupt |= item.reason == "corrupt_tar"
                yield dead_letter(NAMESPACE, path, item.key, item.reason, item.detail)
            else:
                self.kept.inc()
                if not item["url"]:
                    self.without_url.inc()
                yield item
        if corrupt:
            self.shards_corrupt.inc()


class ReadShards(beam.PTransform):
    """Pipeline start -> record dicts from every shard matching ``pattern`` (see the module
    docstring); writes ``out_dir/deadletter/shards.jsonl``. The pattern is matched here, so a
    pattern matching nothing raises :class:`ShardsNotFound` before the pipeline runs.
    ``list_shards`` turns the pattern into shard paths (default :func:`match_shards`; the
    offline Dataflow plan passes one that needs no bucket listing)."""

    def __init__(self, pattern: str | list[str], out_dir: str, list_shards=match_shards):
        super().__init__()
        self.paths = list_shards(pattern)
        self.out_dir = out_dir

    def expand(self, pbegin):
        results = (
            pbegin
            | "ShardPaths" >> beam.Create(self.paths)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShard" >> beam.ParDo(_ReadShard()).with_outputs(DEAD, main="records")
        )
        results[DEAD] | "WriteDeadLetters" >> WriteDeadLetters(self.out_dir, NAMESPACE)
        return results.records
