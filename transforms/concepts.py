"""Concept stage: WordNet synsets -> ``concepts.parquet`` (METHODS.md §1.1, §1.5).

Steps, each counted:

1. list every synset of WordNet 3.0 (``read``);
2. filter: part of speech (``dropped_pos``), inside an included root subtree and
   outside every excluded one (``dropped_root``), not an instance/proper noun
   (``dropped_instance``), depth range (``dropped_depth``), tag-count frequency
   (``dropped_min_frequency``);
3. one concept per surface lemma: every lemma goes to its most frequent sense
   (WordNet tag count, then WordNet's sense number); a synset that wins no lemma is
   dropped (``dropped_lemma_dedup``), one that wins several is labelled with its
   most frequent one;
4. rank by frequency (undesirable concepts first when ``prioritise_undesirable``;
   see :func:`rank_key` for ties) and cut at ``max_concepts`` (``dropped_cut``); ``kept`` is what is written.

The functions below are plain Python; :class:`SelectConcepts` wires them into a
Beam graph and :func:`select_concepts_direct` runs them in one process (the
benchmark's baseline and a reference for the tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms import fileio
from transforms.config import StageConfig
from transforms.counters import Reconciliation
from transforms.progress import ProgressLog
from transforms.polarity import Lexicon, load_lexicon, polarity_table
from transforms.wordnet import load_wordnet

NAMESPACE = "concepts"
FILTERS = ("pos", "root", "instance", "depth", "min_frequency", "lemma_dedup", "cut")

SCHEMA = pa.schema([
    ("concept_id", pa.string()),
    ("lemma", pa.string()),
    ("lemmas", pa.list_(pa.string())),
    ("definition", pa.string()),
    ("group", pa.string()),
    ("hypernym_path", pa.list_(pa.string())),
    ("depth", pa.int32()),
    ("frequency", pa.int64()),
    ("polarity", pa.string()),
    ("polarity_source", pa.string()),
])


@dataclass
class ConceptsConfig(StageConfig):
    """Options of the concept stage (the ``concepts:`` section of a config file).

    Attributes:
        max_concepts: how many concepts to keep (the paper: ~15,000).
        pos: WordNet parts of speech to read ("n" nouns, "v", "a", "s", "r").
        roots: synsets whose subtrees are included (picturable: physical_entity.n.01).
        include_polarity_roots: also include every subtree of the polarity lexicon,
            so that abstract undesirable concepts (crime, violence) are present.
        exclude_roots: synsets whose subtrees are dropped.
        exclude_instances: drop instance synsets (proper nouns: cities, people).
        min_frequency: minimum summed WordNet tag count of a synset's lemmas.
        min_depth: minimum hypernym depth (drops 'object', 'whole', ...).
        max_depth: maximum hypernym depth (None: no limit).
        prioritise_undesirable: rank undesirable concepts ahead of the rest, so the cut
            never removes them.
        polarity_overrides: path of a YAML file relabelling concepts or subtrees.
        wordnet_dir: a WordNet 3.0 database directory (default: see transforms/wordnet.py).
    """

    max_concepts: int = 15000
    pos: list[str] = field(default_factory=lambda: ["n"])
    roots: list[str] = field(default_factory=lambda: ["physical_entity.n.01"])
    include_polarity_roots: bool = True
    exclude_roots: list[str] = field(default_factory=list)
    exclude_instances: bool = True
    min_frequency: int = 0
    min_depth: int = 3
    max_depth: int | None = None
    prioritise_undesirable: bool = True
    polarity_overrides: str | None = None
    wordnet_dir: str | None = None

    def validate(self, where: str) -> None:
        if self.max_concepts < 1:
            raise ValueError(f"{where}.max_concepts must be >= 1, got {self.max_concepts}")
        bad_pos = sorted(set(self.pos) - {"n", "v", "a", "s", "r"})
        if bad_pos:
            raise ValueError(f"{where}.pos: {bad_pos} are not WordNet parts of speech (n, v, a, s, r)")


class ConceptSelector:
    """Per-synset filtering and labelling; built once per worker (it loads WordNet)."""

    def __init__(self, cfg: ConceptsConfig, lexicon: Lexicon | None = None):
        self.cfg = cfg
        self.wn = load_wordnet(cfg.wordnet_dir)
        lexicon = lexicon or load_lexicon(cfg.polarity_overrides)
        self.polarity = polarity_table(self.wn, lexicon)
        roots = list(cfg.roots) + (lexicon.undesirable_and_desirable_roots() if cfg.include_polarity_roots else [])
        self.included = self._closure(roots)
        self.excluded = self._closure(cfg.exclude_roots)
        self.senses = self._read_sense_index()

    def _closure(self, roots: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        for root in roots:
            try:
                stack = [self.wn.synset(root)]
            except Exception as exc:
                raise ValueError(f"concepts.roots/exclude_roots: {root!r} is not a WordNet synset ({exc})") from None
            while stack:
                s = stack.pop()
                if s.name() not in seen:
                    seen.add(s.name())
                    stack.extend(s.hyponyms() + s.instance_hyponyms())
        return seen

    def _read_sense_index(self) -> dict[str, tuple[int, int]]:
        """{sense key: (sense number, tag count)} from WordNet's index.sense."""
        senses = {}
        with self.wn.open("index.sense") as fh:
            for line in fh:
                key, _offset, number, count = line.split()
                senses[key] = (int(number), int(count))
        return senses

    def evaluate(self, name: str) -> tuple[dict | None, str | None]:
        """(candidate row, None) for a synset passing every filter, else (None, filter name)."""
        cfg = self.cfg
        synset = self.wn.synset(name)
        if synset.pos() not in cfg.pos and not (synset.pos() == "s" and "a" in cfg.pos):
            return None, "pos"
        if name not in self.included or name in self.excluded:
            return None, "root"
        if cfg.exclude_instances and synset.instance_hypernyms():
            return None, "instance"
        path = min(synset.hypernym_paths(), key=lambda p: (len(p), [s.name() for s in p]))
        depth = len(path) - 1
        if depth < cfg.min_depth or (cfg.max_depth is not None and depth > cfg.max_depth):
            return None, "depth"
        lemmas = synset.lemmas()
        senses = [self.senses.get(lemma.key(), (99, 0)) for lemma in lemmas]
        frequency = sum(count for _number, count in senses)
        if frequency < cfg.min_frequency:
            return None, "min_frequency"
        polarity, source = self.polarity.get(name, ("neutral", ""))
        return {
            "concept_id": name,
            "lemmas": [lemma.name().replace("_", " ") for lemma in lemmas],
            "definition": synset.definition(),
            "group": synset.lexname(),
            "hypernym_path": [s.name() for s in path],
            "depth": depth,
            "frequency": frequency,
            "polarity": polarity,
            "polarity_source": source,
            # (sense number, tag count) per lemma, for the one-sense-per-lemma vote.
            "_senses": senses,
        }, None


