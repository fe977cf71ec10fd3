"""The activation stage against hostile input: keys reused across shards, one (shard, key) holding
two different records, a caption far longer than any prompt, a stimulus naming no record.
Each is counted and dead-lettered or joined right; nothing mixes and nothing stalls."""

from __future__ import annotations

import io
import json

import apache_beam as beam
import numpy as np
import pytest
from PIL import Image

from pipeline.runner import run_pipeline
from transforms.activations import RECONCILIATION, ComputeActivations, MLLMConfig, load_mllm, pooled_activations

CFG = MLLMConfig(family="qwen2_vl", untrained_size={"num_hidden_layers": 2}, layers=[1], batch_size=4, max_tokens=64)
LONG = "word " * 60_000  # 300,000 characters: far above the cap, never run through the model


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


def _record(shard, key, color, caption):
    return {"shard": shard, "key": key, "caption": caption, "url": f"http://127.0.0.1/{key}.jpg",
            "jpg": _jpeg(color), "sha256": ""}


RECORDS = [
    _record("00000", "k1", (250, 0, 0), "a red square"),      # k1 again in another shard (a second img2dataset run)
    _record("00001", "k1", (0, 0, 250), "a blue square"),
    _record("00000", "k2", (0, 250, 0), "a green square"),    # two different records under one (shard, key)
    _record("00000", "k2", (250, 250, 0), "a yellow square"),
    _record("00000", "k4", (9, 9, 9), "a dark square"),       # the same record twice: kept once
    _record("00000", "k4", (9, 9, 9), "a dark square"),
    _record("00000", "k3", (0, 0, 0), LONG),
]
STIMULI = [("red.n.01", "positive", "00000", "k1"), ("blue.n.01", "positive", "00001", "k1"),
           ("red.n.01", "negative", "00000", "k2"), ("blue.n.01", "negative", "00000", "k3"),
           ("blue.n.01", "negative", "00000", "k4"), ("red.n.01", "positive", "00001", "k9")]


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    out = tmp_path_factory.mktemp("activations")
    rows = [{"concept_id": c, "role": r, "shard": s, "key": k} for c, r, s, k in STIMULI]

    def graph(p):
        inputs = {"records": p | "Records" >> beam.Create(RECORDS), "stimuli": p | "Stimuli" >> beam.Create(rows)}
        vectors = inputs | ComputeActivations(str(out), CFG)
        vectors | beam.combiners.ToList() | beam.Map(_save, str(out / "vectors.npz"))

    counters = run_pipeline(graph)
    with np.load(out / "vectors.npz") as saved:
        found = {tuple(name.split("|")): saved[name] for name in saved.files}
    return out, counters, found


def _save(elements, path):
    np.savez(path, **{f"{concept}|{role}": vec for (concept, _layer, role), (_key, vec) in elements})


def test_keys_join_with_their_shard_and_duplicates_are_counted_not_mixed(activations):
    out, counters, found = activations
    get = lambda name: counters.get(f"activations.{name}", 0)  # noqa: E731
    assert (get("stimuli"), get("stimuli_emitted"), get("images")) == (6, 3, 4)  # k3 reaches the model stage
    assert (get("duplicate_records"), get("deadletter_ambiguous_record"), get("deadletter_missing_record"),
            get("deadletter_too_long"), get("deadletter_inference")) == (2, 1, 1, 1, 0)
    assert RECONCILIATION.check(counters)[0]
    dead = [json.loads(line) for line in (out / "deadletter" / "activations.jsonl").read_text().splitlines()]
    assert sorted((d["reason"], d["source"], d["key"]) for d in dead) == [
        ("ambiguous_record", "00000", "k2"), ("missing_record", "00001", "k9"), ("too_long", "00000", "k3")]

    model, processor, adapter = load_mllm(CFG)
    alone = {color: pooled_activations(model, processor, adapter, CFG, [(_jpeg(rgb), caption)])[0][1]
             for color, rgb, caption in (("red", (250, 0, 0), "a red square"), ("blue", (0, 0, 250), "a blue square"))}
    vectors = found
    assert set(vectors) == {("red.n.01", "positive"), ("blue.n.01", "positive"), ("blue.n.01", "negative")}
    for concept, own, other in (("red.n.01", "red", "blue"), ("blue.n.01", "blue", "red")):
        vec = vectors[(concept, "positive")]
        assert np.linalg.norm(vec - alone[own]) < 0.1 * np.linalg.norm(vec - alone[other])


def test_token_cap_defaults_to_the_context_and_refuses_more(tmp_path):
    from transforms.activations import DEFAULT_MAX_TOKENS, check_model

    info = check_model(MLLMConfig(family="qwen2_vl", untrained_size={"num_hidden_layers": 2}, layers=[1]))
    assert info["max_tokens"] == min(DEFAULT_MAX_TOKENS, 512)  # the tiny model's context is 512
    with pytest.raises(ValueError, match="max_tokens: 100000 is above the model's context of 512"):
        check_model(MLLMConfig(family="qwen2_vl", untrained_size={"num_hidden_layers": 2}, layers=[1], max_tokens=100_000))
