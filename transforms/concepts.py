"""Concept stage: WordNet synsets -> ``concepts.parquet`` (docs/methods.md §1.1, §1.5).

Steps, each counted:

1. list every synset of WordNet 3.0 (``read``);
2. filter: part of speech (``dropped_pos``), inside an included root subtree or an
   ``include_groups`` lexicographer group, and outside every excluded subtree
   (``dropped_root``), instances (proper nouns) outside
   ``instance_groups`` (``dropped_instance``), depth range (``dropped_depth``), tag-count
   frequency (``dropped_min_frequency``), picturability: rated by the human norms (or, in
   ``inherit_groups``, by the nearest rated hypernym), at least ``min_concreteness`` and visual
   enough (:func:`visual_enough`) (``dropped_picturability``);
3. sense choice per surface lemma: every lemma goes to the sense with the most evidence
   (:meth:`ConceptSelector.sense_evidence`; WordNet tag count, then sense number break ties), which is
   labelled with it (a synset that wins several lemmas takes its best one); a synset that wins no
   lemma still enters as a second sense of a lemma when its evidence is at least
   ``second_sense_fraction`` of that lemma's winner's (:func:`is_second_sense`), labelled with the
   same lemma, so the label is not unique and ``concept_id`` is the key; any other synset is dropped
   (``dropped_lemma_dedup``);
4. rank by picturability x frequency from published ratings times the lexicographer group's
   factor (``group_weights``; transforms/picturability.py;
   undesirable concepts first when ``prioritise_undesirable``; see :func:`rank_key`) and
   cut at ``max_concepts`` plus a ``reserve`` of the next-ranked candidates
   (``dropped_cut``); ``kept`` + ``reserve`` rows are written (the reserve flagged).

docs/concepts.md explains the ranking, the sense choice and the instance policy.

The functions below are plain Python; :class:`SelectConcepts` wires them into a
Beam graph and :func:`select_concepts_direct` runs them in one process (the
benchmark's baseline and a reference for the tests).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms import fileio
from steering.config import Config
from transforms.counters import Reconciliation
from transforms.picturability import COMBINES, ZIPF_CAP, Evidence, Ratings, combine_words
from transforms.progress import ProgressLog
from transforms.polarity import Lexicon, load_lexicon, polarity_table
from transforms.wordnet import LEXNAMES, load_wordnet

NAMESPACE = "concepts"
FILTERS = ("pos", "root", "instance", "depth", "min_frequency", "picturability", "lemma_dedup", "cut")
WEIGHT_NAMES = ("concreteness", "visual", "frequency")
# Default ``group_weights`` (docs/concepts.md, "Ranking"): groups of persons, acts, events and
# abstractions, whose words can be concrete and visual while the sense is not.
ABSTRACT_GROUP_WEIGHTS = {
    "noun.person": 0.5, "noun.act": 0.5, "noun.event": 0.5, "noun.location": 0.5, "noun.phenomenon": 0.6,
    "noun.body": 0.7, "noun.substance": 0.7, "noun.object": 0.7, "noun.process": 0.7, "noun.communication": 0.4,
    "noun.group": 0.4, "noun.possession": 0.4, "noun.state": 0.3, "noun.cognition": 0.3,
    "noun.attribute": 0.3, "noun.feeling": 0.3, "noun.time": 0.3, "noun.relation": 0.3, "noun.motive": 0.3,
    "noun.quantity": 0.3,
}
# Default ``subtree_weights``: the parts of those groups a photo shows (docs/concepts.md, "Ranking"):
# sports, games and dancing, moving about, touching and embracing; the outside of the body and the bones;
# weather, floods and earthquakes; explosions, eruptions and lightning.
VISIBLE_SUBTREE_WEIGHTS = {
    "diversion.n.01": 1.0, "athletic_game.n.01": 1.0, "locomotion.n.02": 1.0, "touch.n.05": 1.0,
    "embrace.n.01": 1.0, "external_body_part.n.01": 1.0, "sense_organ.n.01": 1.0, "body_covering.n.01": 1.0,
    "bone.n.01": 1.0, "atmospheric_phenomenon.n.01": 1.0, "geological_phenomenon.n.01": 1.0,
    "discharge.n.01": 1.0,
}

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
    ("concreteness", pa.float32()),
    ("visual", pa.float32()),
    ("zipf", pa.float32()),
    ("picturability", pa.float32()),
    ("rank", pa.int32()),
    ("reserve", pa.bool_()),
])


@dataclass
class ConceptsConfig(Config):
    """Options of the concept stage (the ``concepts:`` section of a config file; docs/concepts.md).

    Attributes:
        max_concepts: how many concepts to keep (the paper: ~15,000).
        reserve: how many next-ranked candidates to write after them (``reserve`` = true), for
            retrieval to draw on when a kept concept has no evidence in the corpus (None: 10%
            of ``max_concepts``; 0: none).
        pos: WordNet parts of speech to read ("n" nouns, "v", "a", "s", "r").
        roots: synsets whose subtrees are included (things: physical_entity.n.01; visible actions
            and events: event.n.01).
        include_polarity_roots: also include every subtree of the polarity lexicon, and let
            the lexicon's roots themselves (crime, violence) past ``min_concreteness`` and
            ``min_visual``, so that the abstract concepts a safety dictionary needs are present.
        include_groups: lexicographer groups whose synsets are included wherever their hypernyms
            sit (default noun.object, natural objects: WordNet files rainbow, foam, stalactite and
            the Milky Way under shape or group, outside physical_entity.n.01).
        exclude_roots: synsets whose subtrees are dropped.
        instance_groups: lexicographer groups whose instance synsets (proper nouns) are kept
            (default noun.object: the sun, the moon, the Earth); others (people, places,
            organisations) are dropped.
        min_frequency: minimum summed WordNet tag count of a synset's lemmas.
        min_depth: minimum hypernym depth (drops 'object', 'whole', ...).
        max_depth: maximum hypernym depth (None: no limit).
        weights: exponents of the ranking score c^w * v^w * f^w (concreteness, visual, frequency).
        lemma_combine: how a synset's lemmas' ratings combine: "first" (the first lemma a norm rates;
            WordNet lists a synset's words most common first, so rare or figurative synonyms such as
            soul and mortal for person do not pull it down), "mean" or "max".
        min_concreteness: minimum concreteness (Brysbaert 1-5 scale) of a kept synset.
        min_visual: minimum visual strength (Lancaster 0-5 scale) of a kept synset, unless it is
            compensated (``compensated_visual``).
        compensated_visual: a synset with visual strength in [``compensated_visual``, ``min_visual``)
            still passes when c * v >= ``compensated_product`` (normalised concreteness times visual
            strength): a very concrete word whose experience is shared with touch, taste or hearing
            (mouth, lip, tea, bell). ``compensated_product: null`` turns this off.
        compensated_product: see ``compensated_visual``.
        group_weights: a factor on the score (and on the sense evidence) per WordNet lexicographer
            group; unlisted groups 1. The default lowers groups whose members are mostly defined
            by something a photo cannot show (a person's job, relation or opinion; an act's purpose;
            the inside of the body).
        subtree_weights: a factor per WordNet subtree (synset id -> factor) that replaces the group's
            for the synsets under it; the most specific listed subtree wins. The default gives the
            visible parts of the lowered groups their full weight: sports, games, dancing, locomotion,
            touching; the outside of the body (external parts, sense organs, hair and skin) and bones;
            weather, floods and earthquakes; explosions, eruptions and lightning.
        inherit_groups: lexicographer groups whose synsets no lemma of which is rated take the
            concreteness and visual strength of their nearest rated hypernym, up to
            ``inherit_levels`` levels up (species, breeds, named tools), with their own frequency.
        inherit_levels: see ``inherit_groups`` (0: no inheritance).
        rate_by_won_lemmas: rate a synset by the lemmas it wins in the sense vote only (those
            whose best sense it is), so a rare sense does not borrow a word's ratings.
        sense_top: a lemma's sense is chosen by the sum of the best ``sense_top`` word scores
            among the words naming the sense or its kinds down to ``sense_depth`` hyponym levels
            (:meth:`ConceptSelector.sense_evidence`).
        sense_depth: see ``sense_top``.
        second_sense_fraction: a synset that wins no lemma still enters, labelled with a lemma, when
            its sense evidence is at least this fraction of that lemma's winner's (banana the fruit
            beside banana the plant); null: one concept per lemma.
        prioritise_undesirable: rank undesirable concepts ahead of the rest, so the cut
            never removes them.
        polarity_overrides: path of a YAML file relabelling concepts or subtrees.
        wordnet_dir: a WordNet 3.0 database directory (default: see transforms/wordnet.py).
    """

    max_concepts: int = 15000
    reserve: int | None = None
    pos: list[str] = field(default_factory=lambda: ["n"])
    roots: list[str] = field(default_factory=lambda: ["physical_entity.n.01", "event.n.01"])
    include_polarity_roots: bool = True
    include_groups: list[str] = field(default_factory=lambda: ["noun.object"])
    exclude_roots: list[str] = field(default_factory=list)
    instance_groups: list[str] = field(default_factory=lambda: ["noun.object"])
    min_frequency: int = 0
    min_depth: int = 3
    max_depth: int | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"concreteness": 1.0, "visual": 1.0, "frequency": 1.0})
    lemma_combine: str = "first"
    min_concreteness: float = 3.0
    min_visual: float = 3.0
    compensated_visual: float = 2.5
    compensated_product: float | None = 0.5
    group_weights: dict[str, float] = field(default_factory=lambda: dict(ABSTRACT_GROUP_WEIGHTS))
    subtree_weights: dict[str, float] = field(default_factory=lambda: dict(VISIBLE_SUBTREE_WEIGHTS))
    inherit_groups: list[str] = field(default_factory=lambda: ["noun.animal", "noun.plant", "noun.food",
                                                               "noun.artifact"])
    inherit_levels: int = 2
    rate_by_won_lemmas: bool = False
    sense_top: int = 8
    sense_depth: int = 2
    second_sense_fraction: float | None = 0.33
    prioritise_undesirable: bool = True
    polarity_overrides: str | None = None
    wordnet_dir: str | None = None

    def validate(self, where: str) -> None:
        if self.max_concepts < 1:
            raise ValueError(f"{where}.max_concepts must be >= 1, got {self.max_concepts}")
        if self.reserve is not None and self.reserve < 0:
            raise ValueError(f"{where}.reserve must be >= 0 or null, got {self.reserve}")
        bad_pos = sorted(set(self.pos) - {"n", "v", "a", "s", "r"})
        if bad_pos:
            raise ValueError(f"{where}.pos: {bad_pos} are not WordNet parts of speech (n, v, a, s, r)")
        if set(self.weights) != set(WEIGHT_NAMES) or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"{where}.weights must give each of {', '.join(WEIGHT_NAMES)} a weight >= 0, "
                             f"got {self.weights}")
        if self.lemma_combine not in COMBINES:
            raise ValueError(f"{where}.lemma_combine must be one of {COMBINES}, got {self.lemma_combine!r}")
        for option in ("instance_groups", "include_groups", "group_weights", "inherit_groups"):
            bad_groups = sorted(set(getattr(self, option)) - set(LEXNAMES))
            if bad_groups:
                raise ValueError(f"{where}.{option}: {bad_groups} are not WordNet lexicographer groups "
                                 "(noun.object, noun.person, ...)")
        for option in ("group_weights", "subtree_weights"):
            if any(not 0 <= w <= 1 for w in getattr(self, option).values()):
                raise ValueError(f"{where}.{option} must be in [0, 1], got {getattr(self, option)}")
        if self.inherit_levels < 0:
            raise ValueError(f"{where}.inherit_levels must be >= 0, got {self.inherit_levels}")
        if self.compensated_product is not None and not (0 <= self.compensated_product <= 1
                                                         and self.compensated_visual <= self.min_visual):
            raise ValueError(f"{where}.compensated_product must be in [0, 1] (or null) and compensated_visual "
                             f"<= min_visual, got {self.compensated_product}, {self.compensated_visual}")
        if self.second_sense_fraction is not None and not 0 < self.second_sense_fraction <= 1:
            raise ValueError(f"{where}.second_sense_fraction must be in (0, 1] or null, got "
                             f"{self.second_sense_fraction}")
        if self.sense_top < 1 or self.sense_depth < 0:
            raise ValueError(f"{where}.sense_top must be >= 1 and sense_depth >= 0, got {self.sense_top}, "
                             f"{self.sense_depth}")

    def weight_tuple(self) -> tuple[float, float, float]:
        """(w_c, w_v, w_f) for :meth:`transforms.picturability.Evidence.score`."""
        return tuple(float(self.weights[name]) for name in WEIGHT_NAMES)

    def n_reserve(self) -> int:
        """Reserve rows written after the kept ones (``reserve``, or 10% of ``max_concepts``)."""
        return self.reserve if self.reserve is not None else math.ceil(0.1 * self.max_concepts)


class ConceptSelector:
    """Per-synset filtering, evidence and labelling; built once per worker (it loads WordNet and the norms)."""

    def __init__(self, cfg: ConceptsConfig, lexicon: Lexicon | None = None):
        self.cfg = cfg
        self.wn = load_wordnet(cfg.wordnet_dir)
        lexicon = lexicon or load_lexicon(cfg.polarity_overrides)
        self.polarity = polarity_table(self.wn, lexicon)
        polarity_roots = lexicon.undesirable_and_desirable_roots() if cfg.include_polarity_roots else []
        self.included = self._closure(list(cfg.roots) + polarity_roots)
        self.polarity_roots = {self.wn.synset(root).name() for root in polarity_roots}  # canonical ids
        self.excluded = self._closure(cfg.exclude_roots)
        self.senses = self._read_sense_index()
        self.ratings = Ratings(cfg.lemma_combine)
        self.weights = cfg.weight_tuple()
        self.subtree_factors = self._subtree_factors()

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

    def sense_evidence(self, synset) -> float:
        """How picturable and common this sense is: the sum of the ``sense_top`` best word scores
        among its lemmas and those of its hyponyms down to ``sense_depth`` levels (the words
        naming it or its kinds; word ratings alone cannot tell a word's senses apart), times its
        lexicographer group's factor (``group_weights``)."""
        words, level = [lemma.name() for lemma in synset.lemmas()], [synset]
        for _ in range(self.cfg.sense_depth):
            level = [h for s in level for h in s.hyponyms()]
            words += [lemma.name() for s in level for lemma in s.lemmas()]
        scores = sorted((x for w in words if (x := self.ratings.word_score(w, self.weights)) is not None),
                        reverse=True)
        return sum(scores[: self.cfg.sense_top]) * self.group_weight(synset)

    def group_weight(self, synset) -> float:
        """The factor of a synset: its most specific ``subtree_weights`` subtree's, else its
        lexicographer group's ``group_weights`` factor, else 1."""
        factor = self.subtree_factors.get(synset.name())
        return factor if factor is not None else self.cfg.group_weights.get(synset.lexname(), 1.0)

    def _subtree_factors(self) -> dict[str, float]:
        """{synset id: factor} for every synset under a ``subtree_weights`` root; deeper roots win."""
        roots = []
        for root, factor in self.cfg.subtree_weights.items():
            try:
                synset = self.wn.synset(root)
            except Exception as exc:
                raise ValueError(f"concepts.subtree_weights: {root!r} is not a WordNet synset ({exc})") from None
            roots.append((synset.min_depth(), root, factor))
        factors = {}
        for _depth, root, factor in sorted(roots):
            factors.update(dict.fromkeys(self._closure([root]), factor))
        return factors

    def inherited(self, synset) -> tuple[Evidence | None, str | None]:
        """(evidence, hypernym id) for an unrated synset in ``inherit_groups``: the ratings of its nearest
        rated hypernym (the best-scoring one at that level) with the synset's own frequency; (None, None)
        when none within ``inherit_levels``."""
        if synset.lexname() not in self.cfg.inherit_groups:
            return None, None
        frequency = max(self.ratings.lemma(lemma.name())[2] for lemma in synset.lemmas())
        level = [synset]
        for _ in range(self.cfg.inherit_levels):
            level = [h for s in level for h in s.hypernyms() + s.instance_hypernyms()]
            rated = [(e, h.name()) for h in level
                     if (e := self.ratings.synset([lemma.name() for lemma in h.lemmas()])) is not None]
            if rated:
                evidence, name = max(rated, key=lambda item: (item[0].score(self.weights), item[1]))
                return Evidence(evidence.concreteness, evidence.visual, frequency), name
        return None, None

    def contested(self, lemmas) -> bool:
        """Whether some lemma has another sense in the parts of speech read (else the sense vote
        has one candidate and its evidence is not needed)."""
        index = self.wn._lemma_pos_offset_map  # NLTK's {lemma: {pos: [offsets]}}, lower-cased
        pos = set(self.cfg.pos) | ({"s"} if "a" in self.cfg.pos else set())
        return any(sum(len(index.get(lemma.name().lower(), {}).get(p, ())) for p in pos) > 1 for lemma in lemmas)

    def evaluate(self, name: str) -> tuple[dict | None, str | None]:
        """(candidate row, None) for a synset passing every filter, else (None, filter name)."""
        cfg = self.cfg
        synset = self.wn.synset(name)
        if synset.pos() not in cfg.pos and not (synset.pos() == "s" and "a" in cfg.pos):
            return None, "pos"
        if (name not in self.included and synset.lexname() not in cfg.include_groups) or name in self.excluded:
            return None, "root"
        instance = bool(synset.instance_hypernyms())
        if instance and synset.lexname() not in cfg.instance_groups:
            return None, "instance"
        lemmas = synset.lemmas()
        senses = [self.senses.get(lemma.key(), (99, 0)) for lemma in lemmas]
        frequency = sum(count for _number, count in senses)
        if frequency < cfg.min_frequency:
            return None, "min_frequency"
        lemma_names = [lemma.name() for lemma in lemmas]
        factor = self.group_weight(synset)
        evidence, rated_by = self.ratings.synset(lemma_names), "lemmas"
        if evidence is None:
            evidence, rated_by = self.inherited(synset)
        columns = score_columns(evidence, self.weights, factor)
        raw_c = columns["concreteness"]
        below = (raw_c is not None and raw_c < cfg.min_concreteness) or not visual_enough(evidence, cfg)
        if columns["picturability"] is None or (below and name not in self.polarity_roots):
            return None, "picturability"
        path = min(synset.hypernym_paths(), key=lambda p: (len(p), [s.name() for s in p]))
        depth = len(path) - 1
        if depth < cfg.min_depth or (cfg.max_depth is not None and depth > cfg.max_depth):
            return None, "depth"
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
            **columns,
            # For the sense vote: (sense number, tag count) per lemma, the sense's
            # evidence, and whether it is an instance (proper noun).
            "_senses": senses,
            "_sense_evidence": self.sense_evidence(synset) if self.contested(lemmas) else 0.0,
            "_instance": instance,
            # For rating by the lemmas it enters with only: (c, v, f) per lemma, the group factor, how it was rated.
            "_words": [self.ratings.lemma(n) for n in lemma_names],
            "_factor": factor,
            "_rated_by": rated_by,
        }, None