def all_synset_names(wn) -> list[str]:
    """Every synset id of WordNet, in WordNet's file order."""
    return [s.name() for pos in ("n", "v", "a", "r") for s in wn.all_synsets(pos)]


def lemma_key(display: str) -> str:
    """The surface form two concepts may not share: lower-cased, single-spaced."""
    return " ".join(display.lower().split())


def lemma_votes(candidate: dict) -> list[tuple[str, tuple]]:
    """(lemma, vote) per lemma of a candidate; the smallest vote is the lemma's best sense."""
    return [
        (lemma_key(display), (-count, number, candidate["concept_id"], position))
        for position, (display, (number, count)) in enumerate(zip(candidate["lemmas"], candidate["_senses"]))
    ]


def label_concept(candidate: dict, won: list[tuple[str, tuple]]) -> dict | None:
    """The output row of a candidate that won lemmas (labelled with its best one), else None."""
    if not won:
        return None
    lemma, _vote = min(won, key=lambda item: item[1])
    row = {k: v for k, v in candidate.items() if not k.startswith("_")}
    return {"lemma": lemma, **row}


def rank_key(row: dict, prioritise_undesirable: bool) -> tuple:
    """Sort key: undesirable first (if asked), then most frequent, then single words before
    phrases, then a stable hash of the id (ties among unseen concepts, which are most
    of WordNet, are then broken without favouring any part of the alphabet)."""
    first = 0 if (prioritise_undesirable and row["polarity"] == "undesirable") else 1
    spread = hashlib.blake2b(row["concept_id"].encode(), digest_size=8).hexdigest()
    return (first, -row["frequency"], len(row["lemma"].split()), spread, row["concept_id"])


def to_table(rows: list[dict]) -> pa.Table:
    """Rows in the ``concepts.parquet`` schema, sorted by concept_id."""
    rows = sorted(rows, key=lambda r: r["concept_id"])
    return pa.Table.from_pylist([{name: r[name] for name in SCHEMA.names} for r in rows], schema=SCHEMA)


