"""Writing the dataset: ``dictionary/*.parquet``, ``metadata.json`` and the dataset card ``README.md``,
and :func:`validate_output_folder`, the check ``daco publish`` runs before uploading.

* ``dictionary/layer_NNN.parquet``: one file per layer (zero-padded to three digits so
  the files sort by layer), rows sorted by concept_id, columns ``concept_id, layer,
  direction fixed_size_list<float32>[d], n_pos, n_neg, norm``; the bytes come from
  ``steering.dictionary.dictionary_parquet_bytes`` (same rows, same bytes). Layer files
  of an earlier run that this run did not write are removed.
* ``metadata.json``: every model (id, pretrained tag / revision, ``untrained``), layers,
  pooling, prompt template, seeds, package versions, counts, ``dimension`` and the
  top-level ``untrained`` (true whenever any model was randomly initialised).
* ``README.md``: a Hugging Face dataset card. Its YAML front matter declares the
  ``concepts``, ``stimuli`` and ``dictionary`` configs (``data_files``), each config's
  features (read from the parquet schemas: the direction is a list of float32 of
  fixed length d), the licence, size category, task categories and tags.

Order in ``daco build``: run the pipeline (``WriteDictionary`` among its sinks), then
``metadata = write_metadata(out, info)``, then ``write_dataset_card(out, metadata)``:
both read the written files (counts, schemas, d), so they run once the pipeline is done.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import yaml
from apache_beam.metrics import Metrics

from steering.dictionary import dictionary_parquet_bytes, dictionary_schema
from transforms import fileio
from transforms.output_folder import FolderUnreadable, open_folder, read_metadata, read_schema
from transforms.picturability import DATA_TERMS

NAMESPACE = "dictionary"

#: Distribution names whose versions metadata.json records.
VERSIONED_PACKAGES = ("daco400k", "torch", "transformers", "open_clip_torch", "apache-beam",
                      "faiss-cpu", "pyarrow", "numpy", "nltk")
#: Keys ``write_metadata`` needs from its caller.
REQUIRED_METADATA = ("models", "layers", "pooling", "prompt_template", "seeds")
#: Configs of the card: name -> data_files pattern (relative to the output folder).
CONFIG_FILES = {"dictionary": "dictionary/*.parquet", "concepts": "concepts.parquet", "stimuli": "stimuli/*.parquet"}
#: Files ``daco publish`` uploads (everything else in the folder, e.g. embeddings/, stays local).
PUBLISHED_PATTERNS = ("README.md", "metadata.json", "concepts.parquet", "stimuli/*.parquet",
                      "dictionary/*.parquet", "deadletter/*.jsonl",
                      "report/figures/*.png")  # the card's "Figures" section (written by `daco report`)


def layer_file_name(layer: int) -> str:
    """File name of one layer's dictionary rows."""
    return f"layer_{int(layer):03d}.parquet"


# --------------------------------------------------------------------------- dictionary/*.parquet

class _WriteLayer(beam.DoFn):
    def __init__(self, dictionary_dir: str):
        self.dictionary_dir = dictionary_dir
        self.rows = Metrics.counter(NAMESPACE, "rows_written")
        self.files = Metrics.counter(NAMESPACE, "files_written")

    def process(self, element):
        layer, rows = element
        rows = list(rows)
        path = fileio.join(self.dictionary_dir, layer_file_name(layer))
        fileio.write_bytes_atomic(path, dictionary_parquet_bytes(rows))
        self.rows.inc(len(rows))
        self.files.inc()
        yield path


def _remove_stale_layers(paths: list[str], dictionary_dir: str):
    """This run's paths, sorted, once files an earlier run left in ``dictionary_dir`` are deleted."""
    yield from fileio.remove_stale(paths, fileio.join(dictionary_dir, "layer_*.parquet"))


