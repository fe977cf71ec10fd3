"""The run report: a static HTML report of an output folder, in ``OUT/report/`` (``daco report``).

It lives in ``pipeline/`` because it is not a Beam stage: it reads a finished, local
output folder in one process (numpy, pyarrow, matplotlib, PIL) after ``daco build``.
Nothing in ``steering/`` imports it. Layout::

    OUT/report/index.html          run summary, concept map, layer statistics, gallery index
    OUT/report/gallery/G[-N].html  stimulus gallery of concept group G (page N of it)
    OUT/report/figures/*.png       concept_map.png, layer_stats.png (for papers and the card)
    OUT/report/thumbs/SHARD/K.jpg  one JPEG thumbnail per stimulus image, written once

The pages open from disk: inline CSS, no JavaScript, no server, nothing fetched from the
network; hover titles of the map come from SVG ``<title>`` elements. The concept map is
the 2-D PCA of the unit-normalised directions of one layer (default: the middle one of
the dictionary), coloured by WordNet group (lexname), undesirable concepts outlined in
black. Layer statistics: the distribution of direction norms, and how well directions
separate the groups: leave-one-out nearest-centroid accuracy (cosine; chance = the
largest group's share) and the silhouette score (cosine, on a fixed-seed sample).

Limits that keep a 15,000-concept report usable in a browser:

- the map is a PNG; the hover-title SVG is added only up to :data:`SVG_MAX_POINTS` points;
- the gallery is one page per group, split after :data:`CONCEPTS_PER_PAGE` concepts, each
  concept showing at most :data:`MAX_PER_ROLE` positives and negatives (best ranks), so a
  page holds at most ``CONCEPTS_PER_PAGE * 2 * MAX_PER_ROLE`` thumbnails, lazy-loaded;
- index.html lists groups and pages, never every concept.

Thumbnails are read from the shards named by ``metadata.json``'s ``shards`` pattern (or
``OUT/corpus/shards/*.tar``); an image that cannot be found or decoded is shown as a
grey box and counted in :class:`Report` ``thumbs_missing``. A thumbnail already in
``OUT/report/thumbs/`` is reused (delete the folder to redraw them after a rebuild).
"""

from __future__ import annotations

import html
import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from steering.dictionary import DictionaryError, closest_names_error, read_dictionary_file
from transforms import fileio
from transforms.output_folder import FolderUnreadable, open_folder, read_metadata, read_table

#: Thumbnails per concept and role (positives, negatives), the best ranks first.
MAX_PER_ROLE = 6
#: Concepts per gallery page; a group with more is split over several pages.
CONCEPTS_PER_PAGE = 40
#: The hover-title SVG map is written only up to this many concepts (the PNG always).
SVG_MAX_POINTS = 2000
#: Silhouette scores use a fixed-seed sample of at most this many directions.
SILHOUETTE_SAMPLE = 2000
#: Longest side of a thumbnail, in pixels.
THUMB_SIZE = 128
#: Where index.html places the concept map image (CSS pixels): left, top, width, height.
MAP_BOX = (16, 96, 720, 540)

