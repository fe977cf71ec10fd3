"""clip-retrieval's embeddings layout: the writer of one file set and ``embeddings.json``, and
the reader of a folder (ours or LAION's published embeddings).

Layout (the one LAION publishes its embeddings in; N is the shard's index,
``00042`` -> 42; one file set per input shard, rows sorted by key)::

    embeddings/img_emb/img_emb_{N}.npy         float16 [rows, D], L2-normalised
    embeddings/text_emb/text_emb_{N}.npy       float16 [rows, D], L2-normalised
    embeddings/metadata/metadata_{N}.parquet   key, caption, url, shard, sha256 (of the image bytes)
    embeddings/embeddings.json                 model (clip_model: clip-retrieval's name), weights, untrained, embed_dim, counts

Skipping the embedding stage: :func:`embeddings_exist` tells whether a folder already holds
embeddings in this layout (e.g. LAION's published ``img_emb``/``text_emb``/``metadata``);
the pipeline then reads them with :func:`read_embeddings` instead of computing them.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from transforms import fileio
from transforms.clip_model import ClipConfig, model_config

METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("shard", pa.string()),
    ("sha256", pa.string()),
])


class EmbeddingsLayoutError(ValueError):
    """A folder is not in clip-retrieval's embeddings layout (the message names the file and the problem)."""


def shard_index(shard: str) -> int:
    """N of ``img_emb_{N}.npy`` for a shard name ("00042" -> 42)."""
    try:
        return int(shard)
    except ValueError:
        raise ValueError(f"embed: shard name {shard!r} is not a number; shards must be named NNNNN.tar") from None


def shard_paths(emb_dir: str, n: int) -> dict[str, str]:
    """The three files of file set ``n`` in an embeddings folder."""
    return {
        "img": fileio.join(emb_dir, "img_emb", f"img_emb_{n}.npy"),
        "txt": fileio.join(emb_dir, "text_emb", f"text_emb_{n}.npy"),
        "metadata": fileio.join(emb_dir, "metadata", f"metadata_{n}.parquet"),
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_file_set(emb_dir: str, shard: str, rows: list[tuple]) -> dict:
    """Write one shard's embeddings and metadata (rows sorted by key); returns a summary."""
    rows = sorted(rows, key=lambda r: (r[0], r[3]))
    paths = shard_paths(emb_dir, shard_index(shard))
    fileio.write_bytes_atomic(paths["img"], _npy_bytes(np.stack([r[4] for r in rows])))
    fileio.write_bytes_atomic(paths["txt"], _npy_bytes(np.stack([r[5] for r in rows])))
    table = pa.table({
        "key": [r[0] for r in rows], "caption": [r[1] for r in rows], "url": [r[2] for r in rows],
        "shard": [shard] * len(rows), "sha256": [r[3] for r in rows],
    }, schema=METADATA_SCHEMA)
    fileio.write_parquet_atomic(paths["metadata"], table)
    return {"shard": shard, "index": shard_index(shard), "n": len(rows), "paths": sorted(paths.values())}


def weights_label(resolved: ClipConfig) -> str:
    """How ``embeddings.json`` names the weights of a resolved config: the tag or checkpoint
    file, or "random (seed N)" for an untrained model."""
    return resolved.pretrained or f"random (seed {resolved.seed})"


def clip_retrieval_name(cfg: ClipConfig, resolved: ClipConfig) -> str:
    """The model as clip-retrieval's ``back --clip_model`` names it: ``open_clip:ARCH/TAG`` (e.g.
    ``open_clip:ViT-L-14/laion2b_s32b_b82k``); a local checkpoint or random weights have no tag,
    so only ``open_clip:ARCH``."""
    tag = cfg.pretrained if cfg.pretrained and resolved.pretrained and "/" not in cfg.pretrained else None
    return f"open_clip:{cfg.model_name}" + (f"/{tag}" if tag else "")


def embeddings_record(cfg: ClipConfig, resolved: ClipConfig, shards: list[dict]) -> dict:
    """The content of ``embeddings.json``: which model made the embeddings, and what they hold."""
    import open_clip

    return {
        "layout": "clip-retrieval",
        "clip_model": clip_retrieval_name(cfg, resolved),
        "model_name": cfg.model_name,
        "pretrained": cfg.pretrained,
        "weights": weights_label(resolved),
        "untrained": resolved.pretrained is None,
        "embed_dim": int(model_config(cfg)["embed_dim"]),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "open_clip_version": open_clip.__version__,
        "dtype": "float16",
        "normalised": True,
        "n": sum(s["n"] for s in shards),
        "shards": [{k: s[k] for k in ("shard", "index", "n")} for s in sorted(shards, key=lambda s: s["index"])],
    }


def _file_sets(emb_dir: str) -> list[int]:
    """Indices N of ``img_emb/img_emb_{N}.npy`` in a folder, ascending."""
    pattern = fileio.join(emb_dir, "img_emb", "img_emb_*.npy")
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - a missing folder matches nothing
        return []
    found = []
    for meta in matches:
        m = re.fullmatch(r"img_emb_(\d+)\.npy", FileSystems.split(meta.path)[1])
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def embeddings_exist(emb_dir: str) -> bool:
    """True when ``emb_dir`` holds embeddings in clip-retrieval's layout (at least one
    ``img_emb/img_emb_N.npy`` with its ``text_emb`` and ``metadata`` files), e.g. LAION's
    published embeddings; the pipeline then reads them instead of computing them.
    Validity is checked by :func:`read_embeddings`."""
    sets = _file_sets(emb_dir)
    return bool(sets) and all(FileSystems.exists(p) for n in sets for p in shard_paths(emb_dir, n).values())


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - say which file
        raise EmbeddingsLayoutError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None


def read_embeddings(emb_dir: str) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """(image embeddings, text embeddings, metadata) of a clip-retrieval layout folder, the
    file sets concatenated in order of N. Arrays keep their stored float dtype (float16 here,
    as LAION's). Metadata must have ``key`` and ``caption``; missing ``url``/``shard``/``sha256``
    columns are added as nulls. A malformed folder raises :class:`EmbeddingsLayoutError`."""
    sets = _file_sets(emb_dir)
    if not sets:
        raise EmbeddingsLayoutError(
            f"{emb_dir}: no img_emb/img_emb_N.npy files; expected clip-retrieval's layout "
            "(img_emb/, text_emb/, metadata/) as written by `daco embed` or published by LAION")
    imgs, txts, tables, dim = [], [], [], None
    for n in sets:
        paths = shard_paths(emb_dir, n)
        for role in ("txt", "metadata"):
            if not FileSystems.exists(paths[role]):
                raise EmbeddingsLayoutError(f"{paths[role]}: missing (it pairs with {paths['img']})")
        img, txt = _load_npy(paths["img"]), _load_npy(paths["txt"])
        for path, arr in ((paths["img"], img), (paths["txt"], txt)):
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
                raise EmbeddingsLayoutError(
                    f"{path}: expected a 2-D float array [rows, dim], got {arr.dtype} with shape {arr.shape}")
            dim = arr.shape[1] if dim is None else dim
            if arr.shape[1] != dim:
                raise EmbeddingsLayoutError(f"{path}: dimension {arr.shape[1]} differs from the folder's {dim}")
        try:
            table = fileio.read_parquet(paths["metadata"])
        except Exception as exc:  # noqa: BLE001 - say which file
            raise EmbeddingsLayoutError(f"{paths['metadata']}: not a readable parquet file ({exc})") from None
        missing = {"key", "caption"} - set(table.column_names)
        if missing:
            raise EmbeddingsLayoutError(f"{paths['metadata']}: missing column(s) {sorted(missing)}")
        if not (len(img) == len(txt) == table.num_rows):
            raise EmbeddingsLayoutError(
                f"file set {n} of {emb_dir}: row counts differ (img_emb {len(img)}, text_emb {len(txt)}, "
                f"metadata {table.num_rows}); each row of the three files must be the same record")
        for name in METADATA_SCHEMA.names:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        tables.append(table.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA))
        imgs.append(img)
        txts.append(txt)
    return np.concatenate(imgs), np.concatenate(txts), pa.concat_tables(tables)