def visual_enough(evidence: Evidence | None, cfg: ConceptsConfig) -> bool:
    """Whether a synset's visual strength passes: V >= ``min_visual``, or V >= ``compensated_visual``
    and c * v >= ``compensated_product`` (normalised; an unrated norm takes the other's value, as in
    the score). True when the visual norm does not rate it (the concreteness test then decides)."""
    if evidence is None or evidence.visual is None:
        return True
    visual = 5.0 * evidence.visual
    if visual >= cfg.min_visual:
        return True
    concreteness = evidence.visual if evidence.concreteness is None else evidence.concreteness
    return (cfg.compensated_product is not None and visual >= cfg.compensated_visual
            and concreteness * evidence.visual >= cfg.compensated_product)


def evidence_columns(ratings: Ratings, lemma_names: list[str], weights: tuple[float, float, float],
                     factor: float = 1.0) -> dict:
    """The rating columns of a concepts.parquet row: concreteness (1-5) and visual strength
    (0-5) combined over the lemmas, the largest Zipf frequency, and the ranking score
    (``picturability``, times the group factor ``factor``); all None when no lemma is rated."""
    return score_columns(ratings.synset(lemma_names), weights, factor)


def score_columns(evidence: Evidence | None, weights: tuple[float, float, float], factor: float = 1.0) -> dict:
    """The rating columns of one synset's evidence (see :func:`evidence_columns`); all None for no evidence."""
    if evidence is None:
        return {"concreteness": None, "visual": None, "zipf": None, "picturability": None}
    return {"concreteness": None if evidence.concreteness is None else 1.0 + 4.0 * evidence.concreteness,
            "visual": None if evidence.visual is None else 5.0 * evidence.visual,
            "zipf": evidence.frequency * ZIPF_CAP, "picturability": evidence.score(weights) * factor}