def select_concepts_direct(cfg: ConceptsConfig) -> tuple[list[dict], dict[str, int]]:
    """The whole stage in one process: (kept rows, counters). Same logic as :class:`SelectConcepts`."""
    selector = ConceptSelector(cfg)
    counts = {"read": 0, **{f"dropped_{f}": 0 for f in FILTERS}}
    candidates = []
    for name in all_synset_names(selector.wn):
        counts["read"] += 1
        candidate, dropped = selector.evaluate(name)
        if dropped:
            counts[f"dropped_{dropped}"] += 1
        else:
            candidates.append(candidate)
    best: dict[str, tuple] = {}
    for candidate in candidates:
        for lemma, vote in lemma_votes(candidate):
            if lemma not in best or vote < best[lemma]:
                best[lemma] = vote
    won: dict[str, list] = {}
    for lemma, vote in best.items():
        won.setdefault(vote[2], []).append((lemma, vote))
    labelled = [row for c in candidates if (row := label_concept(c, won.get(c["concept_id"], [])))]
    counts["dropped_lemma_dedup"] = len(candidates) - len(labelled)
    kept = sorted(labelled, key=lambda r: rank_key(r, cfg.prioritise_undesirable))[: cfg.max_concepts]
    counts["dropped_cut"] = len(labelled) - len(kept)
    counts["kept"] = len(kept)
    return kept, counts


class _ListSynsets(beam.DoFn):
    def __init__(self, cfg: ConceptsConfig):
        self.cfg = cfg
        self.read = Metrics.counter(NAMESPACE, "read")

    def process(self, _seed):
        for name in all_synset_names(load_wordnet(self.cfg.wordnet_dir)):
            self.read.inc()
            yield name


class _EvaluateSynsets(beam.DoFn):
    def __init__(self, cfg: ConceptsConfig):
        self.cfg = cfg
        self.dropped = {f: Metrics.counter(NAMESPACE, f"dropped_{f}") for f in FILTERS}

    def setup(self):
        self.selector = ConceptSelector(self.cfg)
        self.progress = ProgressLog("concepts", "synsets")

    def process(self, name):
        self.progress.update()
        candidate, dropped = self.selector.evaluate(name)
        if dropped:
            self.dropped[dropped].inc()
        else:
            yield candidate


class _Label(beam.DoFn):
    def __init__(self):
        self.dedup = Metrics.counter(NAMESPACE, "dropped_lemma_dedup")

    def process(self, element):
        _concept_id, grouped = element
        for candidate in grouped["candidate"]:
            row = label_concept(candidate, list(grouped["won"]))
            if row is None:
                self.dedup.inc()
            else:
                yield row


class _WriteConcepts(beam.DoFn):
    def __init__(self, path: str, max_concepts: int):
        self.path = path
        self.max_concepts = max_concepts
        self.kept = Metrics.counter(NAMESPACE, "kept")
        self.cut = Metrics.counter(NAMESPACE, "dropped_cut")

    def process(self, rows, n_ranked):
        fileio.write_parquet_atomic(self.path, to_table(rows))
        self.kept.inc(len(rows))
        self.cut.inc(n_ranked - len(rows))
        yield self.path


class SelectConcepts(beam.PTransform):
    """WordNet -> a PCollection of concept rows (dicts with the ``concepts.parquet`` columns)."""

    def __init__(self, cfg: ConceptsConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pbegin):
        cfg = self.cfg
        names = (
            pbegin
            | "Seed" >> beam.Create([None])
            | "ListSynsets" >> beam.ParDo(_ListSynsets(cfg))
            | "Spread" >> beam.Reshuffle()
        )
        candidates = names | "Filter" >> beam.ParDo(_EvaluateSynsets(cfg))
        winners = (
            candidates
            | "LemmaVotes" >> beam.FlatMap(lemma_votes)
            | "BestSensePerLemma" >> beam.CombinePerKey(min)
            | "ByWinner" >> beam.Map(lambda kv: (kv[1][2], kv))
        )
        by_id = candidates | "KeyById" >> beam.Map(lambda c: (c["concept_id"], c))
        return (
            {"candidate": by_id, "won": winners}
            | "JoinWins" >> beam.CoGroupByKey()
            | "OneConceptPerLemma" >> beam.ParDo(_Label())
        )


class WriteConcepts(beam.PTransform):
    """Rank concept rows, cut at ``max_concepts``, write ``OUT/concepts.parquet``; yields the path."""

    def __init__(self, out_dir: str, cfg: ConceptsConfig):
        super().__init__()
        self.path = fileio.join(out_dir, "concepts.parquet")
        self.cfg = cfg

    def expand(self, rows):
        cfg = self.cfg
        n_ranked = rows | "CountRanked" >> beam.combiners.Count.Globally()
        top = rows | "Rank" >> beam.combiners.Top.Of(
            cfg.max_concepts, key=lambda r: rank_key(r, cfg.prioritise_undesirable), reverse=True
        )
        return top | "Write" >> beam.ParDo(
            _WriteConcepts(self.path, cfg.max_concepts), beam.pvalue.AsSingleton(n_ranked)
        )


RECONCILIATION = Reconciliation(NAMESPACE, "read", tuple(f"dropped_{f}" for f in FILTERS) + ("kept",))
