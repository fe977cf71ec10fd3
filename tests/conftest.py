"""Shared pytest fixtures (append new fixtures below; keep each one's setup small)."""

from __future__ import annotations

import pytest

SLOW_FIXTURES = ("small_corpus", "tiny_build")
"""Fixtures that run real img2dataset over 127.0.0.1 or a full ``daco build``: every test using
one, directly or through another fixture, is marked ``slow`` (``make test-fast`` skips them)."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """An embedded corpus of 80 image-caption pairs (64 match, 8 mismatch, 8 distractor; 12 built-in
    concepts, seed 0) in two img2dataset webdataset shards of 40, built once per test session by
    ``transforms.corpus.build_corpus`` (real img2dataset over 127.0.0.1). Returns its directory
    (a ``pathlib.Path``): ``shards/0000{0,1}.tar|.parquet``, ``corpus_truth.parquet``,
    ``concepts.parquet``, ``urls.parquet``. Read-only: copy before modifying.
    Built through the ``daco corpus`` command, so the command is exercised end to end too."""
    from pipeline.cli import main as daco

    out = tmp_path_factory.mktemp("small_corpus")
    assert daco(["corpus", "--out", str(out), "--n", "80", "--seed", "0", "--shard-size", "40"]) == 0
    return out
# --------------------------------------------------------------------------- directions, writing, publishing (issue 4)

import math as _math
from pathlib import Path as _Path

import numpy as _np
import pytest as _pytest


def planted_activations(seed: int = 0, n_concepts: int = 4, layers=(15, 16), d: int = 16):
    """Activation elements with planted concept directions, and their exact reference.

    Returns (elements, reference): elements follow ``transforms.directions``' input
    contract, ``((concept_id, layer, role), (stimulus_key, float32 vector))``; reference
    maps (concept_id, layer) to (direction float64 computed with math.fsum, n_pos, n_neg).
    Values sit on a large offset (~300) with small and large magnitudes mixed, so
    summation order would show in a naive float32/float64 sum.
    """
    rng = _np.random.default_rng(seed)
    elements, reference = [], {}
    for c in range(n_concepts):
        concept = f"planted{c}.n.01"
        for layer in layers:
            planted = rng.normal(size=d) * (1 + c)
            base = 300.0 + rng.normal(size=d) * 50
            vectors = {}
            for role, sign, n in (("positive", 0.5, 5 + 2 * c), ("negative", -0.5, 6)):
                noise = rng.normal(size=(n, d)) * _np.geomspace(1e-4, 10, d)
                vectors[role] = (base + sign * planted + noise).astype(_np.float32)
                for i, vec in enumerate(vectors[role]):
                    elements.append(((concept, layer, role), (f"{concept}/{role}/{layer}/{i}", vec)))
            means = {role: _np.array([_math.fsum(col) for col in v.astype(_np.float64).T]) / len(v)
                     for role, v in vectors.items()}
            reference[(concept, layer)] = (means["positive"] - means["negative"],
                                           len(vectors["positive"]), len(vectors["negative"]))
    return elements, reference


def _concept_rows(concept_ids):
    return [{"concept_id": cid, "lemma": cid.split(".")[0], "lemmas": [cid.split(".")[0]], "definition": "planted",
             "group": "noun.artifact", "hypernym_path": ["entity.n.01", cid], "depth": 1, "frequency": 1,
             "polarity": "undesirable" if i == 0 else "neutral", "polarity_source": ""}
            for i, cid in enumerate(sorted(concept_ids))]


def _stimuli_rows(concept_ids):
    return [{"concept_id": cid, "key": f"{cid}-{role}-{r}", "caption": f"a {role} photo", "url": f"http://127.0.0.1/{r}.jpg",
             "shard": "00000.tar", "s_img": 0.9, "s_txt": 0.8, "score": 0.5, "role": role, "rank": r}
            for cid in sorted(concept_ids) for role in ("positive", "negative") for r in range(2)]


def build_dataset_folder(out: _Path, elements, untrained: bool = True) -> _Path:
    """A complete output folder (concepts, stimuli, dictionary via the real Beam stages, metadata, card)."""
    import apache_beam as beam
    import pyarrow as pa

    from pipeline.runner import run_pipeline
    from transforms import fileio
    from transforms.concepts import SCHEMA as CONCEPTS_SCHEMA
    from transforms.directions import ComputeDirections
    from transforms.retrieve import SCHEMA as STIMULI_SCHEMA
    from transforms.write import WriteDictionary, write_dataset_card, write_metadata

    concept_ids = sorted({key[0] for key, _value in elements})
    fileio.write_parquet_atomic(str(out / "concepts.parquet"), pa.Table.from_pylist(_concept_rows(concept_ids), schema=CONCEPTS_SCHEMA))
    fileio.write_parquet_atomic(str(out / "stimuli" / "stimuli-00000-of-00001.parquet"),
                                pa.Table.from_pylist(_stimuli_rows(concept_ids), schema=STIMULI_SCHEMA))
    counters = run_pipeline(lambda p: p | beam.Create(elements) | ComputeDirections(str(out)) | WriteDictionary(str(out)))
    layers = sorted({key[1] for key, _value in elements})
    metadata = write_metadata(str(out), {
        "models": {"clip": {"id": "ViT-B-32", "pretrained": None, "untrained": untrained},
                   "mllm": {"id": "Qwen/Qwen2-VL-2B-Instruct", "untrained": False}},
        "layers": layers, "pooling": "mean", "prompt_template": "Describe the image. {caption}",
        "seeds": {"clip": 0, "mllm": 0}, "counts": {"directions_read": counters["directions.read"]}})
    write_dataset_card(str(out), metadata)
    return out


@_pytest.fixture(scope="session")
def dataset_folder(tmp_path_factory) -> _Path:
    """A good output folder (untrained models), built once per session; copy it before changing it."""
    elements, _reference = planted_activations()
    return build_dataset_folder(tmp_path_factory.mktemp("dataset"), elements)


# --------------------------------------------------------------------------- daco build (issues 4, 8)

TINY_BUILD = {
    "concepts": {"roots": ["animal.n.01", "weapon.n.01"], "include_polarity_roots": False, "max_concepts": 12,
                 "prioritise_undesirable": False},
    "corpus": {"n": 72, "seed": 0},
    "clip": {"model_name": "daco-tiny-clip", "pretrained": None, "allow_untrained": True},
    "retrieve": {"k": 3, "n_negatives": 3, "min_positives": 2, "min_evidence": None},
    "mllm": {"family": "qwen2_vl", "untrained_size": {"num_hidden_layers": 3}, "layers": [1, 2], "batch_size": 8},
}


@_pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> _Path:
    """Two `daco build` runs of a tiny embedded configuration (animals and weapons: two WordNet
    groups; untrained models), built once per session: ``a/`` generates its corpus, ``b/`` reads
    a's shards with ``--shards``. Returns the folder holding both. Tests may add files (a report)
    but must not change what the build wrote."""
    import yaml

    from pipeline.cli import main as daco

    root = tmp_path_factory.mktemp("tiny_build")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_BUILD))
    assert daco(["build", "--config", str(config), "--out", str(root / "a")]) == 0
    shards = str(root / "a" / "corpus" / "shards" / "*.tar")
    assert daco(["build", "--config", str(config), "--out", str(root / "b"), "--shards", shards]) == 0
    return root
