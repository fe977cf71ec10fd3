"""An embedded image-caption corpus in the LAION / CC-3M webdataset format, for the demo and the tests.

:func:`build_corpus` writes, under ``OUT``::

    concepts.parquet       the concepts drawn (the concepts.parquet columns), sorted by concept_id
    urls.parquet           url, caption: the input img2dataset reads (as LAION's metadata parquets)
    shards/00000.tar ...   webdataset shards written by the real img2dataset: key.jpg, key.txt, key.json
    shards/00000.parquet   img2dataset's per-shard table (key, url, caption, status, sha256, ...)
    shards/00000_stats.json
    corpus_truth.parquet   key, shard, url, caption, image_id, image_concept_id, caption_concept_id,
                           kind (match | mismatch | distractor), sha256; sorted by key
    corpus.json            the generator's parameters and counts

How the pairs are made (all from ``numpy.random.default_rng(seed)``):

- ``kind=match`` (about 80%): an image of concept C with a caption naming C's lemma
  from one of :data:`TEMPLATES`. Each concept has a visual signature (background
  texture and colours, a foreground shape and colour) derived from a seeded hash of
  its id, so images of one concept look alike and differ from other concepts'; each
  image jitters the shape's position, size and colours.
- ``kind=mismatch`` (about 10%): the caption names one concept, the image shows another.
- ``kind=distractor`` (about 10%): a random image (colour gradient and blobs) whose
  caption names no word of any drawn concept's lemmas.

The number of concepts drawn is ``min(len(pool), n_match // 5)`` (at least one), so
each concept has at least five matching images. The pool is ``--concepts FILE`` or
:data:`BUILTIN_CONCEPTS` (picturable WordNet 3.0 nouns, checked against WordNet).

The images are served from memory by an HTTP server bound to 127.0.0.1 on a free
port, and ``img2dataset.download`` fetches them as it fetches LAION (no resizing,
no re-encoding: ``skip_reencode`` keeps the served bytes, so ``sha256`` matches).
It downloads with one thread, so each tar holds its records in key order. Same
``seed`` and ``n``: same images, captions, keys and member order; only the URLs'
port differs between runs (and the tar members' mtimes, which img2dataset sets).
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import io
import math
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw

from transforms import fileio

# Picturable WordNet 3.0 noun synsets (concrete objects, animals, vehicles, places), including
# some under the polarity lexicon's undesirable roots (weapons, drugs, death).
BUILTIN_CONCEPTS = (
    "airplane.n.01", "apple.n.01", "banana.n.02", "beach.n.01", "bear.n.01", "bed.n.01",
    "bicycle.n.01", "bird.n.01", "boat.n.01", "bomb.n.01", "book.n.02", "bottle.n.01",
    "bridge.n.01", "bus.n.01", "butterfly.n.01", "cake.n.03", "candle.n.01", "car.n.01",
    "cat.n.01", "chair.n.01", "cigarette.n.01", "clock.n.01", "computer.n.01", "cow.n.01",
    "cup.n.01", "dog.n.01", "elephant.n.01", "fish.n.01", "flower.n.01", "giraffe.n.01",
    "guitar.n.01", "hammer.n.02", "hat.n.01", "horse.n.01", "house.n.01", "key.n.01",
    "kite.n.03", "knife.n.01", "lamp.n.01", "motorcycle.n.01", "mountain.n.01", "piano.n.01",
    "pistol.n.01", "pizza.n.01", "rifle.n.01", "rose.n.01", "sheep.n.01", "shoe.n.01",
    "skull.n.01", "snake.n.01", "spider.n.01", "sword.n.01", "syringe.n.01", "table.n.02",
    "tank.n.01", "telephone.n.01", "train.n.01", "tree.n.01", "truck.n.01", "umbrella.n.01",
    "zebra.n.01",
)

TEMPLATES = (
    "a photo of {a} {x}",
    "a photo of {a} {x} on the grass",
    "a close-up picture of the {x}",
    "an image showing {a} {x}",
    "{a} {x} in the middle of the frame",
    "a blurry snapshot of {a} {x}",
)
DISTRACTOR_ADJECTIVES = ("abstract", "blurry", "colourful", "faded", "bright", "dark", "soft", "noisy")
DISTRACTOR_NOUNS = ("pattern", "texture", "gradient", "smudge", "haze", "background", "swirl", "mosaic")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bars")
TEXTURES = ("plain", "hstripes", "vstripes", "diagonal", "checker", "dots")
KINDS = ("match", "mismatch", "distractor")
MIN_IMAGES_PER_CONCEPT = 5

TRUTH_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("image_id", pa.string()),
    ("image_concept_id", pa.string()),
    ("caption_concept_id", pa.string()),
    ("kind", pa.string()),
    ("sha256", pa.string()),
])


@dataclass(frozen=True)
class Signature:
    """How every image of one concept looks."""

    shape: str
    texture: str
    period: int
    background: tuple[int, int, int]
    background2: tuple[int, int, int]
    foreground: tuple[int, int, int]
    scale: float


@dataclass(frozen=True)
class Pair:
    """One planned image-caption pair; ``image_id`` names the served file."""

    image_id: str
    kind: str
    image_concept_id: str | None
    caption_concept_id: str | None
    caption: str
    image_seed: int


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, val))


def signature(concept_id: str, seed: int) -> Signature:
    """The visual signature of a concept: a deterministic function of ``(seed, concept_id)``."""
    digest = hashlib.blake2b(f"{seed}:{concept_id}".encode(), digest_size=16).digest()
    u = [b / 255 for b in digest]
    hue = u[0]
    return Signature(
        shape=SHAPES[digest[1] % len(SHAPES)],
        texture=TEXTURES[digest[2] % len(TEXTURES)],
        period=4 + 2 * (digest[3] % 4),
        background=_rgb(hue, 0.35 + 0.4 * u[4], 0.55 + 0.4 * u[5]),
        background2=_rgb(hue + 0.08, 0.2 + 0.3 * u[6], 0.3 + 0.3 * u[7]),
        foreground=_rgb(hue + 0.33 + 0.33 * u[8], 0.6 + 0.4 * u[9], 0.6 + 0.4 * u[10]),
        scale=0.28 + 0.14 * u[11],
    )


def _texture(sig: Signature, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    p = sig.period
    mask = {
        "plain": np.zeros((size, size), bool),
        "hstripes": (yy // p) % 2 == 0,
        "vstripes": (xx // p) % 2 == 0,
        "diagonal": ((xx + yy) // p) % 2 == 0,
        "checker": ((xx // p) + (yy // p)) % 2 == 0,
        "dots": ((xx % (2 * p)) < p // 2 + 1) & ((yy % (2 * p)) < p // 2 + 1),
    }[sig.texture]
    img = np.empty((size, size, 3), np.uint8)
    img[...] = sig.background
    img[mask] = sig.background2
    return img


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "star":
        points = [
            (cx + (r if i % 2 == 0 else r / 2.5) * math.sin(i * math.pi / 5),
             cy - (r if i % 2 == 0 else r / 2.5) * math.cos(i * math.pi / 5))
            for i in range(10)
        ]
        draw.polygon(points, fill=fill)
    elif shape == "bars":
        w = r / 3
        for dx in (-2 * w, 0, 2 * w):
            draw.rectangle([cx + dx - w / 2, cy - r, cx + dx + w / 2, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, optimize=False, progressive=False)
    return buf.getvalue()


def render_concept_image(sig: Signature, image_seed: int, size: int) -> bytes:
    """A JPEG of a concept: its signature with a per-image jitter of position, size and colour."""
    rng = np.random.default_rng(image_seed)
    img = Image.fromarray(_texture(sig, size))
    draw = ImageDraw.Draw(img)
    r = size * sig.scale * rng.uniform(0.85, 1.15)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8), size / 2 + rng.uniform(-size / 8, size / 8)
    _draw_shape(draw, sig.shape, cx, cy, r, _jitter(sig.foreground, rng))
    return _encode_jpeg(img)


def render_distractor_image(image_seed: int, size: int) -> bytes:
    """A JPEG of no concept: a random two-colour gradient with a few random blobs."""
    rng = np.random.default_rng(image_seed)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, size)[:, None, None]
    arr = np.broadcast_to(c0 * (1 - t) + c1 * t, (size, size, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 16, size / 6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return _encode_jpeg(img)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def concept_caption(lemma: str, template_index: int) -> str:
    """A caption naming ``lemma`` with template ``template_index`` of :data:`TEMPLATES`."""
    return TEMPLATES[template_index % len(TEMPLATES)].format(a=_article(lemma), x=lemma)


def distractor_captions(concepts: pa.Table) -> list[str]:
    """Captions that contain no word of any lemma of ``concepts``."""
    words = set()
    for lemmas in concepts.column("lemmas").to_pylist():
        for lemma in lemmas:
            words.update(lemma.lower().split())
    captions = [
        f"{_article(adj)} {adj} {noun}"
        for adj in DISTRACTOR_ADJECTIVES for noun in DISTRACTOR_NOUNS
        if adj not in words and noun not in words
    ]
    if not captions:
        raise ValueError("every distractor caption names a word of a drawn concept; no distractors can be made")
    return captions


# ---------------------------------------------------------------- concepts


def builtin_concepts(wordnet_dir: str | None = None) -> pa.Table:
    """:data:`BUILTIN_CONCEPTS` as a concepts.parquet table (checked against WordNet 3.0)."""
    from transforms.concepts import SCHEMA, ConceptsConfig, evidence_columns, lemma_key
    from transforms.picturability import Ratings
    from transforms.polarity import load_lexicon, polarity_table
    from transforms.wordnet import load_wordnet

    from nltk.corpus.reader.wordnet import WordNetError

    wn = load_wordnet(wordnet_dir)
    polarity = polarity_table(wn, load_lexicon(None))
    defaults, rows = ConceptsConfig(), []
    ratings = Ratings(defaults.lemma_combine)
    for rank, concept_id in enumerate(BUILTIN_CONCEPTS):
        try:
            synset = wn.synset(concept_id)
        except (WordNetError, ValueError) as exc:
            raise ValueError(f"built-in corpus concept {concept_id!r} is not in this WordNet ({exc}); "
                             "use WordNet 3.0 or pass --concepts FILE") from None
        path = min(synset.hypernym_paths(), key=lambda p: (len(p), [s.name() for s in p]))
        lemmas = [lemma.name().replace("_", " ") for lemma in synset.lemmas()]
        pol, source = polarity.get(concept_id, ("neutral", ""))
        rows.append({
            "concept_id": concept_id,
            "lemma": lemma_key(lemmas[0]),
            "lemmas": lemmas,
            "definition": synset.definition(),
            "group": synset.lexname(),
            "hypernym_path": [s.name() for s in path],
            "depth": len(path) - 1,
            "frequency": sum(lemma.count() for lemma in synset.lemmas()),
            "polarity": pol,
            "polarity_source": source,
            **evidence_columns(ratings, [lemma.name() for lemma in synset.lemmas()], defaults.weight_tuple(),
                               defaults.group_weights.get(synset.lexname(), 1.0)),
            "rank": rank,
            "reserve": False,
        })
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def load_concepts(path: str) -> pa.Table:
    """A concepts.parquet (at least ``concept_id`` and ``lemma``) as a table sorted by concept_id.

    Raises ValueError naming the file and the fix when it is missing or lacks a column."""
    if not FileSystems.exists(path):
        raise ValueError(f"--concepts: {path} does not exist; write one with `daco concepts --out DIR` "
                         "or leave --concepts out to use the built-in picturable concepts")
    try:
        table = fileio.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parquet failure means the same thing to the user
        raise ValueError(f"--concepts: {path} is not a readable parquet file ({exc})") from None
    missing = [c for c in ("concept_id", "lemma") if c not in table.column_names]
    if missing:
        raise ValueError(f"--concepts: {path} lacks column(s) {missing}; it must have the concepts.parquet "
                         "columns (as `daco concepts` writes), at least concept_id and lemma")
    if table.num_rows == 0:
        raise ValueError(f"--concepts: {path} has no rows")
    if "lemmas" not in table.column_names:
        table = table.append_column("lemmas", pa.array([[lemma] for lemma in table.column("lemma").to_pylist()],
                                                       pa.list_(pa.string())))
    return table.sort_by("concept_id")


# ---------------------------------------------------------------- planning and rendering


def plan_corpus(concepts: pa.Table, n: int, seed: int) -> tuple[pa.Table, list[Pair]]:
    """(the concepts drawn, the ``n`` pairs in serving order); see the module docstring."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    n_distractor = n // 10
    n_mismatch = n // 10
    n_match = n - n_distractor - n_mismatch
    k = min(concepts.num_rows, max(1, n_match // MIN_IMAGES_PER_CONCEPT))
    if k < 2:
        n_match += n_mismatch  # a mismatch needs two concepts
        n_mismatch = 0
    chosen = np.sort(rng.choice(concepts.num_rows, size=k, replace=False))
    drawn = concepts.take(pa.array(chosen)).sort_by("concept_id")
    ids = drawn.column("concept_id").to_pylist()
    lemma = dict(zip(ids, drawn.column("lemma").to_pylist()))
    distractors = distractor_captions(drawn)

    specs: list[tuple[str, str | None, str | None, str]] = []
    for i in range(n_match):
        cid = ids[i % k]
        specs.append(("match", cid, cid, concept_caption(lemma[cid], int(rng.integers(len(TEMPLATES))))))
    for _ in range(n_mismatch):
        a, b = rng.choice(k, size=2, replace=False)
        specs.append(("mismatch", ids[a], ids[b], concept_caption(lemma[ids[b]], int(rng.integers(len(TEMPLATES))))))
    for _ in range(n_distractor):
        specs.append(("distractor", None, None, distractors[int(rng.integers(len(distractors)))]))
    order = rng.permutation(len(specs))
    image_seeds = rng.integers(0, 2**63 - 1, size=len(specs))
    pairs = [
        Pair(f"{i:06d}", *specs[j], image_seed=int(image_seeds[i]))
        for i, j in enumerate(order)
    ]
    return drawn, pairs


def render_pair(pair: Pair, seed: int, size: int) -> bytes:
    """The JPEG bytes of a planned pair's image."""
    if pair.image_concept_id is None:
        return render_distractor_image(pair.image_seed, size)
    return render_concept_image(signature(pair.image_concept_id, seed), pair.image_seed, size)


# ---------------------------------------------------------------- serving and img2dataset


class _ImageHandler(BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = self.images.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the terminal quiet
        pass


@contextlib.contextmanager
def serve_images(images: dict[str, bytes]):
    """Serve ``{"/path.jpg": bytes}`` on 127.0.0.1 (a free port) in a background thread; yields the base URL."""
    handler = type("CorpusImageHandler", (_ImageHandler,), {"images": images})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="corpus-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_img2dataset(url_list: str, output_folder: str, shard_size: int, threads: int = 1) -> None:
    """Run the real ``img2dataset.download`` over a url/caption parquet, writing webdataset shards.

    No resizing or re-encoding (``resize_mode="no"``, ``skip_reencode``), sha256 computed,
    wandb off, Albumentations' update check off, and 127.0.0.1 exempt from any HTTP proxy
    (nothing leaves the machine). Set in this process's environment, which img2dataset's
    worker processes inherit."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    for var in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        if "127.0.0.1" not in hosts:
            os.environ[var] = ",".join(hosts + ["127.0.0.1"])
    from img2dataset import download

    previous_sigint = signal.getsignal(signal.SIGINT)  # download() installs its own and leaves it behind
    try:
        download(
            url_list=url_list,
            output_folder=output_folder,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            processes_count=1,
            thread_count=threads,
            number_sample_per_shard=shard_size,
            resize_mode="no",
            skip_reencode=True,
            encode_format="jpg",
            compute_hash="sha256",
            enable_wandb=False,
            timeout=10,
            retries=2,
            incremental_mode="incremental",  # "overwrite" deletes its own _tmp folder in img2dataset 1.47
            disallowed_header_directives=[],
        )
    finally:
        signal.signal(signal.SIGINT, previous_sigint)


def _shard_tables(shards_dir: str) -> list[tuple[str, pa.Table]]:
    match = FileSystems.match([fileio.join(shards_dir, "*.parquet")])[0]
    paths = sorted(m.path for m in match.metadata_list)
    return [(Path(p).stem, fileio.read_parquet(p)) for p in paths]


def truth_table(pairs: list[Pair], base_url: str, shard_tables: list[tuple[str, pa.Table]]) -> pa.Table:
    """corpus_truth.parquet: img2dataset's keys joined back to the planned pairs by URL.

    Raises RuntimeError naming the images img2dataset failed to fetch (the corpus must be whole)."""
    by_url = {f"{base_url}/{p.image_id}.jpg": p for p in pairs}
    rows, failures = [], []
    for shard, table in shard_tables:
        for meta in table.select(["key", "url", "status", "error_message", "sha256"]).to_pylist():
            pair = by_url.pop(meta["url"])
            if meta["status"] != "success":
                failures.append(f"{meta['url']}: {meta['status']} ({meta['error_message']})")
                continue
            rows.append({
                "key": meta["key"], "shard": shard, "url": meta["url"], "caption": pair.caption,
                "image_id": pair.image_id, "image_concept_id": pair.image_concept_id,
                "caption_concept_id": pair.caption_concept_id, "kind": pair.kind, "sha256": meta["sha256"],
            })
    if failures or by_url:
        raise RuntimeError(
            f"img2dataset did not fetch {len(failures) + len(by_url)} of {len(pairs)} corpus images from the "
            f"loopback server ({base_url}); first: {(failures + list(by_url))[:3]}. Check that nothing blocks "
            "connections to 127.0.0.1 (a firewall, a sandbox) and rerun."
        )
    rows.sort(key=lambda r: r["key"])
    return pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)


@dataclass
class CorpusSummary:
    """What :func:`build_corpus` wrote."""

    out_dir: str
    n_pairs: int
    n_concepts: int
    n_shards: int
    kinds: dict[str, int]


def build_corpus(out_dir: str, n: int = 2000, concepts_path: str | None = None, seed: int = 0,
                 image_size: int = 64, shard_size: int = 1000, wordnet_dir: str | None = None) -> CorpusSummary:
    """Write the embedded corpus under ``out_dir`` (layout in the module docstring)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if image_size < 16:
        raise ValueError(f"--image-size must be >= 16, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if "://" in out_dir:
        raise ValueError(f"--out {out_dir}: the corpus is written to a local directory (img2dataset and the "
                         "loopback server run here); copy it to a bucket afterwards if needed")
    concepts = load_concepts(concepts_path) if concepts_path else builtin_concepts(wordnet_dir)
    drawn, pairs = plan_corpus(concepts, n, seed)
    images = {f"/{p.image_id}.jpg": render_pair(p, seed, image_size) for p in pairs}

    out = str(Path(out_dir).resolve())
    fileio.write_parquet_atomic(fileio.join(out, "concepts.parquet"), drawn)
    url_list = fileio.join(out, "urls.parquet")
    shards_dir = fileio.join(out, "shards")
    shutil.rmtree(shards_dir, ignore_errors=True)  # a previous corpus's shards
    with serve_images(images) as base_url:
        urls = pa.table({"url": [f"{base_url}/{p.image_id}.jpg" for p in pairs], "caption": [p.caption for p in pairs]})
        fileio.write_parquet_atomic(url_list, urls)
        run_img2dataset(url_list, shards_dir, shard_size)
    tables = _shard_tables(shards_dir)
    truth = truth_table(pairs, base_url, tables)
    fileio.write_parquet_atomic(fileio.join(out, "corpus_truth.parquet"), truth)
    kinds = {kind: sum(p.kind == kind for p in pairs) for kind in KINDS}
    fileio.write_json_atomic(fileio.join(out, "corpus.json"), {
        "n": n, "seed": seed, "image_size": image_size, "shard_size": shard_size,
        "concepts_source": concepts_path or "builtin", "n_concepts": drawn.num_rows, "kinds": kinds,
        "shards": [name for name, _ in tables],
    })
    return CorpusSummary(out, len(pairs), drawn.num_rows, len(tables), kinds)
