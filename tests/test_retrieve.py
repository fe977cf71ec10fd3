"""The retrieval stage on planted synthetic embeddings (clip-retrieval layout), real faiss, real Beam runner."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import run_pipeline
from transforms.retrieve import (
    RECONCILIATION, SCHEMA, STIMULI_RECONCILIATION, RetrieveConfig, RetrieveStimuli, build_index, daco_distance,
    log_similarity, search,
)

D = 64
N_BACKGROUND = 700
PLANTED = 4  # concepts 0..3 get planted pairs; concept 4 gets duplicates; concept 5 gets nothing
BOTH, IMG_ONLY, TXT_ONLY = 5, 5, 5
BASE = {"k": 15, "n_negatives": 10, "candidates": 40, "min_positives": 3, "negative_pool": 300}


def _near(rng, centre, cos):
    """A unit vector at cosine ``cos`` from the unit vector ``centre``."""
    u = rng.standard_normal(len(centre))
    u -= (u @ centre) * centre
    return cos * centre + np.sqrt(1 - cos**2) * u / np.linalg.norm(u)


def _unit(rng, n):
    v = rng.standard_normal((n, D))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_embedding_folder(emb_dir, img, txt, keys, hashes=None, parts=2):
    """Write clip-retrieval's layout: float16 L2-normalised npy parts and metadata parquet parts."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (emb_dir / sub).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(keys), parts + 1).astype(int)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(emb_dir / "img_emb" / f"img_emb_{n}.npy", img[a:b].astype(np.float16))
        np.save(emb_dir / "text_emb" / f"text_emb_{n}.npy", txt[a:b].astype(np.float16))
        columns = {"key": keys[a:b], "caption": [f"caption of {k}" for k in keys[a:b]],
                   "url": [f"http://127.0.0.1/{k}.jpg" for k in keys[a:b]], "shard": [f"{n:05d}.tar"] * (b - a)}
        if hashes is not None:
            columns["sha256"] = hashes[a:b]
        pq.write_table(pa.table(columns), emb_dir / "metadata" / f"metadata_{n}.parquet")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Six orthonormal concepts over 700 background pairs plus planted matches; returns what was planted."""
    rng = np.random.default_rng(7)
    concepts = np.linalg.qr(rng.standard_normal((D, 6)))[0].T  # orthonormal rows
    img, txt = list(_unit(rng, N_BACKGROUND)), list(_unit(rng, N_BACKGROUND))
    keys = [f"bg{i:04d}" for i in range(N_BACKGROUND)]
    hashes = [f"h-bg{i}" for i in range(N_BACKGROUND)]
    truth = {}

    def plant(key, image, caption, digest=None):
        img.append(image)
        txt.append(caption)
        keys.append(key)
        hashes.append(digest or f"h-{key}")

    for c in range(PLANTED):
        both = [f"c{c}-both{j}" for j in range(BOTH)]
        halves = [f"c{c}-img{j}" for j in range(IMG_ONLY)] + [f"c{c}-txt{j}" for j in range(TXT_ONLY)]
        for j, key in enumerate(both):
            plant(key, _near(rng, concepts[c], 0.85 + 0.02 * j), _near(rng, concepts[c], 0.85 + 0.02 * j))
        for key in halves[:IMG_ONLY]:  # the image matches, the caption is unrelated (cosine 0)
            plant(key, _near(rng, concepts[c], 0.97), _near(rng, concepts[c], 0.0))
        for key in halves[IMG_ONLY:]:  # the caption matches, the image is unrelated
            plant(key, _near(rng, concepts[c], 0.0), _near(rng, concepts[c], 0.97))
        truth[c] = (both, halves)
    # concept 4: 'dup' appears twice (the better copy is the second), 'twin-a'/'twin-b' share an image hash
    plant("c4-dup", _near(rng, concepts[4], 0.80), _near(rng, concepts[4], 0.80))
    plant("c4-twin-a", _near(rng, concepts[4], 0.90), _near(rng, concepts[4], 0.90), digest="same-image")
    plant("c4-twin-b", _near(rng, concepts[4], 0.88), _near(rng, concepts[4], 0.88), digest="same-image")
    plant("c4-dup", _near(rng, concepts[4], 0.95), _near(rng, concepts[4], 0.95))
    for j in range(3):
        plant(f"c4-other{j}", _near(rng, concepts[4], 0.7), _near(rng, concepts[4], 0.7))
    # shuffle so that planted pairs are spread over both parts
    perm = rng.permutation(len(keys))
    emb_dir = tmp_path_factory.mktemp("planted") / "embeddings"
    write_embedding_folder(emb_dir, np.array(img)[perm], np.array(txt)[perm],
                           [keys[i] for i in perm], [hashes[i] for i in perm])
    ids = [f"concept{c}.n.01" for c in range(6)]
    return {"emb_dir": str(emb_dir), "concepts": concepts.astype(np.float32), "ids": ids, "truth": truth}


def _retrieve(planted, out, concepts=None, **options):
    cfg = RetrieveConfig.from_dict({**BASE, **options})
    emb = planted["concepts"] if concepts is None else concepts
    counters = run_pipeline(lambda p: p | RetrieveStimuli(str(out), planted["emb_dir"], emb, planted["ids"], cfg))
    rows = pq.ParquetDataset(str(out / "stimuli")).read().to_pylist() if (out / "stimuli").exists() else []
    dead = [json.loads(line) for line in (out / "deadletter" / "retrieve.jsonl").read_text().splitlines()]
    return rows, counters, dead


def _by_concept(rows, role):
    out = {}
    for r in rows:
        if r["role"] == role:
            out.setdefault(r["concept_id"], []).append(r)
    return {c: sorted(rs, key=lambda r: r["rank"]) for c, rs in out.items()}


@pytest.fixture(scope="module")
def exact_run(planted, tmp_path_factory):
    return _retrieve(planted, tmp_path_factory.mktemp("exact"), max_score=0.9)


def test_positives_match_in_image_and_caption(exact_run, planted):
    rows, _counters, _dead = exact_run
    positives = _by_concept(rows, "positive")
    for c in range(PLANTED):
        both, _halves = planted["truth"][c]
        got = [r["key"] for r in positives[planted["ids"][c]]]
        # a pair matching only one half (cosine 0.97 there, 0 in the other) is no evidence
        assert set(got) == set(both)
        assert [r["rank"] for r in positives[planted["ids"][c]]] == list(range(len(got)))


def test_cosine01_without_the_evidence_test_ranks_half_matches_after_full_matches(planted, tmp_path):
    rows, _counters, _dead = _retrieve(planted, tmp_path, max_score=0.9, min_evidence=None, similarity="cosine01")
    positives = _by_concept(rows, "positive")
    for c in range(PLANTED):
        both, halves = planted["truth"][c]
        got = [r["key"] for r in positives[planted["ids"][c]]]
        assert set(got) == set(both) | set(halves)
        assert set(got[:BOTH]) == set(both)


def test_rows_have_design_columns_and_daco_scores(exact_run):
    rows, _counters, _dead = exact_run
    assert list(rows[0]) == SCHEMA.names
    for r in rows:
        assert 0 < r["s_img"] <= 1 and 0 < r["s_txt"] <= 1
        expected = np.sqrt(-(np.log(r["s_img"]) + np.log(r["s_txt"])))
        # s is stored as float32: near 1 it rounds to 1 while the float64 score stays > 0
        assert r["score"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    for rs in _by_concept(rows, "positive").values():
        scores = [r["score"] for r in rs]
        assert scores == sorted(scores)


def test_negatives_are_far_disjoint_from_positives_and_seeded(exact_run, planted, tmp_path):
    rows, counters, _dead = exact_run
    positives, negatives = _by_concept(rows, "positive"), _by_concept(rows, "negative")
    for cid, neg in negatives.items():
        assert len(neg) == BASE["n_negatives"]
        assert not {r["key"] for r in neg} & {r["key"] for r in positives[cid]}
        assert min(r["score"] for r in neg) > max(r["score"] for r in positives[cid])
    assert counters["retrieve.negatives"] == BASE["n_negatives"] * len(negatives)
    other, _, _ = _retrieve(planted, tmp_path, max_score=0.9, seed=1)
    # the calibration uses the seeded pool, so scores move with the seed; the positives do not
    keys = lambda by: {c: {r["key"] for r in rs} for c, rs in by.items()}  # noqa: E731
    assert keys(_by_concept(other, "positive")) == keys(positives)
    cid = planted["ids"][0]
    assert {r["key"] for r in _by_concept(other, "negative")[cid]} != {r["key"] for r in negatives[cid]}


def test_duplicate_keys_and_images_keep_the_best_occurrence(exact_run, planted):
    rows, counters, _dead = exact_run
    got = [r["key"] for r in _by_concept(rows, "positive")[planted["ids"][4]]]
    # 'c4-dup' once (its better copy first), one of the twins (the better, 'a'), then the others
    assert got[:2] == ["c4-dup", "c4-twin-a"]
    assert "c4-twin-b" not in got and len(got) == len(set(got))
    assert counters["retrieve.dedup_key"] >= 1 and counters["retrieve.dedup_image"] >= 1


def test_concept_without_matches_is_dead_lettered_and_counts_reconcile(exact_run, planted):
    rows, counters, dead = exact_run
    dropped = planted["ids"][5]
    assert dropped not in {r["concept_id"] for r in rows}
    assert [(d["key"], d["reason"]) for d in dead] == [(dropped, "absent")]
    assert "min_positives is 3" in dead[0]["detail"] and "image AND caption" in dead[0]["detail"]
    assert counters["retrieve.concepts_read"] == 6 and counters["retrieve.concepts_kept"] == 5
    assert counters["retrieve.deadletter_absent"] == 1
    assert RECONCILIATION.check(counters)[0] and STIMULI_RECONCILIATION.check(counters)[0]
    assert counters["retrieve.stimuli_written"] == len(rows)


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_index_gives_the_exact_top_results(exact_run, planted, tmp_path, ann):
    rows, counters, _dead = _retrieve(planted, tmp_path, max_score=0.9, exact_max=100, ann=ann, nlist=16, nprobe=4)
    exact = _by_concept(exact_run[0], "positive")
    assert {c: [r["key"] for r in rs] for c, rs in _by_concept(rows, "positive").items()} == \
        {c: [r["key"] for r in rs] for c, rs in exact.items()}


def test_two_runs_write_byte_identical_stimuli_and_stale_parts_go(planted, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _retrieve(planted, first, concepts_per_batch=2)
    _retrieve(planted, second, concepts_per_batch=2)
    names = sorted(p.name for p in (first / "stimuli").iterdir())
    assert names == [f"stimuli-{i:05d}-of-00003.parquet" for i in range(3)]
    for name in names:
        assert (first / "stimuli" / name).read_bytes() == (second / "stimuli" / name).read_bytes()
    # a rerun with another batching gives the same rows and removes the earlier parts
    rows, _, _ = _retrieve(planted, first, concepts_per_batch=4)
    assert sorted(p.name for p in (first / "stimuli").iterdir()) == [f"stimuli-{i:05d}-of-00002.parquet" for i in range(2)]
    assert rows == pq.ParquetDataset(str(second / "stimuli")).read().to_pylist()


def test_bad_concept_embedding_is_dead_lettered(planted, tmp_path):
    concepts = planted["concepts"].copy()
    concepts[2] = 0
    rows, counters, dead = _retrieve(planted, tmp_path, concepts=concepts)
    assert {(d["key"], d["reason"]) for d in dead} == {(planted["ids"][2], "bad_embedding"),
                                                        (planted["ids"][5], "absent")}
    assert planted["ids"][2] not in {r["concept_id"] for r in rows}
    assert RECONCILIATION.check(counters)[0]


def test_softmax_similarity_finds_the_planted_pairs(planted, tmp_path):
    rows, _counters, _dead = _retrieve(planted, tmp_path, similarity="softmax", temperature=0.05, k=5)
    positives = _by_concept(rows, "positive")
    for c in range(PLANTED):
        assert {r["key"] for r in positives[planted["ids"][c]]} == set(planted["truth"][c][0])


def test_calibration_is_robust_to_the_concepts_own_matches():
    from transforms.retrieve import calibration

    rng = np.random.default_rng(0)
    random_pairs = rng.normal(0.0, 0.1, 1000)
    centre, scale = calibration(np.concatenate([random_pairs, np.full(100, 0.9)]))  # 9% true matches
    assert abs(centre) < 0.02 and scale == pytest.approx(0.1, rel=0.2)


def test_similarity_mapping_and_distance():
    cfg = RetrieveConfig(similarity="cosine01")
    logs = log_similarity(np.array([1.0, 0.0, -1.0]), cfg)
    assert np.exp(logs) == pytest.approx([1.0, 0.5, 1e-6])
    assert daco_distance(np.log(0.5), np.log(0.5)) == pytest.approx(np.sqrt(2 * np.log(2)))
    # calibrated: Phi of the z against the concept's random pairs (centre 0.1, scale 0.05 here)
    calibrated = np.exp(log_similarity(np.array([0.1, 0.2]), RetrieveConfig(), calibration=(0.1, 0.05)))
    assert calibrated == pytest.approx([0.5, 0.97725], abs=1e-5)


def test_calibration_makes_the_and_real():
    """cosine01 scores a pair whose image does not match (cos 0.05) almost like one matching both
    halves moderately; calibrated against random pairs (centre 0, scale 0.1) it is far behind."""
    def dist(cfg, cos_img, cos_txt):
        calib = (0.0, 0.1)
        return float(daco_distance(log_similarity(np.array(cos_img), cfg, calibration=calib),
                                   log_similarity(np.array(cos_txt), cfg, calibration=calib)))

    for name, ratio in (("cosine01", 1.2), ("calibrated", 100)):
        cfg = RetrieveConfig(similarity=name)
        one_half, both = dist(cfg, 0.05, 0.9), dist(cfg, 0.5, 0.5)
        assert both < one_half
        assert (one_half / both < ratio) if name == "cosine01" else (one_half / both > ratio)


def test_ivf_index_recall_on_clusters():
    rng = np.random.default_rng(0)
    centres = _unit(rng, 20)
    x = centres[rng.integers(0, 20, 4000)] + 0.1 * rng.standard_normal((4000, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = RetrieveConfig.from_dict({"exact_max": 1000, "nlist": 32, "nprobe": 8})
    exact = search(build_index(x, cfg, kind="flat"), centres, 50)
    approx = search(build_index(x, cfg), centres, 50)
    recall = np.mean([len(set(a) & set(e)) / 50 for a, e in zip(approx, exact)])
    assert recall >= 0.95


@pytest.mark.parametrize("bad, message", [
    ({"kk": 3}, "unknown option"), ({"k": 0}, "k must be >= 1"), ({"similarity": "dot"}, "similarity"),
    ({"min_positives": 40}, "cannot exceed k"), ({"ann": "pq"}, "ann must be"), ({"use_gpu": True}, "use_gpu"),
])
def test_config_rejects_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        RetrieveConfig.from_dict(bad)


def test_mismatched_folder_is_reported_with_the_file(planted, tmp_path):
    emb = tmp_path / "embeddings"
    rng = np.random.default_rng(0)
    write_embedding_folder(emb, _unit(rng, 10), _unit(rng, 10), [f"k{i}" for i in range(10)])
    (emb / "text_emb" / "text_emb_1.npy").unlink()
    cfg = RetrieveConfig.from_dict(BASE)
    with pytest.raises(Exception, match="text_emb_1.npy: missing"):
        run_pipeline(lambda p: p | RetrieveStimuli(str(tmp_path), str(emb), planted["concepts"], planted["ids"], cfg))


# ---------------------------------------------------------------- the daco retrieve command

CLI_OPTIONS = ["--demo-clip", "--k", "5", "--n-negatives", "5", "--candidates", "20", "--min-positives", "2"]


def _cli(*argv):
    from pipeline.cli import main

    return main(["retrieve", *map(str, argv), *CLI_OPTIONS])


def test_cli_supplied_embeddings_give_the_same_stimuli_as_computing_them(small_corpus, tmp_path):
    concepts = small_corpus / "concepts.parquet"
    # the random-weight CLIP has no evidence for any concept: the evidence test is off
    off = ("--min-evidence", "none")
    assert _cli("--concepts", concepts, "--shards", small_corpus / "shards" / "*.tar", "--out", tmp_path / "a", *off) == 0
    assert _cli("--concepts", concepts, "--embeddings", tmp_path / "a" / "embeddings", "--out", tmp_path / "b", *off) == 0
    part = "stimuli/stimuli-00000-of-00001.parquet"
    assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes()
    table = pq.read_table(tmp_path / "a" / part)
    truth = pq.read_table(small_corpus / "corpus_truth.parquet").to_pylist()
    n_concepts = pq.read_table(concepts).num_rows
    assert table.num_rows == n_concepts * 10
    assert set(table.column("key").to_pylist()) <= {t["key"] for t in truth}
    provenance = json.loads(table.schema.metadata[b"daco"])
    assert provenance["untrained"] is True and provenance["clip"]["model_name"] == "daco-tiny-clip"


def test_cli_rejects_embeddings_of_another_dimension_before_running(planted, tmp_path):
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb32"
    vectors = rng.standard_normal((8, 32))
    write_embedding_folder(emb, vectors, vectors, [f"k{i}" for i in range(8)], parts=1)
    concepts = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"concept_id": ["dog.n.01"], "lemma": ["dog"], "definition": ["a dog"]}), concepts)
    with pytest.raises(SystemExit, match="dimension 32 but CLIP daco-tiny-clip embeds concepts in 64"):
        _cli("--concepts", concepts, "--embeddings", emb, "--out", tmp_path / "out")
    with pytest.raises(SystemExit, match="--shards is required"):
        _cli("--concepts", concepts, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(hasattr(__import__("faiss"), "StandardGpuResources"), reason="faiss-gpu is installed")
def test_use_gpu_yes_without_faiss_gpu_says_how_to_fix():
    cfg = RetrieveConfig.from_dict({"use_gpu": "yes"})
    with pytest.raises(RuntimeError, match="install faiss-gpu"):
        build_index(np.eye(4, dtype=np.float32), cfg)


# --------------------------------------------------------------------------- evidence and replacement (issue 15)


@pytest.fixture(scope="module")
def half_present(tmp_path_factory):
    """Ten orthonormal concepts ranked 0..9, target 6 (ranks 6-9 are the reserve). Concepts
    0, 2, 4, 6, 7, 8 have pairs matching in image and caption; 1 and 5 have nothing, 3 only
    caption matches and 9 only image matches."""
    rng = np.random.default_rng(11)
    concepts = np.linalg.qr(rng.standard_normal((D, 10)))[0].T
    img, txt = list(_unit(rng, 600)), list(_unit(rng, 600))
    keys = [f"bg{i:04d}" for i in range(600)]
    present = [0, 2, 4, 6, 7, 8]
    for c in present:
        for j in range(6):
            img.append(_near(rng, concepts[c], 0.8))
            txt.append(_near(rng, concepts[c], 0.8))
            keys.append(f"c{c}-both{j}")
    for c, (ci, ct) in ((3, (0.0, 0.95)), (9, (0.95, 0.0))):
        for j in range(6):
            img.append(_near(rng, concepts[c], ci))
            txt.append(_near(rng, concepts[c], ct))
            keys.append(f"c{c}-half{j}")
    emb_dir = tmp_path_factory.mktemp("half") / "embeddings"
    write_embedding_folder(emb_dir, np.array(img), np.array(txt), keys)
    ids = [f"rank{c}.n.01" for c in range(10)]
    order = rng.permutation(10)  # the concepts file is not in rank order
    return {"emb_dir": str(emb_dir), "concepts": concepts[order].astype(np.float32), "ids": [ids[i] for i in order],
            "ranks": [int(i) for i in order], "present": {ids[c] for c in present}, "all": ids}


def test_absent_half_is_dead_lettered_and_replaced_from_the_reserve(half_present, tmp_path):
    from transforms.retrieve import RECONCILIATION

    cfg = RetrieveConfig.from_dict({**BASE, "k": 5, "min_positives": 4})
    hp = half_present
    counters = run_pipeline(lambda p: p | RetrieveStimuli(str(tmp_path), hp["emb_dir"], hp["concepts"], hp["ids"],
                                                          cfg, ranks=hp["ranks"], target=6))
    rows = pq.ParquetDataset(str(tmp_path / "stimuli")).read().to_pylist()
    dead = [json.loads(line) for line in (tmp_path / "deadletter" / "retrieve.jsonl").read_text().splitlines()]
    ids = hp["all"]
    # the present half is kept: ranks 0, 2, 4 and, in the absent ones' places, reserve ranks 6, 7, 8
    assert {r["concept_id"] for r in rows} == hp["present"]
    for cid in hp["present"]:
        assert {r["key"] for r in rows if r["concept_id"] == cid and r["role"] == "positive"} <= {
            f"c{cid[4]}-both{j}" for j in range(6)}
    # the absent half (no pairs, or pairs matching only one half) is dead-lettered as absent
    assert sorted((d["key"], d["reason"]) for d in dead) == [(ids[c], "absent") for c in (1, 3, 5, 9)]
    assert counters["retrieve.concepts_kept"] == 6 and counters["retrieve.concepts_replacements"] == 3
    assert counters["retrieve.deadletter_absent"] == 4 and counters["retrieve.concepts_reserve_unused"] == 0
    assert RECONCILIATION.check(counters)[0] and STIMULI_RECONCILIATION.check(counters)[0]
    evidence = {r["concept_id"]: r for r in pq.read_table(tmp_path / "retrieve_evidence.parquet").to_pylist()}
    assert [evidence[ids[c]]["status"] for c in range(10)] == ["kept", "absent"] * 2 + [
        "kept", "absent", "kept", "kept", "kept", "absent"]
    assert [evidence[ids[c]]["reserve"] for c in range(10)] == [False] * 6 + [True] * 4
    assert evidence[ids[0]]["n_evidence"] >= 6 and evidence[ids[1]]["n_evidence"] == 0
    assert evidence[ids[3]]["best_z_txt"] > 5 > evidence[ids[3]]["n_evidence"]


def test_present_reserve_beyond_the_target_is_unused(half_present, tmp_path):
    cfg = RetrieveConfig.from_dict({**BASE, "k": 5, "min_positives": 4})
    hp = half_present
    counters = run_pipeline(lambda p: p | RetrieveStimuli(str(tmp_path), hp["emb_dir"], hp["concepts"], hp["ids"],
                                                          cfg, ranks=hp["ranks"], target=4))
    rows = pq.ParquetDataset(str(tmp_path / "stimuli")).read().to_pylist()
    assert {r["concept_id"] for r in rows} == {hp["all"][c] for c in (0, 2, 4, 6)}
    assert counters["retrieve.concepts_reserve_unused"] == 2 and counters["retrieve.concepts_replacements"] == 2
    assert RECONCILIATION.check(counters)[0]