def all_synset_names(wn) -> list[str]:
    """Every synset id of WordNet, in WordNet's file order."""
    return [s.name() for pos in ("n", "v", "a", "r") for s in wn.all_synsets(pos)]


def lemma_key(display: str, proper: bool = False) -> str:
    """The surface form two concepts may not share: single-spaced, lower-cased unless ``proper``
    (a proper name: "Sun" the star is not "sun" the sunlight)."""
    return " ".join((display if proper else display.lower()).split())


def lemma_votes(candidate: dict) -> list[tuple[str, tuple]]:
    """(lemma, vote) per lemma of a candidate; the smallest vote is the lemma's best sense:
    most sense evidence, then WordNet tag count, then sense number (see :func:`vote_owner`).
    An instance with a capitalised lemma (the Sun, the Moon) votes only with its capitalised
    lemmas, kept in their case, so it never competes with the common noun."""
    evidence = round(candidate["_sense_evidence"], 9)
    entries = list(enumerate(zip(candidate["lemmas"], candidate["_senses"])))
    proper = candidate.get("_instance") and any(d[:1].isupper() for _p, (d, _s) in entries)
    return [
        (lemma_key(display, proper), (-evidence, -count, number, candidate["concept_id"], position))
        for position, (display, (number, count)) in entries
        if not proper or display[:1].isupper()
    ]


