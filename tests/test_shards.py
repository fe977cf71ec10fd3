"""ReadShards over real img2dataset shards, run by the local Beam runner; damaged shards dead-lettered."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.runner import run_pipeline
from transforms.shards import (
    RECONCILIATION, Dead, ReadShards, ShardsNotFound, iter_shard, iter_tar_groups, match_shards,
)


def _summary(record: dict) -> str:
    Image.open(io.BytesIO(record["jpg"])).load()  # every kept image decodes
    return json.dumps({
        "key": record["key"], "shard": record["shard"], "caption": record["caption"], "url": record["url"],
        "sha256": record["sha256"], "jpg_sha256": hashlib.sha256(record["jpg"]).hexdigest(),
    }, sort_keys=True)


def read_with_beam(pattern, out: Path) -> tuple[list[dict], dict[str, int], list[dict]]:
    """(records, counters, dead letters) of ReadShards run by the local runner."""

    def build(p):
        (p | ReadShards(pattern, str(out))
           | beam.Map(_summary)
           | beam.io.WriteToText(str(out / "records"), file_name_suffix=".jsonl", shard_name_template=""))

    counters = run_pipeline(build)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    dead_text = (out / "deadletter" / "shards.jsonl").read_text()
    return records, counters, [json.loads(line) for line in dead_text.splitlines()]


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_read_shards_returns_every_record(small_corpus, tmp_path):
    truth = {r["key"]: r for r in pq.read_table(small_corpus / "corpus_truth.parquet").to_pylist()}
    records, counters, dead = read_with_beam(str(small_corpus / "shards" / "*.tar"), tmp_path)

    assert len(records) == len(truth) == 80
    assert {r["key"] for r in records} == set(truth)
    for r in records:
        t = truth[r["key"]]
        assert (r["shard"], r["caption"], r["url"], r["sha256"]) == (t["shard"], t["caption"], t["url"], t["sha256"])
        assert r["jpg_sha256"] == r["sha256"]
    assert dead == []
    assert counters["shards.read"] == counters["shards.kept"] == 80
    assert counters["shards.shards_read"] == 2
    assert RECONCILIATION.check(counters)[0]


def _rewrite_with_bad_records(src: Path, dst: Path) -> dict[str, str]:
    """Copy a shard, spoiling four records; returns {key: expected reason}."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    spoil = {keys[1]: "undecodable_image", keys[5]: "empty_caption", keys[9]: "caption_not_utf8",
             keys[13]: "missing_caption"}
    with tarfile.open(dst, "w") as out:
        for member, data in members:
            key, ext = member.name.split(".", 1)
            reason = spoil.get(key)
            if reason == "undecodable_image" and ext == "jpg":
                data = b"\xff\xd8\xff\xe0 this is not a jpeg"
            elif reason == "empty_caption" and ext == "txt":
                data = b"  \n"
            elif reason == "caption_not_utf8" and ext == "txt":
                data = b"a photo of a \xff\xfe dog"
            elif reason == "missing_caption" and ext == "txt":
                continue
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return spoil


