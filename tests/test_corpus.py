"""The embedded corpus: real img2dataset shards over 127.0.0.1, ground truth, determinism, concepts."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.cli import main as daco
from transforms.corpus import (
    BUILTIN_CONCEPTS, MIN_IMAGES_PER_CONCEPT, builtin_concepts, load_concepts, plan_corpus, render_pair, truth_table,
)


def truth_rows(corpus) -> list[dict]:
    return pq.read_table(corpus / "corpus_truth.parquet").to_pylist()


def test_corpus_is_in_img2dataset_webdataset_layout(small_corpus):
    shards = small_corpus / "shards"
    for name in ("00000", "00001"):
        assert (shards / f"{name}.tar").is_file() and (shards / f"{name}_stats.json").is_file()
        table = pq.read_table(shards / f"{name}.parquet")
        assert set(table.column("status").to_pylist()) == {"success"}
        assert {"key", "url", "caption", "sha256", "width", "height"} <= set(table.column_names)
    truth = {r["key"]: r for r in truth_rows(small_corpus)}

    samples = list(wds.WebDataset([str(shards / "00000.tar"), str(shards / "00001.tar")], shardshuffle=False))
    assert len(samples) == len(truth) == 80
    for sample in samples:
        t = truth[sample["__key__"]]
        assert sample["txt"].decode() == t["caption"]
        assert json.loads(sample["json"])["url"] == t["url"]
        assert hashlib.sha256(sample["jpg"]).hexdigest() == t["sha256"]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
    assert all(t["url"].startswith("http://127.0.0.1:") for t in truth.values())
    with tarfile.open(shards / "00001.tar") as tar:
        assert len(tar.getnames()) == 3 * 40


def test_truth_names_what_each_pair_shows_and_says(small_corpus):
    rows = truth_rows(small_corpus)
    concepts = pq.read_table(small_corpus / "concepts.parquet").to_pylist()
    lemma = {c["concept_id"]: c["lemma"] for c in concepts}
    words = {w for c in concepts for l in c["lemmas"] for w in l.lower().split()}
    kinds = [r["kind"] for r in rows]
    assert (kinds.count("match"), kinds.count("mismatch"), kinds.count("distractor")) == (64, 8, 8)
    for r in rows:
        if r["kind"] == "match":
            assert r["image_concept_id"] == r["caption_concept_id"]
        elif r["kind"] == "mismatch":
            assert r["image_concept_id"] != r["caption_concept_id"] and r["image_concept_id"] in lemma
        else:
            assert r["image_concept_id"] is None and r["caption_concept_id"] is None
            assert not words & set(r["caption"].split())
        if r["caption_concept_id"]:
            assert lemma[r["caption_concept_id"]] in r["caption"]
    per_concept = {cid: sum(r["kind"] == "match" and r["image_concept_id"] == cid for r in rows) for cid in lemma}
    assert len(per_concept) == 12 and min(per_concept.values()) >= MIN_IMAGES_PER_CONCEPT


def test_images_of_a_concept_look_alike(small_corpus):
    """Nearest concept centroid in pixel space recovers the concept an image shows (mismatches
    included: the image, not the caption, decides)."""
    pixels = {}
    for name in ("00000", "00001"):
        with tarfile.open(small_corpus / "shards" / f"{name}.tar") as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                    pixels[m.name[:-4]] = np.asarray(img, np.float32).ravel()
    rows = [r for r in truth_rows(small_corpus) if r["kind"] != "distractor"]
    ids = sorted({r["image_concept_id"] for r in rows})
    centroids = np.stack([np.mean([pixels[r["key"]] for r in rows if r["kind"] == "match" and r["image_concept_id"] == c], 0)
                          for c in ids])
    hits = [ids[int(np.argmin(((centroids - pixels[r["key"]]) ** 2).sum(1)))] == r["image_concept_id"] for r in rows]
    assert np.mean(hits) >= 0.95


def test_same_seed_same_corpus(small_corpus):
    concepts = load_concepts(str(small_corpus / "concepts.parquet"))
    drawn_a, pairs_a = plan_corpus(concepts, 40, seed=3)
    drawn_b, pairs_b = plan_corpus(concepts, 40, seed=3)
    _, pairs_c = plan_corpus(concepts, 40, seed=4)
    assert pairs_a == pairs_b and drawn_a.equals(drawn_b)
    assert [render_pair(p, 3, 64) for p in pairs_a] == [render_pair(p, 3, 64) for p in pairs_b]
    assert [p.caption for p in pairs_a] != [p.caption for p in pairs_c]
    # The shards hold exactly the rendered bytes (img2dataset does not re-encode them).
    builtin = builtin_concepts()
    _, pairs = plan_corpus(builtin, 80, seed=0)
    by_id = {r["image_id"]: r for r in truth_rows(small_corpus)}
    for p in pairs[:10]:
        assert hashlib.sha256(render_pair(p, 0, 64)).hexdigest() == by_id[p.image_id]["sha256"]
        assert by_id[p.image_id]["caption"] == p.caption


def test_builtin_concepts_are_wordnet_synsets():
    table = builtin_concepts()
    assert table.column("concept_id").to_pylist() == list(BUILTIN_CONCEPTS)
    rows = {r["concept_id"]: r for r in table.to_pylist()}
    assert len(rows) >= 50 and all(r["definition"] for r in rows.values())
    assert rows["dog.n.01"]["lemma"] == "dog" and rows["rifle.n.01"]["polarity"] == "undesirable"


def test_concepts_file(tmp_path):
    path = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"concept_id": ["cat.n.01", "dog.n.01", "car.n.01"],
                             "lemma": ["cat", "dog", "car"]}), path)
    drawn, pairs = plan_corpus(load_concepts(str(path)), 30, seed=1)
    assert drawn.column("concept_id").to_pylist() == ["car.n.01", "cat.n.01", "dog.n.01"]
    for p in pairs:
        if p.caption_concept_id:
            assert p.caption_concept_id.split(".")[0] in p.caption

    with pytest.raises(ValueError, match="does not exist.*daco concepts"):
        load_concepts(str(tmp_path / "missing.parquet"))
    pq.write_table(pa.table({"concept_id": ["cat.n.01"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['lemma'\]"):
        load_concepts(str(tmp_path / "bad.parquet"))


def test_daco_corpus_command_errors(tmp_path):
    """The success path of ``daco corpus`` is the small_corpus fixture; bad options fail before any work."""
    with pytest.raises(SystemExit, match="--n must be >= 1"):
        daco(["corpus", "--out", str(tmp_path / "a"), "--n", "0"])
    with pytest.raises(SystemExit, match="missing.parquet does not exist"):
        daco(["corpus", "--out", str(tmp_path / "b"), "--concepts", str(tmp_path / "missing.parquet")])
    with pytest.raises(SystemExit, match="local directory"):
        daco(["corpus", "--out", "gs://bucket/corpus", "--n", "10"])
    assert not any(tmp_path.iterdir())


def test_img2dataset_leaves_no_signal_handler_behind(small_corpus):
    handler = signal.getsignal(signal.SIGINT)
    assert getattr(handler, "__module__", "") != "img2dataset.main"


def test_truth_joins_img2dataset_keys_by_url_and_fails_on_a_missing_image():
    concepts = pa.table({"concept_id": ["cat.n.01"], "lemma": ["cat"], "lemmas": [["cat", "true cat"]]})
    _, pairs = plan_corpus(concepts, 3, seed=0)
    base = "http://127.0.0.1:9"
    shard = pa.table({
        "key": ["002", "000", "001"], "url": [f"{base}/{p.image_id}.jpg" for p in pairs],
        "status": ["success", "success", "failed_to_download"], "error_message": [None, None, "timed out"],
        "sha256": ["a", "b", None],
    })
    with pytest.raises(RuntimeError, match=r"did not fetch 1 of 3 .*000002.jpg: failed_to_download \(timed out\)"):
        truth_table(pairs, base, [("00000", shard)])
    fixed = shard.set_column(2, "status", pa.array(["success"] * 3))
    truth = truth_table(pairs, base, [("00000", fixed)]).to_pylist()
    assert [r["key"] for r in truth] == ["000", "001", "002"]
    assert [r["image_id"] for r in truth] == ["000001", "000002", "000000"]
    assert all(r["caption"] == pairs[int(r["image_id"])].caption and r["kind"] == "match" for r in truth)