def vote_owner(vote: tuple) -> str:
    """The concept id a vote of :func:`lemma_votes` is for."""
    return vote[3]


def is_second_sense(vote: tuple, best: tuple, fraction: float | None) -> bool:
    """Whether a sense that lost a lemma (its ``vote``) still enters with it: its sense evidence is
    positive and at least ``fraction`` of the winner's (``best``, the lemma's smallest vote)."""
    own, top = -vote[0], -best[0]
    return fraction is not None and own > 0 and own >= fraction * top


def label_concept(candidate: dict, outcomes: list[tuple[str, tuple, tuple]], cfg: ConceptsConfig) -> dict | None:
    """The output row of a candidate, else None. ``outcomes`` holds (lemma, its vote, the lemma's best
    vote) per lemma of the candidate. It is labelled with its best won lemma; one that won none, with
    its best lemma of which it is a second sense (:func:`is_second_sense`); neither: None. With
    ``rate_by_won_lemmas`` a synset rated by its own lemmas is re-rated by the lemmas it entered with
    (when one of them is rated), so a rare sense does not borrow the ratings of a word it lost."""
    won = [(lemma, vote) for lemma, vote, best in outcomes if vote == best]
    if not won:
        won = [(lemma, vote) for lemma, vote, best in outcomes if is_second_sense(vote, best, cfg.second_sense_fraction)]
    if not won:
        return None
    lemma, _vote = min(won, key=lambda item: item[1])
    row = {k: v for k, v in candidate.items() if not k.startswith("_")}
    if cfg.rate_by_won_lemmas and candidate["_rated_by"] == "lemmas":
        positions = {vote[4] for _lemma, vote in won}
        evidence = combine_words([w for i, w in enumerate(candidate["_words"]) if i in positions], cfg.lemma_combine)
        if evidence is not None:
            row.update(score_columns(evidence, cfg.weight_tuple(), candidate["_factor"]))
    return {"lemma": lemma, **row}


