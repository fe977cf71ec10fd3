"""Polarity labels (desirable / undesirable / neutral) from WordNet subtrees.

The curated lexicon is ``polarity_lexicon.yaml`` beside this module. A user
overrides it with a YAML file of the form::

    concepts:            # single concepts, highest priority
      kitchen_knife.n.01: neutral
    subtrees:            # whole subtrees, ahead of the curated lexicon
      knife.n.01: undesirable

Rules (docs/methods.md §1.5; review rules in docs/concepts.md): a concept under a root
takes the root's polarity and ``polarity_source`` = the root's id. Single-concept
overrides beat user subtrees, which beat the curated lexicon. Within one source, the
nearest root wins, and at equal distance undesirable beats desirable. The lexicon's
``neutral`` roots are carve-outs (alcohol under drug_of_abuse): nearer than the root
they sit under, they make their subtree neutral again. Its ``exact`` entries label
one concept without passing the label down (the head of a subtree that mixes kinds,
medicine.n.02). Its ``protected`` subtrees (sexual orientations, identity groups,
ordinary biology) are never undesirable from the curated lexicon unless an undesirable
root sits strictly nearer: such a concept is neutral with ``polarity_source`` =
``protected:<root>``. Concepts under no root are
neutral with an empty source.
"""

from __future__ import annotations

from collections import deque
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

POLARITIES = ("undesirable", "desirable", "neutral")
_TIE_ORDER = {"undesirable": 0, "desirable": 1, "neutral": 2}


@dataclass(frozen=True)
class Lexicon:
    """Polarity roots: curated ``roots``, ``exact`` labels and ``protected`` roots, and user
    ``subtrees``/``concepts`` overrides."""

    roots: dict[str, str]  # synset id -> polarity
    subtrees: dict[str, str]
    concepts: dict[str, str]
    exact: dict[str, str] = dataclasses.field(default_factory=dict)
    protected: tuple[str, ...] = ()

    def all_roots(self) -> list[str]:
        """Every subtree root named by the lexicon or the overrides (sorted)."""
        return sorted(set(self.roots) | set(self.subtrees))

    def undesirable_and_desirable_roots(self) -> list[str]:
        """Roots whose polarity is not neutral (the abstract subtrees the concept stage includes)."""
        merged = {**self.roots, **self.subtrees}
        return sorted(r for r, p in merged.items() if p != "neutral")


def _check_polarity(value: str, where: str) -> str:
    if value not in POLARITIES:
        raise ValueError(f"{where}: polarity {value!r} is not one of {', '.join(POLARITIES)}")
    return value


def curated_lexicon() -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
    """The curated lexicon: ({root: polarity}, {exact concept: polarity}, protected roots)."""
    text = resources.files(__package__).joinpath("polarity_lexicon.yaml").read_text()
    data = yaml.safe_load(text)
    unknown = set(data) - {*POLARITIES, "exact", "protected"}
    if unknown:
        raise ValueError(f"polarity_lexicon.yaml: unknown section(s) {sorted(unknown)}")
    roots: dict[str, str] = {}
    for polarity in POLARITIES:
        for ids in (data.get(polarity) or {}).values():
            for synset_id in ids:
                roots[synset_id] = polarity
    exact = {synset_id: _check_polarity(polarity, "polarity_lexicon.yaml exact")
             for polarity, ids in (data.get("exact") or {}).items() for synset_id in ids}
    protected = tuple(synset_id for ids in (data.get("protected") or {}).values() for synset_id in ids)
    return roots, exact, protected


def load_lexicon(overrides_path: str | None = None) -> Lexicon:
    """The curated lexicon plus the user's override file, if any (see module docstring)."""
    subtrees: dict[str, str] = {}
    concepts: dict[str, str] = {}
    if overrides_path:
        path = Path(overrides_path)
        if not path.is_file():
            raise FileNotFoundError(f"polarity override file {path} does not exist (concepts.polarity_overrides)")
        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - {"concepts", "subtrees"}
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; expected 'concepts' and/or 'subtrees'")
        subtrees = {k: _check_polarity(v, f"{path} subtrees.{k}") for k, v in (data.get("subtrees") or {}).items()}
        concepts = {k: _check_polarity(v, f"{path} concepts.{k}") for k, v in (data.get("concepts") or {}).items()}
    roots, exact, protected = curated_lexicon()
    return Lexicon(roots=roots, subtrees=subtrees, concepts=concepts, exact=exact, protected=protected)


def _descendant_distances(wn, root: str) -> dict[str, int]:
    """Hypernym distance from every synset under ``root`` (the root included, at 0)."""
    start = wn.synset(root)
    dist = {start.name(): 0}
    queue = deque([start])
    while queue:
        synset = queue.popleft()
        for child in synset.hyponyms() + synset.instance_hyponyms():
            if child.name() not in dist:
                dist[child.name()] = dist[synset.name()] + 1
                queue.append(child)
    return dist


def _nearest(wn, roots: dict[str, str]) -> dict[str, tuple[int, int, str, str]]:
    best: dict[str, tuple[int, int, str, str]] = {}
    for root, polarity in sorted(roots.items()):
        for name, d in _descendant_distances(wn, root).items():
            key = (d, _TIE_ORDER[polarity], root, polarity)
            if name not in best or key < best[name]:
                best[name] = key
    return best


def check_roots(wn, lexicon: Lexicon) -> None:
    """Fail early, naming the file, when a lexicon or override names a synset WordNet lacks."""
    from nltk.corpus.reader.wordnet import WordNetError

    curated = [*lexicon.roots, *lexicon.exact, *lexicon.protected]
    for where, names in (("polarity_lexicon.yaml", curated), ("polarity overrides", {**lexicon.subtrees, **lexicon.concepts})):
        for name in names:
            try:
                wn.synset(name)
            except (WordNetError, ValueError) as exc:
                raise ValueError(f"{where}: {name!r} is not a WordNet 3.0 synset ({exc})") from None


def polarity_table(wn, lexicon: Lexicon) -> dict[str, tuple[str, str]]:
    """{synset id: (polarity, polarity_source)} for every synset under some root or override."""
    check_roots(wn, lexicon)
    nearest = _nearest(wn, lexicon.roots)
    protected = _nearest(wn, {root: "neutral" for root in lexicon.protected})
    table = {}
    for name, (d, _tie, root, polarity) in nearest.items():
        if polarity == "undesirable" and name in protected and protected[name][0] <= d:
            table[name] = ("neutral", f"protected:{protected[name][2]}")
        else:
            table[name] = (polarity, root)
    table.update({name: (polarity, name) for name, polarity in lexicon.exact.items()})
    table.update({name: (key[3], key[2]) for name, key in _nearest(wn, lexicon.subtrees).items()})
    table.update({name: (polarity, name) for name, polarity in lexicon.concepts.items()})
    return table