_FIGURE_DPI = 100
_CARD_BEGIN = "<!-- daco-report:figures -->"
_CARD_END = "<!-- /daco-report:figures -->"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fff}
header{height:88px;overflow:hidden;padding:4px 16px;box-sizing:border-box}
header h1{font-size:22px;margin:4px 0}
.warn{background:#fff3cd;border:1px solid #d39e00;padding:4px 8px;font-size:13px;margin:0}
#concept-map{position:absolute;left:%dpx;top:%dpx;width:%dpx;height:%dpx;border:0}
main{margin-top:%dpx;padding:0 16px 32px 16px}
nav{padding:8px 16px;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.stages{display:flex;flex-wrap:wrap;gap:0 24px}
.stages h4{margin:8px 0 0 0}
.concept{border-top:1px solid #ddd;padding:6px 0}
.concept h3{margin:4px 0;font-size:16px}
.undesirable{color:#b00}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
.row b{width:72px;font-size:12px}
figure{margin:0;width:%dpx;font-size:11px}
figure img,.nothumb{width:%dpx;height:%dpx;object-fit:contain;background:#eee;display:block}
.cap{display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
"""


class ReportError(FolderUnreadable):
    """An output folder or option the report cannot use (names the file or option and the fix)."""


class LayerStats(NamedTuple):
    """Direction statistics of one layer."""
    layer: int
    n: int                            #: directions at this layer
    norms: np.ndarray                 #: their L2 norms (float32)
    centroid_accuracy: float | None   #: leave-one-out nearest-group-centroid accuracy (cosine)
    chance: float | None              #: the largest group's share among the concepts scored
    silhouette: float | None          #: silhouette score of the groups (cosine), sampled


class Report(NamedTuple):
    """What :func:`make_report` wrote: local Paths, or URL strings for a remote folder."""
    index: Path | str                   #: OUT/report/index.html
    layer: int                          #: the layer of the concept map
    figures: dict[str, Path | str]      #: name -> PNG path (concept_map, layer_stats)
    gallery_pages: list[Path | str]     #: every gallery page
    thumbs_written: int         #: thumbnails made by this run
    thumbs_reused: int          #: thumbnails already there from an earlier run
    thumbs_missing: int         #: stimuli shown without an image (shard or image not found)


@dataclass
class _Folder:
    """The parts of an output folder the report reads."""
    root: Path                          # the local folder read (a temporary copy for a remote one)
    source: str                         # where the folder lives (local path or gs:// URL)
    metadata: dict
    concepts: dict[str, dict]           # concept_id -> concepts.parquet row
    layer_files: dict[int, Path]        # layer -> dictionary file


# --------------------------------------------------------------------------- reading

def _read_folder(out_dir: Path, source: str) -> _Folder:
    metadata, concepts_path = read_metadata(out_dir), out_dir / "concepts.parquet"
    if not concepts_path.is_file():
        raise ReportError(f"{concepts_path}: missing; run `daco build --out {out_dir}` first")
    concepts = {r["concept_id"]: r for r in read_table(concepts_path).to_pylist()}
    evidence_path = out_dir / "retrieve_evidence.parquet"  # each concept's retrieval evidence (docs/concepts.md)
    if evidence_path.is_file():
        for row in read_table(evidence_path).to_pylist():
            concepts.setdefault(row["concept_id"], {"concept_id": row["concept_id"]})["evidence"] = row
    layer_files = {}
    for path in sorted((out_dir / "dictionary").glob("*.parquet")):
        for layer in set(read_table(path, columns=["layer"]).column("layer").to_pylist()):
            if layer in layer_files:
                raise ReportError(f"{path}: layer {layer} also appears in {layer_files[layer]}; "
                                  "one file per layer is expected (transforms.write.WriteDictionary)")
            layer_files[int(layer)] = path
    if not layer_files:
        raise ReportError(f"{out_dir / 'dictionary'}: no dictionary/*.parquet files; run `daco build` first")
    return _Folder(out_dir, source, metadata, concepts, layer_files)


def _read_layer(path: Path, layer: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(concept_ids, directions float32 [n, d], norms) of ``layer`` in one dictionary file, read and
    checked by the dictionary loader's reader (:func:`steering.dictionary.read_dictionary_file`)."""
    try:
        table, mat = read_dictionary_file(path)
    except DictionaryError as exc:
        raise ReportError(str(exc)) from None
    rows = np.asarray(table.column("layer").to_numpy()) == layer
    ids = [c for c, keep in zip(table.column("concept_id").to_pylist(), rows) if keep]
    return ids, mat[rows], np.asarray(table.column("norm").to_numpy(), np.float32)[rows]


def _read_stimuli(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((out_dir / "stimuli").glob("*.parquet")):
        rows += read_table(path).to_pylist()
    return rows


def _read_deadletters(out_dir: Path) -> list[tuple[str, str, int, str]]:
    """(stage, reason, count, one example) per dead-letter reason, from OUT/deadletter/*.jsonl."""
    counts: Counter = Counter()
    example: dict[tuple[str, str], str] = {}
    for path in sorted((out_dir / "deadletter").glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = (str(record.get("stage", path.stem)), str(record.get("reason", "?")))
                    text = f"{record.get('source', '')} {record.get('key', '')}: {record.get('detail', '')}"
                except (json.JSONDecodeError, AttributeError):
                    key, text = (path.stem, "unreadable_line"), f"{path.name} line {n}"
                counts[key] += 1
                example.setdefault(key, text.strip()[:200])
    return [(stage, reason, n, example[(stage, reason)]) for (stage, reason), n in sorted(counts.items())]


# --------------------------------------------------------------------------- numbers

def unit_rows(mat: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in float64."""
    mat = np.asarray(mat, dtype=np.float64)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.where(norms > 0, norms, 1.0)


def pca_2d(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D PCA projection of the unit-normalised rows of ``mat`` and the explained variance
    ratios of the two axes. Deterministic: each axis is signed so its largest loading is positive."""
    x = unit_rows(mat)
    x -= x.mean(axis=0)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    values, vectors = np.linalg.eigh(x.T @ x)
    order = np.argsort(values)[::-1][:2]
    axes = vectors[:, order]
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), range(axes.shape[1])])
    coords = x @ axes
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    total = values.clip(min=0).sum()
    ratio = np.pad(values[order].clip(min=0) / total if total > 0 else np.zeros(len(order)), (0, 2 - len(order)))
    return coords, ratio


def group_separation(mat: np.ndarray, groups: Sequence[str]) -> tuple[float | None, float | None, float | None]:
    """(leave-one-out nearest-centroid accuracy, chance, silhouette) of ``groups`` among the
    unit-normalised rows of ``mat``, cosine geometry. Groups with one member are left out of
    the accuracy (they have no centroid without themselves); None where fewer than two
    groups have two members."""
    labels = np.asarray(groups)
    names, counts = np.unique(labels, return_counts=True)
    keep_names = names[counts >= 2]
    if len(keep_names) < 2:
        return None, None, None
    mask = np.isin(labels, keep_names)
    x, y = unit_rows(mat[mask]), np.searchsorted(keep_names, labels[mask])
    sums = np.zeros((len(keep_names), x.shape[1]))
    np.add.at(sums, y, x)
    sizes = np.bincount(y, minlength=len(keep_names)).astype(np.float64)
    sims = x @ sums.T                                    # x . sum_g
    rows = np.arange(len(x))
    own = sums[y] - x                                    # own group's sum without x
    sims = sims / np.linalg.norm(sums, axis=1)
    sims[rows, y] = (x * own).sum(axis=1) / np.maximum(np.linalg.norm(own, axis=1), 1e-12)
    accuracy = float((sims.argmax(axis=1) == y).mean())
    chance = float(sizes.max() / sizes.sum())
    from sklearn.metrics import silhouette_score

    sample = min(len(x), SILHOUETTE_SAMPLE)
    silhouette = float(silhouette_score(x, y, metric="cosine", sample_size=sample, random_state=0))
    return accuracy, chance, silhouette


# --------------------------------------------------------------------------- figures

def group_colours(groups: Sequence[str]) -> dict[str, str]:
    """A stable hex colour per group (sorted names over matplotlib's tab10, tab20b, tab20c)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = [to_hex(colormaps[name](i)) for name, n in (("tab10", 10), ("tab20b", 20), ("tab20c", 20))
               for i in range(n)]
    return {g: palette[i % len(palette)] for i, g in enumerate(sorted(set(groups)))}


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_FIGURE_DPI, metadata={"Software": None})
    fileio.write_bytes_atomic(str(path), buf.getvalue())


def plot_concept_map(coords: np.ndarray, groups: Sequence[str], undesirable: np.ndarray, ratio: np.ndarray,
                     title: str, path: Path) -> None:
    """The concept map PNG: one dot per concept, coloured by group, undesirable ones outlined."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    width, height = MAP_BOX[2] / 80, MAP_BOX[3] / 80
    fig = Figure(figsize=(width, height))
    colours = group_colours(groups)
    columns = 1 if len(colours) < 24 else 2
    axes_width = 0.66 if columns == 1 else 0.52
    ax = fig.add_axes((0.08, 0.09, axes_width, 0.84))
    size = float(np.clip(4000 / max(len(coords), 1), 3, 40))
    group_array = np.asarray(groups)
    for g, colour in colours.items():
        sel = group_array == g
        ax.scatter(coords[sel, 0], coords[sel, 1], s=size, c=colour, linewidths=0, label=g)
    if undesirable.any():
        ax.scatter(coords[undesirable, 0], coords[undesirable, 1], s=size * 2.2, facecolors="none",
                   edgecolors="black", linewidths=1.0)
    ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.1%} of variance)")
    ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in colours.items()]
    handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="black",
                          label="undesirable (outlined)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.1 + axes_width, 0.5), fontsize=7,
               frameon=False, ncol=columns)
    _save(fig, path)


def plot_layer_stats(stats: Sequence[LayerStats], path: Path) -> None:
    """The layer statistics PNG: norm distributions per layer, and group separation per layer."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    left, right = fig.add_axes((0.07, 0.15, 0.4, 0.75)), fig.add_axes((0.57, 0.15, 0.4, 0.75))
    layers = [s.layer for s in stats]
    left.boxplot([s.norms for s in stats], tick_labels=[str(l) for l in layers], showfliers=False)
    left.set_xlabel("layer")
    left.set_ylabel("direction norm")
    left.set_title("direction norms", fontsize=10)
    for name, key, style in (("nearest-centroid accuracy", "centroid_accuracy", "o-"),
                             ("chance", "chance", "k--"), ("silhouette", "silhouette", "s-")):
        values = [getattr(s, key) for s in stats]
        if any(v is not None for v in values):
            right.plot(layers, [np.nan if v is None else v for v in values], style, label=name)
    right.set_xlabel("layer")
    right.set_xticks(layers)
    right.set_title("how well directions separate groups", fontsize=10)
    if right.lines:
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "needs two groups with two concepts each", ha="center", transform=right.transAxes)
    _save(fig, path)


def map_svg(coords: np.ndarray, ids: Sequence[str], groups: Sequence[str], undesirable: np.ndarray) -> str:
    """The concept map as inline SVG with a hover title per concept (used up to SVG_MAX_POINTS)."""
    width, height, pad = MAP_BOX[2], MAP_BOX[3], 12
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    xy = pad + (coords - lo) / span * [width - 2 * pad, height - 2 * pad]
    colours = group_colours(groups)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="concept map">']
    for (x, y), cid, g, bad in zip(xy, ids, groups, undesirable):
        stroke = ' stroke="black" stroke-width="1.5"' if bad else ""
        label = html.escape(f"{cid} ({g}{', undesirable' if bad else ''})")
        parts.append(f'<circle cx="{x:.1f}" cy="{height - y:.1f}" r="4" fill="{colours[g]}"{stroke}>'
                     f"<title>{label}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- thumbnails

def _shard_paths(folder: _Folder) -> dict[str, str]:
    """Shard name -> path, from metadata's ``shards`` pattern (a relative one is relative to the
    output folder, wherever the build ran) or OUT/corpus/shards/*.tar ({} if none)."""
    from transforms.shards import ShardsNotFound, match_shards, shard_name

    pattern = fileio.under(folder.source, folder.metadata.get("shards") or "corpus/shards/*.tar")
    try:
        return {shard_name(p): p for p in match_shards(pattern)}
    except (ShardsNotFound, OSError, ValueError):
        return {}


def thumb_name(shard: str, key: str) -> str:
    """The thumbnail's path relative to OUT/report (``thumbs/SHARD/KEY.jpg``, characters made safe)."""
    return f"thumbs/{_SAFE.sub('_', str(shard))}/{_SAFE.sub('_', str(key))}.jpg"


def thumbnail_jpeg(image: bytes) -> bytes:
    """A JPEG thumbnail (longest side THUMB_SIZE) of image bytes; deterministic."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_thumbnails(folder: _Folder, wanted: set[tuple[str, str]], report_dir: Path) -> tuple[dict, int, int]:
    """Thumbnails of the (shard, key) pairs in ``wanted``, reading each needed shard once.

    Returns ({(shard, key): relative path}, written, reused); pairs absent from the result have
    no image (shard not found, key not in it, damaged tar or undecodable image)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from transforms.shards import IMAGE_EXTENSIONS, iter_tar_groups, shard_name

    found, written, reused = {}, 0, 0
    todo: dict[str, set[str]] = defaultdict(set)
    for shard, key in wanted:
        rel = thumb_name(shard, key)
        if (report_dir / rel).is_file():
            found[(shard, key)], reused = rel, reused + 1
        else:
            todo[str(shard)].add(str(key))
    paths = _shard_paths(folder) if todo else {}
    for shard in sorted(todo):
        path, keys = paths.get(shard_name(shard)), todo[shard]
        if path is None:
            continue
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
                for key, members in iter_tar_groups(fh):
                    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                    if key not in keys or image is None:
                        continue
                    try:
                        data = thumbnail_jpeg(image)
                    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; shown as missing
                        continue
                    rel = thumb_name(shard, key)
                    fileio.write_bytes_atomic(str(report_dir / rel), data)
                    found[(shard, key)], written = rel, written + 1
        except (tarfile.TarError, OSError, EOFError):
            pass  # records after the damage stay missing (counted by the caller)
    return found, written, reused


# --------------------------------------------------------------------------- HTML

def _e(value) -> str:
    return html.escape(str(value))


def _page(title: str, body: str) -> str:
    top = MAP_BOX[1] + MAP_BOX[3] + 16
    css = _CSS % (*MAP_BOX, top, THUMB_SIZE, THUMB_SIZE, THUMB_SIZE)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{css}</style></head><body>\n{body}\n</body></html>\n")


def _table(header: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{v:,}</td>' if i in numeric and isinstance(v, int)
                                    else f"<td>{_e(v)}</td>" for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _counter_tables(counters: dict) -> str:
    by_stage: dict[str, list] = defaultdict(list)
    for name, value in sorted(counters.items()):
        stage, _, counter = name.partition(".")
        number = isinstance(value, (int, float)) and float(value).is_integer()
        by_stage[stage].append((counter or stage, int(value) if number else value))
    if not by_stage:
        return "<p>metadata.json records no counters.</p>"
    return '<div class="stages">' + "".join(
        f"<div><h4>{_e(stage)}</h4>{_table(('counter', 'value'), rows, numeric=(1,))}</div>"
        for stage, rows in sorted(by_stage.items())) + "</div>"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _group_slug(group: str) -> str:
    return _SAFE.sub("_", group or "unknown")


def _gallery_pages(concept_ids: Sequence[str], concepts: dict) -> dict[str, list[list[str]]]:
    """group -> pages (lists of concept ids, CONCEPTS_PER_PAGE each), groups and ids sorted."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for cid in sorted(concept_ids):
        by_group[concepts.get(cid, {}).get("group") or "unknown"].append(cid)
    return {g: [ids[i:i + CONCEPTS_PER_PAGE] for i in range(0, len(ids), CONCEPTS_PER_PAGE)]
            for g, ids in sorted(by_group.items())}


def _page_name(group: str, page: int) -> str:
    return f"gallery/{_group_slug(group)}{'' if page == 0 else f'-{page + 1}'}.html"


def _stimulus_figure(row: dict, thumbs: dict) -> str:
    rel = thumbs.get((str(row["shard"]), str(row["key"])))
    img = (f'<img loading="lazy" src="../{_e(rel)}" alt="{_e(row["key"])}" width="{THUMB_SIZE}" height="{THUMB_SIZE}">'
           if rel else f'<div class="nothumb" title="image not found in shard {_e(row["shard"])}"></div>')
    caption = row["caption"] if len(row["caption"]) <= 120 else row["caption"][:117] + "..."
    return (f'<figure title="{_e(row["key"])}">{img}<figcaption><span class="cap">{_e(caption)}</span>'
            f'score {row["score"]:.3f} · img {row["s_img"]:.2f} · txt {row["s_txt"]:.2f}</figcaption></figure>')


def _evidence_line(ev: dict | None) -> str:
    """One line on a concept's retrieval evidence (``retrieve_evidence.parquet``), or nothing."""
    if not ev:
        return ""
    z = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{v:.1f}"  # noqa: E731
    return (f"<div class=evidence>retrieval: <b>{_e(ev['status'])}</b>; rank {ev['rank']}"
            f"{' (reserve)' if ev['reserve'] else ''}; {ev['n_evidence']} pair(s) match in image and caption; "
            f"best z image {z(ev['best_z_img'])}, caption {z(ev['best_z_txt'])}</div>")


def _gallery_page(group: str, page: int, n_pages: int, ids: Sequence[str], concepts: dict,
                  stimuli: dict, thumbs: dict) -> str:
    links = ['<a href="../index.html">index</a>']
    if page > 0:
        links.append(f'<a href="../{_page_name(group, page - 1)}">previous</a>')
    if page + 1 < n_pages:
        links.append(f'<a href="../{_page_name(group, page + 1)}">next</a>')
    parts = [f"<nav>{' · '.join(links)}</nav><main style=\"margin-top:0\"><h1>{_e(group)}: page {page + 1} of "
             f"{n_pages}</h1>"]
    for cid in ids:
        c = concepts.get(cid, {})
        bad = c.get("polarity") == "undesirable"
        parts.append(f'<section class="concept" id="{_e(cid)}"><h3{" class=undesirable" if bad else ""}>'
                     f"{_e(cid)} <small>({_e(c.get('polarity', '?'))})</small></h3>"
                     f"<div>{_e(c.get('definition', ''))}</div>{_evidence_line(c.get('evidence'))}")
        for role in ("positive", "negative"):
            rows = stimuli.get((cid, role), [])
            figures = "".join(_stimulus_figure(r, thumbs) for r in rows) or "<i>none</i>"
            parts.append(f'<div class="row"><b>{role}s</b>{figures}</div>')
        parts.append("</section>")
    parts.append("</main>")
    return _page(f"DACO-400K report: {group} ({page + 1}/{n_pages})", "".join(parts))


def _evidence_summary(concepts: dict) -> str:
    """Counts of the retrieval statuses (kept, absent, reserve_unused, ...), when the folder has them."""
    statuses = Counter(c["evidence"]["status"] for c in concepts.values() if c.get("evidence"))
    if not statuses:
        return ""
    return ("<h3>Retrieval evidence</h3>" + _table(("status", "concepts"), sorted(statuses.items()), numeric=(1,))
            + "<p>Each concept's evidence is on its gallery page (absent: no pair matches it in image AND "
            "caption; reserve concepts replace absent ones).</p>")


def _index_page(folder: _Folder, layer: int, ratio: np.ndarray, n_map: int, svg: str | None,
                stats: Sequence[LayerStats], pages: dict, deadletters: list, thumbs_missing: int) -> str:
    meta = folder.metadata
    warn = ('<p class="warn"><b>Untrained models:</b> metadata.json says at least one model was randomly '
            "initialised; these directions are not meaningful.</p>") if meta.get("untrained") else ""
    models = [(role, m.get("id", "?"), "untrained (random, seeded)" if m.get("untrained") else
               (m.get("pretrained") or m.get("revision") or "pretrained"))
              for role, m in sorted((meta.get("models") or {}).items())]
    counts = [(k, int(v)) for k, v in sorted((meta.get("counts") or {}).items()) if isinstance(v, (int, float))]
    dead = (_table(("stage", "reason", "count", "example"), deadletters, numeric=(2,)) if deadletters
            else "<p>No dead letters.</p>")
    stat_rows = [(s.layer, s.n, f"{np.median(s.norms):.4g}" if s.n else "n/a",
                  f"{s.norms.min():.4g} – {s.norms.max():.4g}" if s.n else "n/a",
                  _fmt(s.centroid_accuracy), _fmt(s.chance), _fmt(s.silhouette)) for s in stats]
    gallery_rows = "".join(
        f"<tr><td>{_e(g)}</td><td class=n>{sum(map(len, p))}</td><td>"
        + " ".join(f'<a href="{_page_name(g, i)}">{i + 1}</a>' for i in range(len(p))) + "</td></tr>"
        for g, p in pages.items())
    svg_part = (f"<details><summary>Interactive map (hover a dot for its concept)</summary>{svg}</details>"
                if svg else f"<p>{n_map:,} concepts: above {SVG_MAX_POINTS:,} the map is shown as an image only.</p>")
    body = f"""<header><h1>DACO-400K run report</h1>{warn}</header>
<img id="concept-map" src="figures/concept_map.png" alt="concept map of layer {layer}">
<main>
<h2 id="map">Concept map, layer {layer}</h2>
<p>The image above: the 2-D PCA ({ratio[0]:.1%} + {ratio[1]:.1%} of variance) of the {n_map:,} unit-normalised
directions of layer {layer}, coloured by WordNet group; undesirable concepts are outlined in black.
Other layers: <code>daco report OUT --layer L</code>.</p>
{svg_part}
<h2 id="summary">Run summary</h2>
<h3>Models</h3>{_table(("role", "model", "weights"), models)}
<h3>Counts</h3>{_table(("rows", "count"), counts, numeric=(1,))}
<p>Layers: {_e(", ".join(map(str, meta.get("layers", []))))}; pooling {_e(meta.get("pooling", "?"))};
dimension {_e(meta.get("dimension", "?"))}.</p>
<h3>Dead letters</h3>{dead}
{_evidence_summary(folder.concepts)}
<h3>Counters by stage</h3>{_counter_tables(meta.get("counters") or {})}
<h2 id="layers">Layer statistics</h2>
<img src="figures/layer_stats.png" alt="layer statistics" width="900" height="360">
{_table(("layer", "directions", "median norm", "norm range", "nearest-centroid acc.", "chance", "silhouette"), stat_rows)}
<p>Nearest-centroid accuracy: each direction is assigned to the group whose mean unit direction
(without itself) is closest in cosine; chance is the largest group's share. Silhouette: cosine,
on at most {SILHOUETTE_SAMPLE:,} directions (seed 0).</p>
<h2 id="gallery">Stimulus gallery</h2>
<p>One page per group, at most {CONCEPTS_PER_PAGE} concepts a page and {MAX_PER_ROLE} positives and
negatives a concept (best ranks). {thumbs_missing:,} stimuli have no image (shard not found).</p>
<table><tr><th>group</th><th>concepts</th><th>pages</th></tr>{gallery_rows}</table>
</main>"""
    return _page("DACO-400K run report", body)


# --------------------------------------------------------------------------- the card

def update_card_figures(out_dir: str | Path, figures: dict[str, str]) -> str:
    """Append (or replace) a "Figures" section at the end of OUT/README.md linking ``figures``
    ({caption: path relative to OUT}); the YAML front matter is left as it is. Returns the text."""
    card = Path(out_dir) / "README.md"
    if not card.is_file():
        raise ReportError(f"{card}: missing; the dataset card is written by `daco build`")
    text = card.read_text(encoding="utf-8")
    start, end = text.find(_CARD_BEGIN), text.find(_CARD_END)
    if start >= 0 and end > start:
        text = text[:start].rstrip("\n") + "\n" + text[end + len(_CARD_END):].lstrip("\n")
    lines = [_CARD_BEGIN, "## Figures", "", "Made by `daco report` (the full HTML report is `report/index.html`).", ""]
    lines += [f"![{caption}]({path})\n" for caption, path in figures.items()]
    text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + _CARD_END + "\n"
    fileio.write_bytes_atomic(str(card), text.encode())
    return text


# --------------------------------------------------------------------------- entry point

#: What the report reads from a remote output folder (copied to a temporary folder first).
REPORT_INPUTS = ("metadata.json", "concepts.parquet", "README.md", "dictionary/*.parquet", "stimuli/*.parquet",
                 "deadletter/*.jsonl", "report/thumbs/*/*.jpg")


def make_report(out_dir: str | Path, concept_ids: Sequence[str] | None = None, layer: int | None = None,
                update_card: bool = True) -> Report:
    """Write the HTML report of an output folder into ``OUT/report/`` (see the module docstring).

    ``concept_ids`` limits the gallery to those concepts (the map and statistics keep every
    concept); ``layer`` picks the map's layer (default: the middle layer of the dictionary).
    ``update_card`` adds the figures to OUT/README.md. Unknown concepts or layers raise
    KeyError / :class:`ReportError` before anything is written. A remote folder (gs://) is
    read into a temporary local copy (:data:`REPORT_INPUTS`), and the report and card are
    copied back.
    """
    out = str(out_dir).rstrip("/") or "/"
    with open_folder(out, REPORT_INPUTS, ReportError) as local:
        report = _make_report(local, out, concept_ids, layer, update_card)
        if not fileio.is_remote(out):
            return report
        fileio.upload_tree(local / "report", fileio.join(out, "report"))
        if update_card:
            fileio.write_bytes_atomic(fileio.join(out, "README.md"), (local / "README.md").read_bytes())

        def remote(path: Path) -> str:
            return fileio.join(out, *path.relative_to(local).parts)

        return report._replace(index=remote(report.index), figures={k: remote(v) for k, v in report.figures.items()},
                               gallery_pages=[remote(p) for p in report.gallery_pages])


def _make_report(local: Path, source: str, concept_ids, layer, update_card) -> Report:
    folder = _read_folder(local, source)
    layers = sorted(folder.layer_files)
    if layer is None:
        layer = layers[(len(layers) - 1) // 2]
    elif int(layer) not in folder.layer_files:
        raise ReportError(f"--layer {layer}: not in {folder.root / 'dictionary'}; available layers: {layers}")
    layer = int(layer)
    if concept_ids is not None:
        unknown = [c for c in concept_ids if c not in folder.concepts]
        if unknown:
            raise closest_names_error(f"concept(s) for --concepts (not in {folder.root / 'concepts.parquet'})",
                                      unknown, sorted(folder.concepts))
    report_dir = folder.root / "report"
    figures = {"concept_map": report_dir / "figures" / "concept_map.png",
               "layer_stats": report_dir / "figures" / "layer_stats.png"}

    stats, coords = [], None
    for current in layers:
        ids, mat, norms = _read_layer(folder.layer_files[current], current)
        groups = [folder.concepts.get(c, {}).get("group") or "unknown" for c in ids]
        stats.append(LayerStats(current, len(ids), norms, *group_separation(mat, groups)))
        if current == layer:
            coords, ratio = pca_2d(mat)
            map_ids, map_groups = ids, groups
            undesirable = np.array([folder.concepts.get(c, {}).get("polarity") == "undesirable" for c in ids], bool)
    plot_concept_map(coords, map_groups, undesirable, ratio,
                     f"layer {layer}: {len(map_ids):,} concept directions (PCA)", figures["concept_map"])
    plot_layer_stats(stats, figures["layer_stats"])
    svg = map_svg(coords, map_ids, map_groups, undesirable) if 0 < len(map_ids) <= SVG_MAX_POINTS else None

    gallery_ids = list(concept_ids) if concept_ids is not None else sorted(folder.concepts)
    selected = set(gallery_ids)
    stimuli: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in sorted(_read_stimuli(folder.root), key=lambda r: (r["concept_id"], r["role"], r["rank"], r["key"])):
        bucket = stimuli[(row["concept_id"], row["role"])]
        if row["concept_id"] in selected and len(bucket) < MAX_PER_ROLE:
            bucket.append(row)
    wanted = {(str(r["shard"]), str(r["key"])) for rows in stimuli.values() for r in rows}
    thumbs, written, reused = write_thumbnails(folder, wanted, report_dir)
    pages = _gallery_pages(gallery_ids, folder.concepts)
    page_paths = []
    for stale in (report_dir / "gallery").glob("*.html"):
        stale.unlink()  # pages of an earlier report (other concepts or groups)
    for group, group_pages in pages.items():
        for i, ids in enumerate(group_pages):
            path = report_dir / _page_name(group, i)
            fileio.write_bytes_atomic(str(path), _gallery_page(group, i, len(group_pages), ids, folder.concepts,
                                                               stimuli, thumbs).encode())
            page_paths.append(path)
    missing = len(wanted) - len(thumbs)
    index = report_dir / "index.html"
    fileio.write_bytes_atomic(str(index), _index_page(folder, layer, ratio, len(map_ids), svg, stats, pages,
                                                      _read_deadletters(folder.root), missing).encode())
    if update_card:
        update_card_figures(folder.root, {f"Concept map (layer {layer}, PCA)": "report/figures/concept_map.png",
                                          "Direction norms and group separation per layer":
                                              "report/figures/layer_stats.png"})
    return Report(index, layer, figures, page_paths, written, reused, missing)
