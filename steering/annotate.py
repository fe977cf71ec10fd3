"""Labelling SAE atoms with concepts (docs/methods.md §3, "Annotation").

For one layer of a :class:`~steering.dictionary.ConceptDictionary`:

1. every concept direction is unit-normalised first, so that concepts with
   large difference-of-means norms do not dominate the centroids;
2. the undesirable centroid is the mean of the unit undesirable directions, the
   desirable centroid the mean of the unit desirable ones (no centroid, and so
   no atom with that label, when the set is empty);
3. each atom (decoder row, unit-normalised) gets its nearest concept by cosine
   similarity and that similarity;
4. an atom is undesirable when its cosine to the undesirable centroid is
   >= eta, desirable when its cosine to the desirable centroid is >= eta, and
   neutral otherwise. An atom passing both takes the label of the larger
   cosine; an exact tie goes to undesirable (removing a concept is the safe side).

``Annotation.undesirable`` / ``.desirable`` are the atom index lists that
``DacoSteerer`` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steering.dictionary import ConceptDictionary, unit_rows
from steering.sae import SAE


@dataclass
class Annotation:
    """Per-atom labels of one SAE against one dictionary layer.

    Attributes:
        eta: the cosine threshold used.
        layer: the dictionary layer.
        labels: "undesirable", "desirable" or "neutral" per atom.
        nearest_concept: id of each atom's most similar concept.
        similarity: cosine of each atom with that concept.
        undesirable_score / desirable_score: cosine of each atom with the centroid
            (NaN where the dictionary has no concept with that polarity).
    """

    eta: float
    layer: int
    labels: list[str]
    nearest_concept: list[str]
    similarity: list[float]
    undesirable_score: list[float]
    desirable_score: list[float]

    @property
    def undesirable(self) -> list[int]:
        """Indices of the atoms labelled undesirable."""
        return [i for i, label in enumerate(self.labels) if label == "undesirable"]

    @property
    def desirable(self) -> list[int]:
        """Indices of the atoms labelled desirable."""
        return [i for i, label in enumerate(self.labels) if label == "desirable"]

    def to_pylist(self) -> list[dict]:
        """One dict per atom: atom, label, nearest_concept, similarity, undesirable_score, desirable_score."""
        return [{"atom": i, "label": self.labels[i], "nearest_concept": self.nearest_concept[i],
                 "similarity": self.similarity[i], "undesirable_score": self.undesirable_score[i],
                 "desirable_score": self.desirable_score[i]} for i in range(len(self.labels))]


def _centroid_scores(atoms: torch.Tensor, concepts: torch.Tensor, members: list[int]) -> torch.Tensor:
    if not members:
        return torch.full((atoms.shape[0],), float("nan"), dtype=atoms.dtype)
    centroid = concepts[members].mean(0)
    norm = centroid.norm()
    if float(norm) == 0.0:
        return torch.zeros(atoms.shape[0], dtype=atoms.dtype)
    return atoms @ (centroid / norm)


@torch.no_grad()
def annotate(sae: SAE | torch.Tensor, dictionary: ConceptDictionary, eta: float,
             layer: int | None = None) -> Annotation:
    """Label every atom of ``sae`` (or of a [d_sae, d] atom matrix) against ``dictionary`` at ``layer``.

    ``layer`` may be omitted when the dictionary holds a single layer.
    """
    if layer is None:
        if len(dictionary.layers) != 1:
            raise ValueError(f"the dictionary holds layers {dictionary.layers}; pass layer=")
        layer = dictionary.layers[0]
    if not -1.0 <= eta <= 1.0:
        raise ValueError(f"eta is a cosine threshold in [-1, 1], got {eta}")
    atoms = (sae.W_dec if isinstance(sae, SAE) else torch.as_tensor(sae)).detach().cpu().double()
    if atoms.ndim != 2 or atoms.shape[1] != dictionary.d:
        raise ValueError(f"SAE atoms have shape {tuple(atoms.shape)}; the dictionary has d={dictionary.d}")
    atoms = unit_rows(atoms)
    concepts = unit_rows(dictionary.directions(layer).double())
    sims = atoms @ concepts.T
    best_sim, best = sims.max(dim=1)
    bad_score = _centroid_scores(atoms, concepts, dictionary.undesirable())
    good_score = _centroid_scores(atoms, concepts, dictionary.desirable())
    labels = []
    for u, g in zip(bad_score.tolist(), good_score.tolist()):
        passes_u = not math.isnan(u) and u >= eta
        passes_g = not math.isnan(g) and g >= eta
        if passes_u and (not passes_g or u >= g):
            labels.append("undesirable")
        elif passes_g:
            labels.append("desirable")
        else:
            labels.append("neutral")
    return Annotation(
        eta=float(eta), layer=int(layer), labels=labels,
        nearest_concept=[dictionary.concept_ids[i] for i in best.tolist()],
        similarity=best_sim.tolist(), undesirable_score=bad_score.tolist(), desirable_score=good_score.tolist())