def rank_key(row: dict, prioritise_undesirable: bool) -> tuple:
    """Sort key: undesirable first (if asked), then the picturability score (highest first), then
    WordNet tag counts, then single words before phrases, then a stable hash of the id."""
    first = 0 if (prioritise_undesirable and row["polarity"] == "undesirable") else 1
    spread = hashlib.blake2b(row["concept_id"].encode(), digest_size=8).hexdigest()
    return (first, -round(row["picturability"], 9), -row["frequency"], len(row["lemma"].split()), spread,
            row["concept_id"])


def ranked(rows: list[dict], cfg: ConceptsConfig) -> list[dict]:
    """The best ``max_concepts`` + reserve rows in rank order, with ``rank`` and ``reserve`` set."""
    top = sorted(rows, key=lambda r: rank_key(r, cfg.prioritise_undesirable))[: cfg.max_concepts + cfg.n_reserve()]
    return [{**row, "rank": i, "reserve": i >= cfg.max_concepts} for i, row in enumerate(top)]


def to_table(rows: list[dict]) -> pa.Table:
    """Rows in the ``concepts.parquet`` schema, sorted by concept_id."""
    rows = sorted(rows, key=lambda r: r["concept_id"])
    return pa.Table.from_pylist([{name: r[name] for name in SCHEMA.names} for r in rows], schema=SCHEMA)