class WriteDictionary(beam.PTransform):
    """Dictionary rows (from ``ComputeDirections``) -> ``OUT/dictionary/layer_NNN.parquet``; yields the paths."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.dictionary_dir = fileio.join(out_dir, "dictionary")

    def expand(self, rows):
        return (
            rows
            | "ByLayer" >> beam.Map(lambda row: (int(row["layer"]), row))
            | "GroupLayer" >> beam.GroupByKey()
            | "WriteLayer" >> beam.ParDo(_WriteLayer(self.dictionary_dir))
            | "AllPaths" >> beam.combiners.ToList()
            | "RemoveStale" >> beam.FlatMap(_remove_stale_layers, self.dictionary_dir)
        )


# --------------------------------------------------------------------------- counts and metadata.json

def _parquet_files(folder: str | Path, pattern: str) -> list[str]:
    return fileio.list_files(str(folder), pattern)


def _config_stats(folder: str | Path, pattern: str) -> tuple[list[str], pa.Schema | None, int, int]:
    """(files, schema of the first, rows, bytes) of one config's parquet files, read from the footers
    and the listing only, on any Beam filesystem."""
    files = _parquet_files(folder, pattern)
    rows, schema = 0, None
    for path in files:
        file_schema, n = fileio.parquet_schema_and_rows(path)
        schema, rows = schema or file_schema, rows + n
    return files, schema, rows, sum(fileio.file_sizes(files).values())


def folder_counts(out_dir: str | Path) -> dict[str, int]:
    """Rows of each config in an output folder: {"concepts", "stimuli", "directions"} (0 where absent)."""
    return {"concepts": _config_stats(out_dir, CONFIG_FILES["concepts"])[2],
            "stimuli": _config_stats(out_dir, CONFIG_FILES["stimuli"])[2],
            "directions": _config_stats(out_dir, CONFIG_FILES["dictionary"])[2]}


def _dictionary_dimension(folder: str | Path) -> int | None:
    schema = _config_stats(folder, CONFIG_FILES["dictionary"])[1]
    if schema is None:
        return None
    typ = schema.field("direction").type
    return typ.list_size if pa.types.is_fixed_size_list(typ) else None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the output (absent ones omitted), and Python's."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_metadata(out_dir: str, info: dict) -> dict:
    """Write ``OUT/metadata.json`` from ``info`` and the folder's files; returns what was written.

    ``info`` must hold ``models`` ({role: {"id": ..., "untrained": bool, ...}}, e.g. roles
    ``clip`` and ``mllm``), ``layers``, ``pooling``, ``prompt_template`` and ``seeds``; any
    other keys (``counts`` from the run's counters, ``license``, ...) are kept. Added:
    ``versions``, ``counts`` of concepts / stimuli / directions read from the parquet files
    (a caller's count that disagrees with the files is an error), ``dimension`` and
    ``untrained`` (true when any model is). Local folders only (the files are counted).
    """
    missing = [k for k in REQUIRED_METADATA if k not in info]
    if missing:
        raise ValueError(f"write_metadata: missing key(s) {missing}; required: {list(REQUIRED_METADATA)}")
    models = info["models"]
    if not isinstance(models, dict) or not models or not all(isinstance(m, dict) and "id" in m for m in models.values()):
        raise ValueError("write_metadata: 'models' must map a role (clip, mllm) to {'id': ..., 'untrained': bool}")
    folder = str(out_dir)
    counts = dict(info.get("counts") or {})
    for name, found in folder_counts(folder).items():
        if name in counts and int(counts[name]) != found:
            raise ValueError(f"write_metadata: counts.{name} is {counts[name]} but {folder} holds {found} rows")
        counts[name] = found
    untrained = bool(info.get("untrained")) or any(bool(m.get("untrained")) for m in models.values())
    metadata = {**info, "counts": counts, "dimension": _dictionary_dimension(folder),
                "versions": package_versions(), "untrained": untrained}
    fileio.write_json_atomic(fileio.join(str(out_dir), "metadata.json"), metadata)
    return metadata


# --------------------------------------------------------------------------- README.md (dataset card)

def _dtype_name(typ: pa.DataType) -> str:
    """The ``datasets`` name of a primitive arrow type (string, bool, int32, float32, ...)."""
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "string"
    if pa.types.is_boolean(typ):
        return "bool"
    return np.dtype(typ.to_pandas_dtype()).name


def yaml_feature(field: pa.Field) -> dict:
    """One feature of a card's ``dataset_info`` in the Hub's YAML form (as ``datasets`` writes it)."""
    typ = field.type
    if pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ):
        feature = {"name": field.name, "list": _dtype_name(typ.value_type)}
        if pa.types.is_fixed_size_list(typ):
            feature["length"] = typ.list_size
        return feature
    return {"name": field.name, "dtype": _dtype_name(typ)}


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return label
    return "100M<n<1B"


def _front_matter(folder: str, metadata: dict) -> dict:
    configs, infos, rows = [], [], {}
    for name, pattern in CONFIG_FILES.items():
        files, schema, rows[name], num_bytes = _config_stats(folder, pattern)
        if not files:
            continue
        config = {"config_name": name, "data_files": [{"split": "train", "path": pattern}]}
        if name == "dictionary":
            config["default"] = True
        configs.append(config)
        # num_bytes: the parquet files' size (without it `datasets` warns on every load)
        infos.append({"config_name": name, "features": [yaml_feature(schema.field(n)) for n in schema.names],
                      "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": rows[name]}],
                      "download_size": num_bytes, "dataset_size": num_bytes})
    tags = ["interpretability", "activation-steering", "concept-dictionary", "wordnet", "multimodal", "safety"]
    if metadata.get("untrained"):
        tags.append("untrained-model")
    return {
        "pretty_name": metadata.get("pretty_name", "DACO-400K"),
        "license": metadata.get("license", "other"),
        "language": ["en"],
        "size_categories": [size_category(max(rows.values(), default=0))],
        "task_categories": ["feature-extraction", "image-text-to-text"],
        "tags": tags,
        "configs": configs,
        "dataset_info": infos,
    }


def _model_lines(models: dict) -> list[str]:
    lines = ["| role | model | weights |", "| --- | --- | --- |"]
    for role in sorted(models):
        m = models[role]
        pretrained = m.get("pretrained") or m.get("revision") or ""
        weights = "**random (untrained, seeded)**" if m.get("untrained") else (f"pretrained `{pretrained}`" if pretrained else "pretrained")
        lines.append(f"| {role} | `{m['id']}` | {weights} |")
    return lines


def dataset_card(out_dir: str | Path, metadata: dict) -> str:
    """The text of ``README.md`` for an output folder and its metadata (see the module docstring)."""
    folder = str(out_dir)
    front = yaml.safe_dump(_front_matter(folder, metadata), sort_keys=False, allow_unicode=True)
    counts = metadata.get("counts", {})
    layers = ", ".join(str(layer) for layer in metadata.get("layers", []))
    lines = ["---", front.rstrip("\n"), "---", "", f"# {metadata.get('pretty_name', 'DACO-400K')}", ""]
    if metadata.get("untrained"):
        lines += ["> [!WARNING]",
                  "> **The vectors in this dataset are not meaningful.** At least one model that made it was",
                  "> randomly initialised (`untrained: true` in `metadata.json`), e.g. a small seeded",
                  "> configuration used to test the pipeline without downloading weights. Use it to exercise",
                  "> code, never as a concept dictionary.", ""]
    lines += [
        "A dictionary of visual concept directions inside a multimodal LLM, built as in DACO",
        "(CVPR 2026): one direction per WordNet concept and decoder layer, the difference between the",
        "mean activations of caption-image pairs that show the concept and of pairs that do not.",
        "",
        "## How it was made",
        "",
        f"1. **Concepts** ({counts.get('concepts', 0):,}): picturable WordNet 3.0 noun synsets (things, visible "
        "actions and events), each word labelling its best sense and any other sense with enough evidence, ranked "
        "by published human ratings of concreteness and visual strength and by word frequency, times a factor per "
        "lexicographer group that lowers persons, acts, events, places, body parts and abstractions except their "
        "visible subtrees (species and artefacts no norm rates take the ratings of their nearest rated hypernym), "
        "each with its lexicographer group and a desirable / "
        "undesirable / neutral label (`concepts` config). Rows flagged `reserve` are next-ranked candidates "
        "that retrieval draws on when a concept has no evidence in the corpus.",
        f"2. **Stimuli** ({counts.get('stimuli', 0):,}): caption-image pairs retrieved with CLIP. Each concept "
        "is scored against the image and the caption of a pair, `s_img` and `s_txt` in (0, 1], combined "
        "with DACO's distance `score = sqrt(-(ln s_img + ln s_txt))` (lower is closer); the closest pairs "
        "are the concept's positives, far ones its negatives (`stimuli` config).",
        f"3. **Activations**: each stimulus, formatted with the prompt template below in the MLLM's chat "
        f"template, is run through the frozen model; the residual stream after decoder layers {layers} is "
        f"pooled over token positions ({metadata.get('pooling', '?')}).",
        f"4. **Directions** ({counts.get('directions', 0):,} rows, dimension {metadata.get('dimension')}): "
        "`direction = mean(positives) - mean(negatives)` per concept and layer, with the counts `n_pos`, "
        "`n_neg` and the L2 `norm` (`dictionary` config; sums accumulated in float64, stored as float32).",
        "",
        "## Models",
        "",
        *_model_lines(metadata.get("models", {})),
        "",
        f"Prompt template: `{metadata.get('prompt_template', '')}`",
        "",
        f"Seeds: `{json.dumps(metadata.get('seeds', {}), sort_keys=True)}`",
        "",
        "## Files",
        "",
        "| path | holds |",
        "| --- | --- |",
        "| `concepts.parquet` | concept_id, lemma, lemmas, definition, group, hypernym_path, depth, frequency, polarity, "
        "polarity_source, concreteness, visual, zipf, picturability, rank, reserve |",
        "| `stimuli/*.parquet` | concept_id, key, caption, url, shard, s_img, s_txt, score, role (positive/negative), rank |",
        "| `dictionary/layer_NNN.parquet` | concept_id, layer, direction (float32 x d), n_pos, n_neg, norm |",
        "| `metadata.json` | models, layers, pooling, prompt template, seeds, package versions, counts, untrained |",
        "| `deadletter/*.jsonl` | every input a stage could not process, with the reason |",
        "",
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        "dictionary = load_dataset(\"<this repo>\", \"dictionary\", split=\"train\")",
        "```",
        "",
        "or, as matrices per layer, `steering.dictionary.load_dictionary(\"<this repo>\")` from the daco400k package.",
        "",
        "## Licence",
        "",
        "Concepts come from WordNet 3.0 (WordNet licence); captions and image URLs belong to the source",
        "corpus and keep its terms; the directions are derived from the models listed above and follow",
        "their licences.",
        "",
        f"Ratings used to rank the concepts (columns concreteness, visual, zipf): {DATA_TERMS}",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(out_dir: str, metadata: dict) -> str:
    """Write ``OUT/README.md`` (the dataset card for ``metadata``); returns its text."""
    text = dataset_card(out_dir, metadata)
    fileio.write_bytes_atomic(fileio.join(str(out_dir), "README.md"), text.encode())
    return text


def read_card_front_matter(text: str) -> dict:
    """The YAML front matter of a dataset card; ValueError when there is none."""
    if not text.startswith("---\n"):
        raise ValueError("does not start with a '---' YAML front matter block")
    end = text.find("\n---", 4)
    if end < 0:
        raise ValueError("its YAML front matter block is not closed by '---'")
    data = yaml.safe_load(text[4:end])
    if not isinstance(data, dict):
        raise ValueError("its YAML front matter is not a mapping")
    return data


# --------------------------------------------------------------------------- validation (daco publish)

class FolderInvalid(FolderUnreadable):
    """An output folder that must not be published; the message names the file and the reason."""


@dataclass
class PublishFile:
    """One file to upload: its path relative to the folder and its size in bytes."""

    path: str
    size: int


def _check_columns(path: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    missing = [n for n in expected.names if n not in schema.names]
    if missing:
        raise FolderInvalid(f"{path}: missing column(s) {missing}; expected {expected.names}")
    wrong = [f"{f.name}: {schema.field(f.name).type} (expected {f.type})" for f in expected
             if not schema.field(f.name).type.equals(f.type)]
    if wrong:
        raise FolderInvalid(f"{path}: wrong column type(s): {'; '.join(wrong)}")


def _required_files(folder: Path, pattern: str, what: str) -> list[Path]:
    files = [Path(p) for p in _parquet_files(folder, pattern)]
    if not files:
        raise FolderInvalid(f"{folder / pattern}: missing ({what}); run `daco build` to write it")
    return files


def _check_dictionary(folder: Path, files: list[Path]) -> tuple[int, set[int]]:
    """(d, layers) of the dictionary files; every row finite, one dimension, known concepts."""
    from steering.dictionary import DictionaryError, load_dictionary

    dims = {}
    for path in files:
        schema = read_schema(path)
        typ = schema.field("direction").type if "direction" in schema.names else None
        if typ is None or not pa.types.is_fixed_size_list(typ):
            raise FolderInvalid(f"{path}: column 'direction' is {typ}; expected fixed_size_list<float32>[d]")
        _check_columns(path, schema, dictionary_schema(typ.list_size))
        dims[path] = typ.list_size
    if len(set(dims.values())) > 1:
        raise FolderInvalid(f"{folder / 'dictionary'}: files have different dimensions "
                            + ", ".join(f"{p.name}={d}" for p, d in dims.items()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # concepts without a direction are dead-lettered, not an error
            loaded = load_dictionary(folder)
    except (DictionaryError, KeyError, FileNotFoundError, pa.ArrowException, OSError) as exc:
        raise FolderInvalid(str(exc).strip("'\"")) from None
    return loaded.d, set(loaded.layers)


def _published_files(folder: Path) -> list[Path]:
    """The files ``daco publish`` uploads; a symbolic link among them (or among their folders) is
    refused, since the upload would send what it points to, possibly from outside the folder."""
    files = sorted({p for pattern in PUBLISHED_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    for path in files:
        link = next((q for q in (path, *path.parents) if q != folder and folder in q.parents and q.is_symlink()), None)
        if link is not None:
            raise FolderInvalid(f"{link}: a symbolic link (to {os.readlink(link)}); publish uploads only real files "
                                "inside the folder: replace the link by a copy of the file, or remove it")
    return files


def validate_output_folder(out_dir: str | Path) -> list[PublishFile]:
    """Check an output folder (local or any Beam filesystem URL) before publishing; return the
    files to upload, sorted.

    Checks: the folder is not marked incomplete (:mod:`transforms.outdir`: a build into it was
    interrupted, so its files may mix two builds); no published file is a symbolic link;
    README.md (a card with YAML front matter declaring configs), metadata.json,
    concepts.parquet, stimuli/*.parquet and dictionary/*.parquet exist and are readable; their
    schemas follow docs/design.md; the directions are fixed_size_list<float32>[d] of one d, finite,
    of known concepts; metadata's counts, dimension and layers match the files. A remote folder
    is checked on a temporary local copy of the published files. Raises :class:`FolderInvalid`
    naming the file and the reason.
    """
    from transforms.outdir import IncompleteFolder, check_complete

    out = str(out_dir).rstrip("/") or "/"
    try:
        check_complete(out)
    except IncompleteFolder as exc:
        raise FolderInvalid(str(exc)) from None
    with open_folder(out, PUBLISHED_PATTERNS, FolderInvalid) as local:
        return _validate_local(local)


def _validate_local(folder: Path) -> list[PublishFile]:
    from transforms.concepts import SCHEMA as CONCEPTS_SCHEMA
    from transforms.retrieve import SCHEMA as STIMULI_SCHEMA

    files = _published_files(folder)
    card_path, meta_path = folder / "README.md", folder / "metadata.json"
    if not card_path.is_file():
        raise FolderInvalid(f"{card_path}: missing; the dataset card is written by `daco build`")
    try:
        front = read_card_front_matter(card_path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise FolderInvalid(f"{card_path}: not a dataset card: {exc}") from None
    if not front.get("configs"):
        raise FolderInvalid(f"{card_path}: its YAML front matter declares no configs")
    metadata = read_metadata(folder)
    if not isinstance(metadata.get("counts"), dict):
        raise FolderInvalid(f"{meta_path}: expected an object with 'counts'")

    concepts = _required_files(folder, CONFIG_FILES["concepts"], "the concepts")
    _check_columns(concepts[0], read_schema(concepts[0]), CONCEPTS_SCHEMA)
    for path in _required_files(folder, CONFIG_FILES["stimuli"], "the stimuli"):
        _check_columns(path, read_schema(path), STIMULI_SCHEMA)
    dictionary = _required_files(folder, CONFIG_FILES["dictionary"], "the directions")
    d, layers = _check_dictionary(folder, dictionary)

    for name, found in folder_counts(folder).items():
        stated = metadata["counts"].get(name)
        if stated is None or int(stated) != found:
            raise FolderInvalid(f"{meta_path}: counts.{name} is {stated} but the files hold {found} rows")
    if metadata.get("dimension") != d:
        raise FolderInvalid(f"{meta_path}: dimension is {metadata.get('dimension')} but the directions have d={d}")
    stray = sorted(layers - {int(layer) for layer in metadata.get("layers", [])})
    if stray:
        raise FolderInvalid(f"{meta_path}: layers {metadata.get('layers')} do not include {stray} found in dictionary/")
    return [PublishFile(p.relative_to(folder).as_posix(), p.stat().st_size) for p in files]