def test_damaged_shards_are_dead_lettered_and_counted(small_corpus, tmp_path):
    src = small_corpus / "shards"
    shards = tmp_path / "shards"
    shards.mkdir()
    truth = {r["key"]: r for r in pq.read_table(small_corpus / "corpus_truth.parquet").to_pylist()}

    # 00000: four bad records in a sound tar.
    spoilt = _rewrite_with_bad_records(src / "00000.tar", shards / "00000.tar")
    shutil.copy(src / "00000.parquet", shards / "00000.parquet")
    # 00001: cut in the middle of a member's data; the sibling parquet names what is lost.
    members = tar_members(src / "00001.tar")
    cut = members[40].offset_data + 100
    (shards / "00001.tar").write_bytes((src / "00001.tar").read_bytes()[:cut])
    shutil.copy(src / "00001.parquet", shards / "00001.parquet")
    # 00002: cut exactly at a member boundary, no parquet (tarfile alone would stop there silently).
    boundary = members[60].offset
    (shards / "00002.tar").write_bytes((src / "00001.tar").read_bytes()[:boundary])
    with tarfile.open(shards / "00002.tar") as tar:
        assert len(tar.getmembers()) == 60  # the silent-loss case this reader must catch

    out = tmp_path / "out"
    records, counters, dead = read_with_beam(str(shards), out)
    by_shard = {s: [r for r in records if r["shard"] == s] for s in ("00000", "00001", "00002")}
    dead_by_shard = {s: [d for d in dead if Path(d["source"]).stem == s] for s in by_shard}

    # Bad records: each dead-lettered with its reason; the other 36 kept with their captions.
    assert {d["key"]: d["reason"] for d in dead_by_shard["00000"]} == spoilt
    assert all(d["stage"] == "shards" and d["source"].endswith("00000.tar") for d in dead_by_shard["00000"])
    assert len(by_shard["00000"]) == 36
    assert all(truth[r["key"]]["caption"] == r["caption"] for r in records)

    # Truncated with a parquet: the records before the cut are kept, every other key is dead-lettered.
    kept1 = {r["key"] for r in by_shard["00001"]}
    lost1 = {d["key"] for d in dead_by_shard["00001"]}
    order1 = [m.name.split(".")[0] for m in members if m.name.endswith(".jpg")]
    assert 0 < len(kept1) < 40 and kept1 == set(order1[: len(kept1)])
    assert kept1 | lost1 == set(order1) and not kept1 & lost1
    assert {d["reason"] for d in dead_by_shard["00001"]} == {"corrupt_tar"}

    # Truncated without a parquet: a prefix kept, one dead letter stands for the rest.
    kept2 = [r["key"] for r in by_shard["00002"]]
    assert 0 < len(kept2) < 20 and set(kept2) == set(order1[: len(kept2)])
    assert [(d["key"], d["reason"]) for d in dead_by_shard["00002"]] == [("", "corrupt_tar")]
    assert "end-of-archive" in dead_by_shard["00002"][0]["detail"]

    for reason in ("undecodable_image", "empty_caption", "caption_not_utf8", "missing_caption"):
        assert counters[f"shards.deadletter_{reason}"] == 1
    assert counters["shards.deadletter_corrupt_tar"] == len(lost1) + 1
    assert counters["shards.kept"] == len(records) == 36 + len(kept1) + len(kept2)
    assert counters["shards.read"] == 40 + 40 + len(kept2) + 1
    assert counters["shards.shards_read"] == 3 and counters["shards.shards_corrupt"] == 2
    ok, line = RECONCILIATION.check(counters)
    assert ok, line


def test_unreadable_shard_is_one_dead_letter(tmp_path):
    path = tmp_path / "00007.tar"
    path.write_bytes(b"not a tar archive at all" * 40)
    items = list(iter_shard(str(path)))
    assert len(items) == 1 and isinstance(items[0], Dead)
    assert (items[0].key, items[0].reason) == ("", "corrupt_tar")


def test_tar_groups_stop_with_an_error_at_a_garbled_header(small_corpus, tmp_path):
    data = bytearray((small_corpus / "shards" / "00000.tar").read_bytes())
    members = tar_members(small_corpus / "shards" / "00000.tar")
    data[members[30].offset: members[30].offset + 512] = b"\x07" * 512  # a header tarfile would skip silently
    path = tmp_path / "garbled.tar"
    path.write_bytes(bytes(data))
    got = []
    with open(path, "rb") as fh, pytest.raises(tarfile.ReadError, match="damaged header"):
        for key, group in iter_tar_groups(fh):
            got.append(key)
            assert set(group) == {"jpg", "txt", "json"}
    assert len(got) == 9  # members 0..26 form nine whole records; the tenth is cut by the damage


def test_patterns(small_corpus, tmp_path):
    shards = small_corpus / "shards"
    expected = [str(shards / "00000.tar"), str(shards / "00001.tar")]
    assert match_shards(str(shards)) == expected  # a directory means its *.tar
    assert match_shards(str(shards / "*")) == expected  # parquet and json siblings are not shards
    assert match_shards(str(shards / "{00000..00001}.tar")) == expected
    assert match_shards([expected[1], expected[0], expected[1]]) == expected
    with pytest.raises(ShardsNotFound, match=r"1 shard\(s\) that do not exist \(first: .*00002.tar\)"):
        match_shards(str(shards / "{00000..00002}.tar"))


def test_pattern_matching_nothing_is_a_clear_error_before_running(tmp_path):
    pattern = str(tmp_path / "laion" / "*.tar")
    with pytest.raises(ShardsNotFound) as err:
        ReadShards(pattern, str(tmp_path / "out"))
    assert pattern in str(err.value) and "glob" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardsNotFound, match="empty"):
        match_shards(str(tmp_path / "empty"))
    with pytest.raises(ShardsNotFound, match="no filesystem for 'foo://'"):
        match_shards("foo://bucket/laion/*.tar")
    assert not (tmp_path / "out").exists()