def select_concepts_direct(cfg: ConceptsConfig) -> tuple[list[dict], dict[str, int]]:
    """The whole stage in one process: (kept rows, reserve included, in rank order; counters).
    Same logic as :class:`SelectConcepts` + :class:`WriteConcepts`."""
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
    votes = [lemma_votes(candidate) for candidate in candidates]
    best: dict[str, tuple] = {}
    for lemma, vote in (item for candidate_votes in votes for item in candidate_votes):
        if lemma not in best or vote < best[lemma]:
            best[lemma] = vote
    labelled = [row for candidate, candidate_votes in zip(candidates, votes)
                if (row := label_concept(candidate, [(lemma, vote, best[lemma]) for lemma, vote in candidate_votes], cfg))]
    counts["dropped_lemma_dedup"] = len(candidates) - len(labelled)
    kept = ranked(labelled, cfg)
    counts["dropped_cut"] = len(labelled) - len(kept)
    counts["reserve"] = sum(r["reserve"] for r in kept)
    counts["kept"] = len(kept) - counts["reserve"]
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


def _outcomes_by_voter(element):
    """(concept id, (lemma, its vote, the lemma's best vote)) for every vote on one lemma."""
    lemma, grouped = element
    best = next(iter(grouped["best"]))
    for vote in grouped["vote"]:
        yield vote_owner(vote), (lemma, vote, best)


