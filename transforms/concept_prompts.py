"""Concept prompts: each concept is written into several templates with its lemma and a short
gloss from its WordNet definition; the normalised CLIP text embeddings are averaged and
re-normalised (CLIP's prompt ensembling).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from transforms.clip_model import LoadedClip

PROMPT_TEMPLATES = (
    "a photo of {article} {lemma}, {gloss}.",
    "a photo of {article} {lemma}.",
    "a close-up photo of the {lemma}, {gloss}.",
    "an image showing {article} {lemma}: {gloss}.",
    "a picture of the {lemma}.",
    "{lemma}, {gloss}.",
)
"""Concept prompts. ``{lemma}`` is the concept's label, ``{article}`` "a"/"an", ``{gloss}`` a short
gloss: the WordNet definition up to its first ';', without parentheses, at most
:data:`GLOSS_WORDS` words. The gloss tells CLIP which sense is meant (bank the river side
vs. bank the institution); the template without it keeps the plain name in the ensemble.
Templates are applied in this order; for a concept without a definition the ones using
``{gloss}`` are left out."""

GLOSS_WORDS = 12


def short_gloss(definition: str | None) -> str:
    """The disambiguating gloss of a WordNet definition (see :data:`PROMPT_TEMPLATES`)."""
    text = re.sub(r"\([^)]*\)", "", (definition or "").split(";")[0])
    return " ".join(text.split()[:GLOSS_WORDS]).strip(" ,.:")


def concept_prompts(concept_row: dict) -> list[str]:
    """The prompts of one concept (a ``concepts.parquet`` row: ``lemma``, ``definition``)."""
    lemma = " ".join(str(concept_row["lemma"]).replace("_", " ").split())
    gloss = short_gloss(concept_row.get("definition"))
    article = "an" if lemma[:1].lower() in "aeiou" else "a"
    return [t.format(article=article, lemma=lemma, gloss=gloss)
            for t in PROMPT_TEMPLATES if gloss or "{gloss}" not in t]


def embed_concepts(concepts: pa.Table, loaded: LoadedClip) -> np.ndarray:
    """[n_concepts, D] float32 text embeddings, one per row of ``concepts`` in order: each
    prompt's embedding L2-normalised, averaged over the concept's prompts, re-normalised."""
    prompts = [concept_prompts(row) for row in concepts.select(["lemma", "definition"]).to_pylist()]
    flat = [p for ps in prompts for p in ps]
    step = loaded.cfg.batch_size
    if not flat:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    per_prompt = np.concatenate([
        loaded.encode_texts(loaded.tokenizer(flat[i:i + step])) for i in range(0, len(flat), step)
    ])
    out = np.empty((len(prompts), per_prompt.shape[1]), dtype=np.float32)
    start = 0
    for i, ps in enumerate(prompts):
        mean = per_prompt[start:start + len(ps)].astype(np.float64).mean(axis=0)
        out[i] = mean / np.linalg.norm(mean)
        start += len(ps)
    return out
