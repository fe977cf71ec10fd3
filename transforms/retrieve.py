"""Retrieval stage: concept embeddings x caption-image pairs -> ``stimuli/*.parquet`` (docs/methods.md §1.2).

Inputs: an embeddings folder in clip-retrieval's layout (docs/design.md) and one CLIP text
embedding per concept. For every concept c and pair x:

* ``s_img = s(c, image of x)`` and ``s_txt = s(c, caption of x)``, each in (0, 1]:
  ``similarity="calibrated"`` (default) is ``Phi(z)``, the standard normal CDF of
  ``z = (cos - mu_c) / sigma_c``, where ``mu_c``, ``sigma_c`` are the median and scaled
  median absolute deviation of concept c's cosines with the seeded pool of random pairs in that modality
  (a pair unrelated to c in one half gets s ~ 0.5 there, so image AND caption must match;
  docs/concepts.md says why); ``similarity="cosine01"`` maps a cosine to ``(1 + cos) / 2``;
  ``similarity="softmax"`` is a softmax over all concepts,
  ``exp(cos(c, x) / T) / sum_c' exp(cos(c', x) / T)`` (``temperature`` T). All are
  clipped below at ``MIN_SIMILARITY`` so the logarithm stays finite.
* ``score = dist(c, x) = sqrt(-(ln s_img + ln s_txt))``: DACO's distance, **lower is
  better**, 0 when both halves match perfectly. A pair is close only when image AND
  caption match.

Candidates: the top-``candidates`` pairs by image similarity and the top-``candidates``
by caption similarity (one faiss inner-product index per modality), united; both
similarities are then recomputed exactly for every candidate and the union is ranked by
``(score, key)``. (With ``softmax`` the candidates are still found by cosine, an
approximation: the softmax also divides by each pair's normaliser over all concepts,
which costs n_concepts x d per candidate, so softmax is much slower than cosine01.)

Memory per worker process: both modalities' embeddings as float16 plus each index's
float32 copy, about 12 x n_pairs x d bytes (1M ViT-L pairs: ~9 GB). Corpora far beyond
that need a compressed or sharded index (IVF-PQ, on-disk lists), not implemented here.

Index: exact (``IndexFlatIP``) up to ``exact_max`` pairs; above it ``ann``: IVF-Flat
(``nlist``/``nprobe``; k-means trained on a seeded sample, deterministic) or HNSW
(``hnsw_m``/``ef_search``; its parallel build is not bit-reproducible, so prefer IVF when
byte-identical reruns matter). On a GPU (``use_gpu``) flat and IVF indexes move to faiss-gpu.

Evidence: a candidate is evidence for c when both its halves stand out from c's random
pairs, ``z_img >= min_evidence`` and ``z_txt >= min_evidence`` (the z of the calibration
above, computed whatever ``similarity`` is; ``min_evidence`` null: every candidate counts).
Only evidence can be a positive. A concept with fewer than ``min_positives`` evidence pairs
is absent from the corpus: dead-lettered (reason ``absent``), no rows.

Positives: walking the ranked evidence pairs, a pair is skipped when its (shard, key) (keys
alone repeat across img2dataset runs) or its image
hash (``sha256`` in the metadata, when present) was already taken for this concept (the
best-scoring occurrence wins, counted ``dedup_key`` / ``dedup_image``), and when its
score exceeds ``max_score`` (if set). The first ``k`` are the positives, ``rank`` 0..k-1.
A concept left with fewer than ``min_positives`` is dead-lettered (reason
``min_positives``) and writes no rows.

Replacement: given ``ranks`` and a ``target`` (the ``rank`` and ``reserve`` columns of
concepts.parquet: :func:`concept_pool`), the first ``target`` concepts in rank order that
were not dropped are kept, so reserve concepts take the places of absent ones; the
present concepts beyond them are counted ``concepts_reserve_unused`` and write no rows.
``OUT/retrieve_evidence.parquet`` has one row per concept: its status (kept, absent,
min_positives, bad_embedding, reserve_unused), rank, evidence count and best z per half.

Negatives (deterministic): one seeded pool of ``negative_pool`` pairs shared by every
concept (depends on ``seed`` only). For concept c the eligible pairs are the pool pairs
whose score is at least the ``1 - negative_quantile`` quantile of the pool's scores for c
(the farthest ``negative_quantile`` of the pool), minus every pair sharing a (shard, key) or
an image hash with one of c's positives. They are visited in a permutation seeded by
``(seed, concept_id)``, deduplicated by (shard, key) and image hash, and the first
``n_negatives`` are taken; their ``rank`` orders them by ``(score, key)``.

Exact similarities are computed in float64 from the stored (float16) embeddings, over
sorted index sets, so rows do not depend on how concepts were batched (float32 BLAS
rounding could). Output: one parquet file per concept batch,
``stimuli/stimuli-NNNNN-of-NNNNN.parquet``, rows sorted by ``(concept_id, role, rank)``
(positives first), ``provenance`` (CLIP model, ``untrained``) in the schema metadata
under ``daco``; stale parts of an earlier run are removed. Concepts that cannot be
retrieved go to ``deadletter/retrieve.jsonl``: ``min_positives`` (above) and
``bad_embedding`` (a zero or non-finite concept embedding).

Beam: :class:`RetrieveStimuli` turns concept batches into elements (Create + Reshuffle);
one DoFn per batch reads the embeddings folder and builds both indexes once per worker
process (``apache_beam.utils.shared.Shared``, on the first element, i.e. after the
``after`` side input exists). :class:`EmbedConcepts` writes the concept embeddings
(``OUT/concept_embeddings.npy``) in the same graph. Counters (namespace ``retrieve``):
``concepts_read = concepts_kept + concepts_reserve_unused + deadletter_absent +
deadletter_min_positives + deadletter_bad_embedding`` and ``stimuli_written = positives +
negatives``; also ``concepts_replacements`` (reserve concepts kept), ``dedup_key``,
``dedup_image``, ``concepts_negatives_short`` (present concepts with fewer eligible
negatives than ``n_negatives``), ``concepts_embedded``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
from scipy.special import log_ndtr
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from transforms import fileio
from steering.config import Config
from transforms.counters import Reconciliation
from transforms.deadletter import DEAD, WriteDeadLetters, dead_letter
from transforms.embeddings_layout import read_embeddings
from transforms.progress import ProgressLog

NAMESPACE = "retrieve"
MIN_SIMILARITY = 1e-6  # s is clipped to [MIN_SIMILARITY, 1]: ln stays finite
SIMILARITIES = ("calibrated", "cosine01", "softmax")
ANN_KINDS = ("ivf", "hnsw")

SCHEMA = pa.schema([
    ("concept_id", pa.string()),
    ("key", pa.string()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("shard", pa.string()),
    ("s_img", pa.float32()),
    ("s_txt", pa.float32()),
    ("score", pa.float32()),
    ("role", pa.string()),
    ("rank", pa.int32()),
])


@dataclass
class RetrieveConfig(Config):
    """Options of the retrieval stage (the ``retrieve:`` section of a config file).

    Attributes:
        k: positives per concept (the paper: ~27, 400K stimuli for 15K concepts).
        n_negatives: negatives per concept.
        candidates: candidates per modality (top-M by image and top-M by caption similarity).
        min_positives: concepts with fewer positives are dropped and dead-lettered.
        max_score: a pair scoring above this distance is never a positive (None: no limit).
        similarity: "calibrated" (s = Phi(z) against the concept's random pairs), "cosine01"
            (s = (1 + cos) / 2) or "softmax" (over all concepts).
        min_evidence: a pair is evidence when both halves have z >= this (None: no evidence test).
        temperature: softmax temperature T (softmax only; CLIP's logit scale 100 is T=0.01).
        negative_pool: size of the seeded pool of pairs negatives are drawn from.
        negative_quantile: negatives come from the farthest fraction of the pool.
        exact_max: exact inner-product index up to this many pairs; above it ``ann``.
        ann: approximate index, "ivf" (IVF-Flat) or "hnsw".
        nlist: IVF lists (None: 2 * sqrt(n), at least 1).
        nprobe: IVF lists visited per query.
        ivf_train_per_list: k-means training points per IVF list (a seeded sample).
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width.
        concepts_per_batch: concepts searched together (one Beam element, one output file).
        seed: seeds the negative pool, the per-concept negative draws and IVF training.
        use_gpu: "auto" (faiss-gpu when installed and a GPU is present), "yes" or "no".
    """

    k: int = 27
    n_negatives: int = 27
    candidates: int = 200
    min_positives: int = 5
    max_score: float | None = None
    similarity: str = "calibrated"
    min_evidence: float | None = 3.0
    temperature: float = 0.01
    negative_pool: int = 8192
    negative_quantile: float = 0.5
    exact_max: int = 250_000
    ann: str = "ivf"
    nlist: int | None = None
    nprobe: int = 32
    ivf_train_per_list: int = 40
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    concepts_per_batch: int = 256
    seed: int = 0
    use_gpu: str = "auto"

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` and the option when a value is invalid."""
        positive = ("k", "candidates", "min_positives", "exact_max", "nprobe", "ivf_train_per_list",
                    "hnsw_m", "ef_construction", "ef_search", "concepts_per_batch", "negative_pool")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_negatives < 0:
            raise ValueError(f"{where}.n_negatives must be >= 0, got {self.n_negatives}")
        if self.min_positives > self.k:
            raise ValueError(f"{where}.min_positives ({self.min_positives}) cannot exceed k ({self.k})")
        if self.candidates < self.k:
            raise ValueError(f"{where}.candidates ({self.candidates}) must be >= k ({self.k})")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"{where}.similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.ann not in ANN_KINDS:
            raise ValueError(f"{where}.ann must be one of {ANN_KINDS}, got {self.ann!r}")
        if self.use_gpu not in ("auto", "yes", "no"):
            raise ValueError(f"{where}.use_gpu must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")
        if not 0 < self.negative_quantile <= 1:
            raise ValueError(f"{where}.negative_quantile must be in (0, 1], got {self.negative_quantile}")
        if self.temperature <= 0:
            raise ValueError(f"{where}.temperature must be > 0, got {self.temperature}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"{where}.nlist must be >= 1 or null, got {self.nlist}")


# ---------------------------------------------------------------- faiss indexes


def gpu_available(cfg: RetrieveConfig) -> bool:
    """Whether indexes go to faiss-gpu: ``use_gpu`` "yes", or "auto" with faiss-gpu and a GPU."""
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if cfg.use_gpu == "yes" and not has_gpu:
        raise RuntimeError("retrieve.use_gpu=yes but faiss has no GPU support or sees no GPU; "
                           "install faiss-gpu (pip install 'daco400k[gpu]') or set use_gpu: auto")
    return cfg.use_gpu != "no" and has_gpu


def index_kind(n: int, cfg: RetrieveConfig) -> str:
    """"flat" (exact) for up to ``exact_max`` vectors, else ``cfg.ann``."""
    return "flat" if n <= cfg.exact_max else cfg.ann


def ivf_nlist(n: int, cfg: RetrieveConfig) -> int:
    """IVF list count: ``cfg.nlist`` or 2 * sqrt(n), never more than n."""
    return max(1, min(n, cfg.nlist or int(round(2 * np.sqrt(n)))))


def build_index(vectors: np.ndarray, cfg: RetrieveConfig, kind: str | None = None) -> faiss.Index:
    """An inner-product faiss index over ``vectors`` ([n, d], any float dtype) of ``kind``
    (default :func:`index_kind`), on the GPU when :func:`gpu_available`."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    kind = kind or index_kind(n, cfg)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_nlist(n, cfg)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.seed
        n_train = min(n, nlist * cfg.ivf_train_per_list)
        index.cp.max_points_per_centroid = cfg.ivf_train_per_list
        sample = np.sort(np.random.default_rng([cfg.seed, 1]).choice(n, n_train, replace=False))
        index.train(x[sample])
        index.nprobe = min(cfg.nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat, ivf, hnsw)")
    if kind != "hnsw" and gpu_available(cfg):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    return index


def search(index: faiss.Index, queries: np.ndarray, m: int) -> np.ndarray:
    """Ids [n_queries, <=m] of the top-``m`` inner products per query (-1 where fewer exist)."""
    m = min(m, index.ntotal)
    _sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), m)
    return ids


# ---------------------------------------------------------------- concept embeddings


def load_concept_embeddings(source: np.ndarray | str) -> np.ndarray:
    """Concept embeddings [n, d] float32 from an array or a ``.npy`` path (no pickles)."""
    array = fileio.read_npy(source) if isinstance(source, str) else np.asarray(source)
    if array.ndim != 2:
        raise ValueError(f"concept embeddings must be [n_concepts, d], got shape {array.shape}")
    return np.asarray(array, dtype=np.float32)


def write_concept_embeddings(concepts_path: str, out_path: str, clip_cfg) -> str:
    """Embed every concept of a ``concepts.parquet`` (file order) with CLIP prompt ensembles
    (:func:`transforms.concept_prompts.embed_concepts`) and write them to ``out_path`` as .npy; returns the path."""
    from transforms.clip_model import load_clip
    from transforms.concept_prompts import embed_concepts

    vectors = embed_concepts(fileio.read_parquet(concepts_path), load_clip(clip_cfg))
    fileio.write_npy_atomic(out_path, vectors.astype(np.float32))
    Metrics.counter(NAMESPACE, "concepts_embedded").inc(len(vectors))
    return out_path


class EmbedConcepts(beam.PTransform):
    """Pipeline start -> one element, the path of the concept embeddings written by
    :func:`write_concept_embeddings` (use it in ``RetrieveStimuli(after=...)``)."""

    def __init__(self, concepts_path: str, out_path: str, clip_cfg):
        super().__init__()
        self.concepts_path, self.out_path, self.clip_cfg = concepts_path, out_path, clip_cfg

    def expand(self, pbegin):
        return (pbegin
                | "ConceptsFile" >> beam.Create([self.concepts_path])
                | "Embed" >> beam.Map(write_concept_embeddings, self.out_path, self.clip_cfg))


# ---------------------------------------------------------------- scoring


def calibration(pool_cos: np.ndarray) -> tuple[float, float]:
    """(centre, scale) of one concept's cosines with the random pool, in one modality: the median
    and 1.4826 x the median absolute deviation (the standard deviation for normal data, but robust:
    the concept's own matches in the pool, many in a small corpus, do not widen it)."""
    centre = float(np.median(pool_cos))
    return centre, max(1.4826 * float(np.median(np.abs(pool_cos - centre))), 1e-12)


def calibration_z(cos: np.ndarray, calib: tuple[float, float]) -> np.ndarray:
    """z = (cos - centre) / scale against the concept's random pairs (:func:`calibration`)."""
    return (np.asarray(cos, dtype=np.float64) - calib[0]) / calib[1]


def log_similarity(cos: np.ndarray, cfg: RetrieveConfig, log_normaliser: np.ndarray | None = None,
                   calibration: tuple[float, float] | None = None) -> np.ndarray:
    """ln s for cosines ``cos`` (float64). calibrated: ln Phi(z) (``calibration``: the concept's
    pool centre and scale, :func:`calibration`); cosine01: ln clip((1 + cos) / 2); softmax: cos / T - ``log_normaliser``
    (logsumexp over all concepts of cos / T, per pair)."""
    cos = np.asarray(cos, dtype=np.float64)
    if cfg.similarity == "calibrated":
        return np.clip(log_ndtr(calibration_z(cos, calibration)), np.log(MIN_SIMILARITY), 0.0)
    if cfg.similarity == "softmax":
        return np.clip(cos / cfg.temperature - log_normaliser, np.log(MIN_SIMILARITY), 0.0)
    return np.log(np.clip((1.0 + cos) / 2.0, MIN_SIMILARITY, 1.0))


def daco_distance(log_s_img: np.ndarray, log_s_txt: np.ndarray) -> np.ndarray:
    """DACO's ``dist = sqrt(-(ln s_img + ln s_txt))`` (lower is closer)."""
    return np.sqrt(-(log_s_img + log_s_txt))


def _logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]


def concept_rng(seed: int, concept_id: str) -> np.random.Generator:
    """The generator of one concept's negative draw: depends on (seed, concept_id) only."""
    digest = int.from_bytes(hashlib.blake2b(concept_id.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([seed, digest])


class PairIndex:
    """Every caption-image pair of an embeddings folder, ready for retrieval: float16
    embeddings for exact rescoring, metadata columns, one faiss index per modality, the
    negative pool, and (softmax) the concept matrix for normalisers."""

    def __init__(self, img: np.ndarray, txt: np.ndarray, metadata: pa.Table, concepts: np.ndarray,
                 cfg: RetrieveConfig):
        if concepts.shape[1] != img.shape[1]:
            raise ValueError(f"concept embeddings have dimension {concepts.shape[1]} but the pair embeddings "
                             f"{img.shape[1]}: compute both with the same CLIP model")
        self.cfg = cfg
        self.img = np.ascontiguousarray(img, dtype=np.float16)
        self.txt = np.ascontiguousarray(txt, dtype=np.float16)
        self.n = len(self.img)
        columns = {name: metadata.column(name).to_pylist() for name in metadata.column_names}
        self.keys = [str(k) for k in columns["key"]]
        self.captions, self.urls, self.shards = columns["caption"], columns["url"], columns["shard"]
        self.ids = [f"{shard}/{key}" for shard, key in zip(self.shards, self.keys)]  # keys repeat across img2dataset runs
        self.hashes = columns.get("sha256") or [None] * self.n
        self.concepts = concepts
        self.img_index = build_index(self.img, cfg)
        self.txt_index = build_index(self.txt, cfg)
        pool_size = min(cfg.negative_pool, self.n)
        self.pool = np.sort(np.random.default_rng([cfg.seed, 2]).choice(self.n, pool_size, replace=False))
        self.pool_keys = [self.keys[i] for i in self.pool]
        self.pool_ids = [self.ids[i] for i in self.pool]
        self.pool_hashes = [self.hashes[i] for i in self.pool]
        self.pool_img = self.img[self.pool].astype(np.float64)
        self.pool_txt = self.txt[self.pool].astype(np.float64)
        self.pool_norm_img = self.normaliser(self.pool_img)
        self.pool_norm_txt = self.normaliser(self.pool_txt)

    @classmethod
    def load(cls, emb_dir: str, concepts: np.ndarray, cfg: RetrieveConfig) -> "PairIndex":
        """Read an embeddings folder and build the indexes."""
        img, txt, metadata = read_embeddings(emb_dir)
        return cls(img, txt, metadata, concepts, cfg)

    def normaliser(self, pairs: np.ndarray) -> np.ndarray | None:
        """Per-pair logsumexp over all concepts of cos / T (softmax only; else None)."""
        if self.cfg.similarity != "softmax":
            return None
        return _logsumexp_rows((pairs @ self.concepts.T.astype(np.float64)) / self.cfg.temperature)

    def score(self, cos_img: np.ndarray, cos_txt: np.ndarray, norm_img=None, norm_txt=None, calib_img=None,
              calib_txt=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ln s_img, ln s_txt, dist) from one concept's cosines with pairs (``norm_*``: the
        pairs' softmax normalisers; ``calib_*``: the concept's pool calibration)."""
        log_img = log_similarity(cos_img, self.cfg, norm_img, calib_img)
        log_txt = log_similarity(cos_txt, self.cfg, norm_txt, calib_txt)
        return log_img, log_txt, daco_distance(log_img, log_txt)

    def row(self, concept_id: str, i: int, log_img: float, log_txt: float, dist: float, role: str, rank: int) -> dict:
        """One stimuli row (docs/design.md columns)."""
        return {"concept_id": concept_id, "key": self.keys[i], "caption": self.captions[i], "url": self.urls[i],
                "shard": self.shards[i], "s_img": float(np.exp(log_img)), "s_txt": float(np.exp(log_txt)),
                "score": float(dist), "role": role, "rank": rank}


@dataclass
class ConceptResult:
    """What retrieval made of one concept: its rows, or why it was dropped, and counts."""

    concept_id: str
    rows: list[dict]
    dropped: str | None = None
    detail: str = ""
    dedup_key: int = 0
    dedup_image: int = 0
    negatives_short: bool = False
    n_evidence: int = 0
    best_z_img: float = float("nan")
    best_z_txt: float = float("nan")


def _take_unique(order, keys, hashes, limit, taken_keys, taken_hashes, accept=lambda j: True):
    """Walk ``order``; keep items whose key and image hash are new (and ``accept``); stop at ``limit``.
    Returns (kept items, skipped for key, skipped for hash)."""
    kept, by_key, by_hash = [], 0, 0
    for j in order:
        if len(kept) >= limit or not accept(j):
            break
        if keys[j] in taken_keys:
            by_key += 1
            continue
        if hashes[j] is not None and hashes[j] in taken_hashes:
            by_hash += 1
            continue
        taken_keys.add(keys[j])
        if hashes[j] is not None:
            taken_hashes.add(hashes[j])
        kept.append(j)
    return kept, by_key, by_hash


def rank_concept(pairs: PairIndex, concept_id: str, query: np.ndarray, candidate_ids: np.ndarray,
                 pool_cos_img: np.ndarray, pool_cos_txt: np.ndarray) -> ConceptResult:
    """Positives and negatives of one concept (``query``, float64) from its candidate pair ids
    (both modalities, any order) and its cosines with the negative pool."""
    cfg = pairs.cfg
    cands = np.unique(candidate_ids[candidate_ids >= 0])
    calib_img, calib_txt = calibration(pool_cos_img), calibration(pool_cos_txt)
    c_img, c_txt = pairs.img[cands].astype(np.float64), pairs.txt[cands].astype(np.float64)
    cos_img, cos_txt = c_img @ query, c_txt @ query
    log_img, log_txt, dist = pairs.score(cos_img, cos_txt, pairs.normaliser(c_img), pairs.normaliser(c_txt),
                                         calib_img, calib_txt)
    z_img, z_txt = calibration_z(cos_img, calib_img), calibration_z(cos_txt, calib_txt)
    evident = (np.minimum(z_img, z_txt) >= cfg.min_evidence if cfg.min_evidence is not None
               else np.ones(len(cands), dtype=bool))
    facts = {"n_evidence": int(evident.sum()), "best_z_img": float(z_img.max(initial=-np.inf)),
             "best_z_txt": float(z_txt.max(initial=-np.inf))}
    keys = [pairs.keys[i] for i in cands]
    ids = [pairs.ids[i] for i in cands]
    hashes = [pairs.hashes[i] for i in cands]
    order = sorted(np.flatnonzero(evident), key=lambda j: (dist[j], keys[j]))
    pos_ids, pos_hashes = set(), set()
    within = (lambda j: dist[j] <= cfg.max_score) if cfg.max_score is not None else (lambda j: True)
    positives, dedup_key, dedup_image = _take_unique(order, ids, hashes, cfg.k, pos_ids, pos_hashes, within)
    if len(positives) < cfg.min_positives:
        if facts["n_evidence"] < cfg.min_positives:
            return ConceptResult(concept_id, [], "absent",
                                 f"{facts['n_evidence']} pair(s) among {len(cands)} candidates match in image AND "
                                 f"caption (z >= {cfg.min_evidence} against the concept's random pairs; best z "
                                 f"image {facts['best_z_img']:.2f}, caption {facts['best_z_txt']:.2f}); "
                                 f"min_positives is {cfg.min_positives}", dedup_key, dedup_image, **facts)
        limit = f" with score <= {cfg.max_score}" if cfg.max_score is not None else ""
        return ConceptResult(concept_id, [], "min_positives",
                             f"{len(positives)} positive pair(s){limit} after dedup among {len(cands)} candidates; "
                             f"min_positives is {cfg.min_positives}", dedup_key, dedup_image, **facts)
    rows = [pairs.row(concept_id, int(cands[j]), log_img[j], log_txt[j], dist[j], "positive", r)
            for r, j in enumerate(positives)]

    p_log_img, p_log_txt, p_dist = pairs.score(pool_cos_img, pool_cos_txt, pairs.pool_norm_img, pairs.pool_norm_txt,
                                               calib_img, calib_txt)
    eligible = np.flatnonzero(p_dist >= np.quantile(p_dist, 1.0 - cfg.negative_quantile))
    drawn = eligible[concept_rng(cfg.seed, concept_id).permutation(len(eligible))]
    # starting from the positives' (shard, key)s and hashes excludes them, and any duplicate of them
    negatives, _, _ = _take_unique(drawn, pairs.pool_ids, pairs.pool_hashes, cfg.n_negatives, pos_ids, pos_hashes)
    negatives.sort(key=lambda j: (p_dist[j], pairs.pool_keys[j]))
    rows += [pairs.row(concept_id, int(pairs.pool[j]), p_log_img[j], p_log_txt[j], p_dist[j], "negative", r)
             for r, j in enumerate(negatives)]
    return ConceptResult(concept_id, rows, None, "", dedup_key, dedup_image, len(negatives) < cfg.n_negatives,
                         **facts)


def retrieve_batch(pairs: PairIndex, concept_ids: list[str], queries: np.ndarray) -> list[ConceptResult]:
    """Search both indexes for a batch of (L2-normalised) concept queries and rank each concept.

    Exact similarities are computed in float64 from the stored embeddings, so they do not
    depend on how concepts were batched (float32 BLAS rounding could)."""
    img_ids = search(pairs.img_index, queries, pairs.cfg.candidates)
    txt_ids = search(pairs.txt_index, queries, pairs.cfg.candidates)
    q64 = np.asarray(queries, dtype=np.float64)
    pool_img, pool_txt = pairs.pool_img @ q64.T, pairs.pool_txt @ q64.T
    return [rank_concept(pairs, cid, q64[b], np.concatenate([img_ids[b], txt_ids[b]]), pool_img[:, b], pool_txt[:, b])
            for b, cid in enumerate(concept_ids)]


def to_table(rows: list[dict], provenance: dict | None = None) -> pa.Table:
    """Stimuli rows in the docs/design.md schema, sorted by (concept_id, role: positives first, rank);
    ``provenance`` (e.g. the CLIP model and its ``untrained`` flag) goes into the file's
    schema metadata under ``daco``."""
    rows = sorted(rows, key=lambda r: (r["concept_id"], r["role"] != "positive", r["rank"]))
    schema = SCHEMA.with_metadata({"daco": json.dumps(provenance, sort_keys=True)}) if provenance else SCHEMA
    return pa.Table.from_pylist(rows, schema=schema)


# ---------------------------------------------------------------- Beam


class _Worker:
    """What a worker process builds once and shares between DoFn instances (weak-referenceable)."""

    def __init__(self, emb_dir: str, concepts_source, cfg: RetrieveConfig):
        concepts = load_concept_embeddings(concepts_source)
        norms = np.linalg.norm(concepts, axis=1, keepdims=True)
        self.valid = np.isfinite(concepts).all(axis=1) & (norms[:, 0] > 0)
        self.concepts = np.where(self.valid[:, None], concepts / np.where(norms > 0, norms, 1), 0).astype(np.float32)
        self.pairs = PairIndex.load(emb_dir, self.concepts[self.valid], cfg)


STATUS = "status"  # tag of the per-concept status records of _RetrieveBatches


class _RetrieveBatches(beam.DoFn):
    """(batch number, concept positions) -> (batch number, stimuli rows of present concepts);
    dead letters tagged ``DEAD``, one status record per concept tagged ``STATUS``."""

    def __init__(self, emb_dir: str, concepts_source, concept_ids: list[str], cfg: RetrieveConfig):
        self.emb_dir, self.concepts_source, self.concept_ids, self.cfg = emb_dir, concepts_source, concept_ids, cfg
        self._shared = shared.Shared()
        self._tag = json.dumps([emb_dir, repr(concepts_source) if isinstance(concepts_source, str)
                                else hashlib.blake2b(np.ascontiguousarray(concepts_source).tobytes()).hexdigest(),
                                dataclasses.asdict(cfg)], sort_keys=True)
        counter = lambda name: Metrics.counter(NAMESPACE, name)  # noqa: E731
        self.read = counter("concepts_read")
        self.dedup_key, self.dedup_image = counter("dedup_key"), counter("dedup_image")
        self.negatives_short = counter("concepts_negatives_short")

    def setup(self):
        self.progress = ProgressLog(NAMESPACE, "concepts", total=len(self.concept_ids))

    def process(self, batch, after=None):
        del after  # ordering only: the side input makes this run after the embedding stage
        number, positions = batch
        worker = self._shared.acquire(lambda: _Worker(self.emb_dir, self.concepts_source, self.cfg), tag=self._tag)
        if len(worker.concepts) != len(self.concept_ids):
            raise ValueError(f"{self.concepts_source!r}: {len(worker.concepts)} concept embeddings for "
                             f"{len(self.concept_ids)} concept ids; embed the same concepts file")
        good = [p for p in positions if worker.valid[p]]
        for p in positions:
            self.read.inc()
            if not worker.valid[p]:
                yield dead_letter(NAMESPACE, "concept embeddings", self.concept_ids[p], "bad_embedding",
                                  "the concept embedding is zero or not finite")
                yield beam.pvalue.TaggedOutput(STATUS, {"concept_id": self.concept_ids[p], "status": "bad_embedding"})
        rows = []
        for result in retrieve_batch(worker.pairs, [self.concept_ids[p] for p in good], worker.concepts[good]):
            self.dedup_key.inc(result.dedup_key)
            self.dedup_image.inc(result.dedup_image)
            yield beam.pvalue.TaggedOutput(STATUS, {
                "concept_id": result.concept_id, "status": result.dropped or "present", "n_evidence": result.n_evidence,
                "best_z_img": result.best_z_img, "best_z_txt": result.best_z_txt,
                "n_positives": sum(r["role"] == "positive" for r in result.rows)})
            if result.dropped:
                yield dead_letter(NAMESPACE, self.emb_dir, result.concept_id, result.dropped, result.detail)
                continue
            self.negatives_short.inc(int(result.negatives_short))
            rows += result.rows
        self.progress.update(len(positions))
        yield number, rows


EVIDENCE_SCHEMA = pa.schema([
    ("concept_id", pa.string()), ("rank", pa.int32()), ("reserve", pa.bool_()), ("status", pa.string()),
    ("n_evidence", pa.int32()), ("best_z_img", pa.float32()), ("best_z_txt", pa.float32()),
    ("n_positives", pa.int32()),
])


def select_concepts(statuses: list[dict], ranks: dict[str, int], target: int | None) -> tuple[set[str], list[dict]]:
    """Replacement: the first ``target`` present concepts in rank order (all when None) and the
    evidence table rows (status ``kept`` or ``reserve_unused`` for present concepts)."""
    order = sorted(statuses, key=lambda r: (ranks[r["concept_id"]], r["concept_id"]))
    present = [r["concept_id"] for r in order if r["status"] == "present"]
    selected = set(present if target is None else present[:target])
    by_rank = sorted(ranks, key=lambda c: (ranks[c], c))
    reserve = set(by_rank[target:]) if target is not None else set()
    table = []
    for r in order:
        status = r["status"] if r["status"] != "present" else ("kept" if r["concept_id"] in selected
                                                                else "reserve_unused")
        table.append({"n_evidence": 0, "best_z_img": None, "best_z_txt": None, "n_positives": 0, **r,
                      "status": status, "rank": ranks[r["concept_id"]], "reserve": r["concept_id"] in reserve})
    return selected, table


def _select(statuses, ranks: dict[str, int], target: int | None, path: str):
    selected, table = select_concepts(statuses, ranks, target)
    fileio.write_parquet_atomic(path, pa.Table.from_pylist(
        [{name: row.get(name) for name in EVIDENCE_SCHEMA.names} for row in table], schema=EVIDENCE_SCHEMA))
    counts = {"kept": 0, "reserve_unused": 0}
    for row in table:
        if row["status"] in counts:
            counts[row["status"]] += 1
    Metrics.counter(NAMESPACE, "concepts_kept").inc(counts["kept"])
    Metrics.counter(NAMESPACE, "concepts_reserve_unused").inc(counts["reserve_unused"])
    Metrics.counter(NAMESPACE, "concepts_replacements").inc(
        sum(row["status"] == "kept" and row["reserve"] for row in table))
    yield sorted(selected)


def part_name(number: int, total: int) -> str:
    """File name of stimuli part ``number`` of ``total``."""
    return f"stimuli-{number:05d}-of-{total:05d}.parquet"


class _WritePart(beam.DoFn):
    """(batch number, rows) -> one stimuli part holding the rows of the selected concepts."""

    def __init__(self, stimuli_dir: str, total: int, provenance: dict | None):
        self.stimuli_dir, self.total, self.provenance = stimuli_dir, total, provenance
        self.written = Metrics.counter(NAMESPACE, "stimuli_written")
        self.positives, self.negatives = Metrics.counter(NAMESPACE, "positives"), Metrics.counter(NAMESPACE, "negatives")

    def process(self, element, selected):
        number, rows = element
        keep = set(selected)
        rows = [r for r in rows if r["concept_id"] in keep]
        n_pos = sum(r["role"] == "positive" for r in rows)
        self.positives.inc(n_pos)
        self.negatives.inc(len(rows) - n_pos)
        path = fileio.join(self.stimuli_dir, part_name(number, self.total))
        fileio.write_parquet_atomic(path, to_table(rows, self.provenance))
        self.written.inc(len(rows))
        yield path


def _remove_stale_parts(paths: list[str], stimuli_dir: str):
    """This run's paths, sorted, once files an earlier run left in ``stimuli_dir`` are deleted."""
    yield from fileio.remove_stale(paths, fileio.join(stimuli_dir, "stimuli-*.parquet"))


class RetrieveStimuli(beam.PTransform):
    """Concepts x embeddings folder -> ``OUT/stimuli/*.parquet`` and ``OUT/deadletter/retrieve.jsonl``.

    Apply to a pipeline; returns the PCollection of written stimuli paths. ``concept_embeddings``
    is an array [n_concepts, d] (pickled into the graph: prefer a path at scale) or a ``.npy``
    path; row i belongs to ``concept_ids[i]``. ``after``: an optional PCollection (e.g. the
    embedding stage's written paths) taken as a side input, so the index is built only once
    the embeddings folder and the concept embeddings have been written in the same graph.
    ``provenance``: JSON-able facts stored in every part's schema metadata (key ``daco``),
    e.g. ``{"clip": ..., "untrained": true}``. ``ranks`` (aligned with ``concept_ids``; default
    their order) and ``target`` (default: keep every present concept) drive the replacement
    of absent concepts (module docstring; :func:`concept_pool` reads both from concepts.parquet).
    """

    def __init__(self, out_dir: str, emb_dir: str, concept_embeddings: np.ndarray | str, concept_ids: list[str],
                 cfg: RetrieveConfig, after: beam.PCollection | None = None, provenance: dict | None = None,
                 ranks: list[int] | None = None, target: int | None = None):
        super().__init__()
        if len(set(concept_ids)) != len(concept_ids):
            raise ValueError("RetrieveStimuli: concept_ids has duplicates")
        if ranks is not None and len(ranks) != len(concept_ids):
            raise ValueError(f"RetrieveStimuli: {len(ranks)} ranks for {len(concept_ids)} concept ids")
        self.ranks = dict(zip(concept_ids, ranks if ranks is not None else range(len(concept_ids))))
        self.target = target
        if not isinstance(concept_embeddings, str):
            concept_embeddings = load_concept_embeddings(concept_embeddings)
            if len(concept_embeddings) != len(concept_ids):
                raise ValueError(f"RetrieveStimuli: {len(concept_embeddings)} concept embeddings for "
                                 f"{len(concept_ids)} concept ids")
        self.out_dir, self.emb_dir, self.concepts_source = out_dir, emb_dir, concept_embeddings
        self.concept_ids, self.cfg, self.after, self.provenance = list(concept_ids), cfg, after, provenance

    def expand(self, pbegin):
        cfg = self.cfg
        order = sorted(range(len(self.concept_ids)), key=lambda i: self.concept_ids[i])
        batches = [order[i:i + cfg.concepts_per_batch] for i in range(0, len(order), cfg.concepts_per_batch)]
        side = {"after": beam.pvalue.AsList(self.after)} if self.after is not None else {}
        results = (
            pbegin
            | "ConceptBatches" >> beam.Create(list(enumerate(batches)))
            | "Spread" >> beam.Reshuffle()
            | "Retrieve" >> beam.ParDo(_RetrieveBatches(self.emb_dir, self.concepts_source, self.concept_ids, cfg),
                                       **side).with_outputs(DEAD, STATUS, main="rows")
        )
        results[DEAD] | "DeadLetters" >> WriteDeadLetters(self.out_dir, NAMESPACE)
        selected = (results[STATUS]
                    | "GatherStatus" >> beam.combiners.ToList()
                    | "SelectConcepts" >> beam.FlatMap(_select, self.ranks, self.target,
                                                       fileio.join(self.out_dir, "retrieve_evidence.parquet")))
        stimuli_dir = fileio.join(self.out_dir, "stimuli")
        return (
            results["rows"]
            | "WriteParts" >> beam.ParDo(_WritePart(stimuli_dir, len(batches), self.provenance),
                                         beam.pvalue.AsSingleton(selected))
            | "Gather" >> beam.combiners.ToList()
            | "RemoveStale" >> beam.FlatMap(_remove_stale_parts, stimuli_dir)
        )


RECONCILIATION = Reconciliation(NAMESPACE, "concepts_read",
                                ("concepts_kept", "concepts_reserve_unused", "deadletter_absent",
                                 "deadletter_min_positives", "deadletter_bad_embedding"))


def concept_pool(table: pa.Table) -> tuple[list[str], list[int] | None, int | None]:
    """(concept ids, ranks, target) of a concepts.parquet for :class:`RetrieveStimuli`: with its
    ``rank`` and ``reserve`` columns the target is the number of non-reserve rows; a table
    without them keeps every present concept (ranks None, target None)."""
    ids = table.column("concept_id").to_pylist()
    if not {"rank", "reserve"} <= set(table.column_names):
        return ids, None, None
    reserve = table.column("reserve").to_pylist()
    return ids, table.column("rank").to_pylist(), sum(not r for r in reserve)
STIMULI_RECONCILIATION = Reconciliation(NAMESPACE, "stimuli_written", ("positives", "negatives"))