class _Label(beam.DoFn):
    def __init__(self, cfg: ConceptsConfig):
        self.cfg = cfg
        self.dedup = Metrics.counter(NAMESPACE, "dropped_lemma_dedup")

    def process(self, element):
        _concept_id, grouped = element
        for candidate in grouped["candidate"]:
            row = label_concept(candidate, list(grouped["outcomes"]), self.cfg)
            if row is None:
                self.dedup.inc()
            else:
                yield row


class _WriteConcepts(beam.DoFn):
    def __init__(self, path: str):
        self.path = path
        self.kept = Metrics.counter(NAMESPACE, "kept")
        self.reserve = Metrics.counter(NAMESPACE, "reserve")
        self.cut = Metrics.counter(NAMESPACE, "dropped_cut")

    def process(self, rows, n_ranked, cfg):
        rows = ranked(rows, cfg)
        fileio.write_parquet_atomic(self.path, to_table(rows))
        n_reserve = sum(r["reserve"] for r in rows)
        self.kept.inc(len(rows) - n_reserve)
        self.reserve.inc(n_reserve)
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
        votes = candidates | "LemmaVotes" >> beam.FlatMap(lemma_votes)
        best = votes | "BestSensePerLemma" >> beam.CombinePerKey(min)
        outcomes = (
            {"vote": votes, "best": best}
            | "JoinBest" >> beam.CoGroupByKey()
            | "ByVoter" >> beam.FlatMap(_outcomes_by_voter)
        )
        by_id = candidates | "KeyById" >> beam.Map(lambda c: (c["concept_id"], c))
        return (
            {"candidate": by_id, "outcomes": outcomes}
            | "JoinOutcomes" >> beam.CoGroupByKey()
            | "SenseChoice" >> beam.ParDo(_Label(cfg))
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
            cfg.max_concepts + cfg.n_reserve(), key=lambda r: rank_key(r, cfg.prioritise_undesirable), reverse=True
        )
        return top | "Write" >> beam.ParDo(_WriteConcepts(self.path), beam.pvalue.AsSingleton(n_ranked), cfg)


RECONCILIATION = Reconciliation(NAMESPACE, "read", tuple(f"dropped_{f}" for f in FILTERS) + ("kept", "reserve"))
