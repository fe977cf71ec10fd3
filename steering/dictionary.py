"""Loading the DACO-400K concept dictionary (docs/design.md, "Data contracts").

An output folder (or a Hugging Face dataset repo with the same layout) holds::

    concepts.parquet       concept_id, group, polarity, ... (one row per concept)
    dictionary/*.parquet   concept_id, layer, direction fixed_size_list<float32>[d], n_pos, n_neg, norm
    metadata.json          optional; kept as ``ConceptDictionary.metadata``

:func:`load_dictionary` reads and validates both, and returns a
:class:`ConceptDictionary` whose rows follow the order of ``concepts.parquet``.
:func:`dictionary_table` / :func:`write_dictionary_parquet` write the dictionary
files (the pipeline's writer stage reuses them).

Only numpy, pyarrow, torch and huggingface_hub are used here, never Beam.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

POLARITIES = ("desirable", "undesirable", "neutral")
CONCEPT_COLUMNS = ("concept_id", "group", "polarity")


def dictionary_schema(d: int) -> pa.Schema:
    """The schema of ``dictionary/*.parquet`` for directions of dimension ``d``."""
    if int(d) <= 0:
        raise ValueError(f"dictionary_schema: the direction dimension must be positive, got {d}")
    return pa.schema([
        ("concept_id", pa.string()),
        ("layer", pa.int32()),
        ("direction", pa.list_(pa.float32(), int(d))),
        ("n_pos", pa.int64()),
        ("n_neg", pa.int64()),
        ("norm", pa.float32()),
    ])


#: Column names and types of ``dictionary/*.parquet``. ``direction`` is shown as a
#: variable-length list here; files store ``fixed_size_list<float32>[d]`` as
#: :func:`dictionary_schema` gives it for their ``d``.
DICTIONARY_SCHEMA = pa.schema([
    ("concept_id", pa.string()),
    ("layer", pa.int32()),
    ("direction", pa.list_(pa.float32())),
    ("n_pos", pa.int64()),
    ("n_neg", pa.int64()),
    ("norm", pa.float32()),
])


class DictionaryError(ValueError):
    """A dictionary folder or file that does not follow the data contract."""


def closest_names_error(kind: str, unknown: Sequence[str], known: Sequence[str]) -> KeyError:
    """A KeyError naming the unknown names and, for each, the closest known ones (difflib)."""
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), [str(k) for k in known], n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else "no close match"
        parts.append(f"{name!r} ({hint})")
    return KeyError(f"unknown {kind}: " + "; ".join(parts))


# --------------------------------------------------------------------------- writing

def dictionary_table(rows: Iterable[Mapping]) -> pa.Table:
    """Rows (dicts with the dictionary columns) as a table in :func:`dictionary_schema`.

    Rows are sorted by (layer, concept_id) so that the bytes do not depend on the
    order in which workers produced them. ``norm`` defaults to ``||direction||``.
    Raises :class:`DictionaryError` on mixed dimensions, non-finite values,
    duplicate (concept_id, layer) pairs or an empty input.
    """
    rows = sorted(rows, key=lambda r: (int(r["layer"]), str(r["concept_id"])))
    if not rows:
        raise DictionaryError("dictionary_table: no rows to write")
    d = len(rows[0]["direction"])
    directions = np.empty((len(rows), d), dtype=np.float32)
    seen = set()
    for i, row in enumerate(rows):
        key = (str(row["concept_id"]), int(row["layer"]))
        if key in seen:
            raise DictionaryError(f"dictionary_table: duplicate row for concept {key[0]!r} at layer {key[1]}")
        seen.add(key)
        vec = np.asarray(row["direction"], dtype=np.float32).reshape(-1)
        if vec.shape[0] != d:
            raise DictionaryError(
                f"dictionary_table: concept {key[0]!r} layer {key[1]} has dimension {vec.shape[0]}, "
                f"the first row has {d}; all directions must have the same dimension")
        if not np.isfinite(vec).all():
            raise DictionaryError(f"dictionary_table: concept {key[0]!r} layer {key[1]} has NaN/inf values")
        directions[i] = vec
    norms = [float(r["norm"]) if r.get("norm") is not None else float(np.linalg.norm(directions[i]))
             for i, r in enumerate(rows)]
    schema = dictionary_schema(d)
    direction_col = pa.FixedSizeListArray.from_arrays(pa.array(directions.reshape(-1), pa.float32()), d)
    return pa.table({
        "concept_id": pa.array([str(r["concept_id"]) for r in rows], pa.string()),
        "layer": pa.array([int(r["layer"]) for r in rows], pa.int32()),
        "direction": direction_col,
        "n_pos": pa.array([int(r["n_pos"]) for r in rows], pa.int64()),
        "n_neg": pa.array([int(r["n_neg"]) for r in rows], pa.int64()),
        "norm": pa.array(norms, pa.float32()),
    }, schema=schema)


def dictionary_parquet_bytes(rows: Iterable[Mapping]) -> bytes:
    """The parquet bytes of :func:`dictionary_table` (same rows, same bytes)."""
    buf = io.BytesIO()
    pq.write_table(dictionary_table(rows), buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def write_dictionary_parquet(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    """Write rows to a local ``dictionary/*.parquet`` file, atomically and deterministically."""
    data = dictionary_parquet_bytes(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- reading

@dataclass
class ConceptDictionary:
    """Concept directions per layer, rows in ``concept_ids`` order (concepts.parquet order).

    Attributes:
        concept_ids: concept ids ("dog.n.01"), the row order of every matrix.
        groups: each concept's semantic group (WordNet lexicographer file).
        polarity: each concept's label: desirable, undesirable or neutral.
        layers: the layers loaded, ascending.
        d: dimension of every direction.
        source: the folder the dictionary was read from.
        metadata: the folder's metadata.json (empty when absent).
        missing: concepts of concepts.parquet (reserve rows aside) without a direction at some loaded layer
            (dropped from ``concept_ids``; the pipeline dead-letters them).
    """

    concept_ids: list[str]
    groups: list[str]
    polarity: list[str]
    layers: list[int]
    d: int
    source: str
    _directions: dict[int, np.ndarray] = field(repr=False)
    _stats: dict[int, dict[str, np.ndarray]] = field(repr=False)
    metadata: dict = field(default_factory=dict, repr=False)
    missing: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._index = {c: i for i, c in enumerate(self.concept_ids)}

    def __len__(self) -> int:
        return len(self.concept_ids)

    def _check_layer(self, layer: int) -> int:
        if layer not in self._directions:
            raise KeyError(f"layer {layer} is not loaded from {self.source}; loaded layers: {self.layers}")
        return layer

    def directions(self, layer: int, unit: bool = False) -> torch.Tensor:
        """The [n_concepts, d] float32 directions at ``layer`` (unit rows when ``unit``)."""
        mat = torch.from_numpy(self._directions[self._check_layer(layer)].copy())
        return unit_rows(mat) if unit else mat

    def stats(self, layer: int) -> dict[str, np.ndarray]:
        """Per-concept ``n_pos``, ``n_neg`` and ``norm`` at ``layer`` (concept_ids order)."""
        return {k: v.copy() for k, v in self._stats[self._check_layer(layer)].items()}

    def indices(self, names: Iterable[str]) -> list[int]:
        """Row indices of concept ids; unknown ids raise a KeyError listing the closest ones."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise closest_names_error("concept id(s)", unknown, self.concept_ids)
        return [self._index[n] for n in names]

    def index(self, name: str) -> int:
        """Row index of one concept id."""
        return self.indices([name])[0]

    def with_polarity(self, polarity: str) -> list[int]:
        """Indices of the concepts labelled ``polarity`` (desirable, undesirable, neutral)."""
        if polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
        return [i for i, p in enumerate(self.polarity) if p == polarity]

    def undesirable(self) -> list[int]:
        """Indices of the undesirable concepts (K-)."""
        return self.with_polarity("undesirable")

    def desirable(self) -> list[int]:
        """Indices of the desirable concepts (K+)."""
        return self.with_polarity("desirable")


def unit_rows(mat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows divided by their L2 norm; an all-zero row raises (it has no direction)."""
    norms = mat.norm(dim=-1, keepdim=True)
    if bool((norms <= eps).any()):
        bad = torch.nonzero(norms.reshape(-1) <= eps).reshape(-1)[:5].tolist()
        raise ValueError(f"cannot unit-normalise all-zero rows {bad}")
    return mat / norms


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and "\\" not in text and not text.endswith(".parquet"))


def resolve_dictionary_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder holding the dictionary: the path itself, or a Hub dataset snapshot.

    A string of the form ``owner/name`` that is not an existing local path is
    downloaded with ``huggingface_hub.snapshot_download(repo_type="dataset")``;
    failure (no network, unknown repo) raises :class:`DictionaryError` saying so.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DictionaryError(f"{path} is a file; load_dictionary expects an output folder "
                                  "holding concepts.parquet and dictionary/*.parquet")
        return path
    text = str(path_or_repo_id)
    if not _looks_like_repo_id(text):
        raise FileNotFoundError(f"dictionary folder {text} does not exist (pass an output folder "
                                "holding concepts.parquet and dictionary/, or a Hub dataset id owner/name)")
    from huggingface_hub import snapshot_download  # only needed for Hub ids

    try:
        local = snapshot_download(
            repo_id=text, repo_type="dataset", revision=revision,
            allow_patterns=["concepts.parquet", "dictionary/*.parquet", "metadata.json"])
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the user
        raise DictionaryError(
            f"could not download the Hub dataset {text!r} ({type(exc).__name__}: {exc}). "
            "Without network access, download the folder elsewhere and pass its local path; "
            f"if {text!r} was meant as a local folder, it does not exist") from exc
    return Path(local)


def _read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except Exception as exc:
        raise DictionaryError(f"{path}: not a readable parquet file ({exc})") from exc


def _read_concepts(folder: Path) -> pa.Table:
    path = folder / "concepts.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a dictionary folder needs concepts.parquet "
                                "(written by `daco concepts`) beside dictionary/")
    table = _read_table(path)
    missing = [c for c in CONCEPT_COLUMNS if c not in table.column_names]
    if missing:
        raise DictionaryError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    ids = table.column("concept_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})[:5]
        raise DictionaryError(f"{path}: duplicate concept_id values, e.g. {dup}")
    bad = sorted({p for p in table.column("polarity").to_pylist() if p not in POLARITIES})
    if bad:
        raise DictionaryError(f"{path}: polarity values {bad} are not in {POLARITIES}")
    return table


def _direction_matrix(path: Path, column: pa.ChunkedArray) -> np.ndarray:
    """The direction column as float32 [rows, d]; fixed-size or equal-length lists of floats."""
    typ = column.type
    if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)) \
            or not pa.types.is_floating(typ.value_type):
        raise DictionaryError(f"{path}: column 'direction' has type {typ}; expected fixed_size_list<float32>[d]")
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, typ.list_size if pa.types.is_fixed_size_list(typ) else 0), np.float32)
    if arr.null_count:
        raise DictionaryError(f"{path}: column 'direction' has {arr.null_count} null value(s)")
    if pa.types.is_fixed_size_list(typ):
        d = typ.list_size
    else:
        lengths = np.unique(np.asarray(arr.value_lengths()))
        if len(lengths) != 1:
            raise DictionaryError(f"{path}: directions have different lengths {lengths.tolist()[:5]}")
        d = int(lengths[0])
    values = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(arr), d)


def read_dictionary_file(path: Path) -> tuple[pa.Table, np.ndarray]:
    """(table, directions float32 [rows, d]) of one dictionary/*.parquet file, checked against the data
    contract (columns, types, finite directions); a violation raises :class:`DictionaryError` naming the file."""
    table = _read_table(path)
    expected = DICTIONARY_SCHEMA
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise DictionaryError(f"{path}: missing column(s) {missing}; the dictionary schema is {expected.names}")
    for name in ("layer", "n_pos", "n_neg"):
        if not pa.types.is_integer(table.schema.field(name).type):
            raise DictionaryError(f"{path}: column {name!r} has type {table.schema.field(name).type}; expected an integer")
    if not pa.types.is_floating(table.schema.field("norm").type):
        raise DictionaryError(f"{path}: column 'norm' has type {table.schema.field('norm').type}; expected float32")
    if not (pa.types.is_string(table.schema.field("concept_id").type)
            or pa.types.is_large_string(table.schema.field("concept_id").type)):
        raise DictionaryError(f"{path}: column 'concept_id' has type {table.schema.field('concept_id').type}; expected string")
    mat = _direction_matrix(path, table.column("direction"))
    bad_rows = np.flatnonzero(~np.isfinite(mat).all(axis=1))
    if len(bad_rows):
        ids = table.column("concept_id").to_pylist()
        layers = table.column("layer").to_pylist()
        examples = [f"{ids[i]}@{layers[i]}" for i in bad_rows[:5]]
        raise DictionaryError(f"{path}: {len(bad_rows)} direction(s) contain NaN/inf, e.g. {examples}; "
                              "re-run the directions stage for them")
    return table, mat


def load_dictionary(path_or_repo_id: str | os.PathLike, layers: Iterable[int] | None = None,
                    revision: str | None = None) -> ConceptDictionary:
    """Load a concept dictionary from an output folder or a Hub dataset repo id.

    Args:
        path_or_repo_id: a local output folder (concepts.parquet + dictionary/*.parquet)
            or a Hugging Face dataset id ``owner/name``.
        layers: layers to load (default: every layer present); an absent layer is an error.
        revision: Hub revision (branch, tag or commit), for repo ids only.

    Returns a :class:`ConceptDictionary`. Concepts that lack a direction at a
    loaded layer are left out and listed in ``.missing`` (with a warning).
    """
    folder = resolve_dictionary_folder(path_or_repo_id, revision)
    concepts = _read_concepts(folder)
    files = sorted((folder / "dictionary").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder / 'dictionary'} holds no *.parquet files: run the dictionary "
                                "stage (`daco` pipeline) to write them")
    wanted = None if layers is None else sorted({int(l) for l in layers})

    per_layer: dict[int, dict[str, tuple[Path, int, np.ndarray]]] = {}
    stats_rows: dict[tuple[int, str], tuple[int, int, float]] = {}
    d = None
    d_file = None
    for path in files:
        table, mat = read_dictionary_file(path)
        if len(table) == 0:
            continue
        if d is None:
            d, d_file = mat.shape[1], path
        elif mat.shape[1] != d:
            raise DictionaryError(f"{path}: directions have dimension {mat.shape[1]}, but {d_file} has {d}; "
                                  "all dictionary files must come from the same model")
        ids = table.column("concept_id").to_pylist()
        lays = table.column("layer").to_pylist()
        n_pos = table.column("n_pos").to_pylist()
        n_neg = table.column("n_neg").to_pylist()
        norms = table.column("norm").to_pylist()
        for i, (cid, layer) in enumerate(zip(ids, lays)):
            if wanted is not None and layer not in wanted:
                continue
            rows = per_layer.setdefault(layer, {})
            if cid in rows:
                raise DictionaryError(f"{path}: concept {cid!r} at layer {layer} also appears in {rows[cid][0]}")
            rows[cid] = (path, i, mat[i])
            stats_rows[(layer, cid)] = (n_pos[i], n_neg[i], norms[i])
    if d is None:
        raise DictionaryError(f"{folder / 'dictionary'}: every dictionary file is empty")
    present = sorted(per_layer)
    if wanted is not None:
        absent = [l for l in wanted if l not in per_layer]
        if absent:
            all_layers = sorted({l for p in files for l in pq.read_table(p, columns=["layer"]).column("layer").to_pylist()})
            raise KeyError(f"layer(s) {absent} not in {folder / 'dictionary'}; available layers: {all_layers}")
    known = set(concepts.column("concept_id").to_pylist())
    for layer in present:
        stray = sorted(set(per_layer[layer]) - known)
        if stray:
            raise DictionaryError(f"{per_layer[layer][stray[0]][0]}: concept(s) {stray[:5]} at layer {layer} "
                                  f"are not in {folder / 'concepts.parquet'}")

    all_ids = concepts.column("concept_id").to_pylist()
    keep = [i for i, cid in enumerate(all_ids) if all(cid in per_layer[l] for l in present)]
    kept = set(keep)
    # reserve rows (the next-ranked candidates retrieval draws on when a concept is absent from
    # the corpus, docs/concepts.md) without directions are unused reserves, not missing concepts
    reserve = concepts.column("reserve").to_pylist() if "reserve" in concepts.column_names else [False] * len(all_ids)
    missing = [cid for i, cid in enumerate(all_ids) if i not in kept and not reserve[i]]
    if missing:
        warnings.warn(f"{len(missing)} concept(s) of {folder / 'concepts.parquet'} have no direction at some "
                      f"of layers {present} and are left out, e.g. {missing[:5]}", stacklevel=2)
    ids = [all_ids[i] for i in keep]
    groups = concepts.column("group").to_pylist()
    polarity = concepts.column("polarity").to_pylist()
    directions = {l: np.stack([per_layer[l][c][2] for c in ids]) if ids else np.zeros((0, d), np.float32)
                  for l in present}
    stats = {l: {name: np.asarray([stats_rows[(l, c)][j] for c in ids], dtype=dt)
                 for j, (name, dt) in enumerate((("n_pos", np.int64), ("n_neg", np.int64), ("norm", np.float32)))}
             for l in present}
    meta_path = folder / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return ConceptDictionary(
        concept_ids=ids, groups=[groups[i] for i in keep], polarity=[polarity[i] for i in keep],
        layers=present, d=int(d), source=str(folder), _directions=directions, _stats=stats,
        metadata=metadata, missing=missing)