def stored_embedding_dim(emb_dir: str) -> int:
    """The dimension of an embeddings folder, from the header of its first ``img_emb`` file only."""
    found = FileSystems.match([fileio.join(emb_dir, "img_emb", "img_emb_*.npy")])[0].metadata_list
    if not found:
        raise EmbeddingsLayoutError(f"{emb_dir}: no img_emb/img_emb_N.npy (not clip-retrieval's layout)")
    path = min(m.path for m in found)
    with FileSystems.open(path) as fh:
        major, _minor = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _fortran, _dtype = read_header(fh)
    if len(shape) != 2:
        raise EmbeddingsLayoutError(f"{path}: expected [rows, dim], got shape {shape}")
    return int(shape[1])


def check_matches_clip(emb_dir: str, cfg: ClipConfig, resolved: ClipConfig) -> dict:
    """The one check that a supplied embeddings folder fits the configured CLIP, run before any
    work: the folder is in this layout, its dimension is the model's ``embed_dim``, and its
    ``embeddings.json`` (when present; LAION's folders have none) names the same model and
    weights (:func:`weights_label` of ``resolved``). Returns that record ({} without one);
    a mismatch raises :class:`EmbeddingsLayoutError` naming the file and the fix."""
    import json

    if not embeddings_exist(emb_dir):
        raise EmbeddingsLayoutError(
            f"{emb_dir}: not a clip-retrieval folder (img_emb/img_emb_N.npy with text_emb/ and metadata/); "
            "leave --embeddings out to compute them from the shards")
    dim, expected = stored_embedding_dim(emb_dir), int(model_config(cfg)["embed_dim"])
    if dim != expected:
        raise EmbeddingsLayoutError(
            f"{emb_dir} has dimension {dim} but CLIP {cfg.model_name} embeds concepts in {expected}: configure the "
            "CLIP that made the embeddings (clip.model_name/clip.pretrained in a build config, "
            "--clip-model/--clip-pretrained with daco retrieve)")
    record_path = fileio.join(emb_dir, "embeddings.json")
    if not FileSystems.exists(record_path):
        return {}
    record = json.loads(fileio.read_bytes(record_path))
    weights = weights_label(resolved)
    if (record.get("model_name"), record.get("weights")) != (cfg.model_name, weights):
        raise EmbeddingsLayoutError(
            f"{record_path}: the embeddings were made with {record.get('model_name')} ({record.get('weights')}) "
            f"but concepts would be embedded with {cfg.model_name} ({weights}): configure the same CLIP "
            "(clip.model_name/clip.pretrained in a build config, --clip-* options with daco retrieve)")
    return record
