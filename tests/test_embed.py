"""CLIP embedding stage: real open_clip (the tiny shipped architecture, seeded), real Beam runner."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.runner import run_pipeline
from transforms.clip_model import DEMO_CLIP, ClipConfig, ClipLoadError, load_clip, resolve_clip_config
from transforms.concept_prompts import concept_prompts, embed_concepts
from transforms.embed import RECONCILIATION, WRITE_RECONCILIATION, ComputeEmbeddings
from transforms.embeddings_layout import EmbeddingsLayoutError, embeddings_exist, read_embeddings

CFG = DEMO_CLIP.replace(batch_size=4)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def record(shard: str, i: int, caption: str | None = None, jpg: bytes | None = None) -> dict:
    jpg = jpeg(int(shard) * 100 + i) if jpg is None else jpg
    return {"key": f"{shard}{i:04d}", "shard": shard, "caption": f"a photo number {i} of shard {shard}" if caption is None else caption,
            "url": f"http://127.0.0.1/{shard}/{i}.jpg", "jpg": jpg, "sha256": hashlib.sha256(jpg).hexdigest()}


RECORDS = (
    [record("00000", i) for i in range(9)]
    + [record("00003", i) for i in range(5)]
    + [record("00003", 7, jpg=b"not a jpeg at all"), record("00000", 11, caption="")]
)
GOOD = [r for r in RECORDS if r["caption"] and r["jpg"].startswith(b"\xff\xd8")]


def embed(records: list[dict], out: Path, cfg: ClipConfig = CFG) -> dict[str, int]:
    def build(p):
        p | beam.Create(records) | ComputeEmbeddings(str(out), cfg)

    return run_pipeline(build)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same records embedded twice (records shuffled the second time)."""
    base = tmp_path_factory.mktemp("embed")
    counters = embed(RECORDS, base / "a")
    embed(list(reversed(RECORDS)), base / "b")
    return base / "a", base / "b", counters


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_normalised_float16_rows_sorted_and_matching_metadata(runs):
    out, _, _ = runs
    emb = out / "embeddings"
    assert sorted(files(emb)) == [
        "embeddings.json", "img_emb/img_emb_0.npy", "img_emb/img_emb_3.npy", "metadata/metadata_0.parquet",
        "metadata/metadata_3.parquet", "text_emb/text_emb_0.npy", "text_emb/text_emb_3.npy"]
    for n, shard in ((0, "00000"), (3, "00003")):
        img = np.load(emb / "img_emb" / f"img_emb_{n}.npy", allow_pickle=False)
        txt = np.load(emb / "text_emb" / f"text_emb_{n}.npy", allow_pickle=False)
        meta = pq.read_table(emb / "metadata" / f"metadata_{n}.parquet")
        expected = sorted((r for r in GOOD if r["shard"] == shard), key=lambda r: r["key"])
        assert meta.column_names == ["key", "caption", "url", "shard", "sha256"]
        assert meta.to_pylist() == [{k: r[k] for k in meta.column_names} for r in expected]
        assert img.dtype == txt.dtype == np.float16
        assert img.shape == txt.shape == (len(expected), 64)
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(txt.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert len({row.tobytes() for row in img}) == len(img)  # distinct images, distinct rows


def test_same_bytes_across_runs(runs):
    a, b, _ = runs
    assert files(a) == files(b)


def test_model_and_untrained_flag_recorded(runs):
    out, _, _ = runs
    record = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert record["untrained"] is True
    assert record["model_name"] == "daco-tiny-clip" and record["weights"] == "random (seed 0)"
    assert record["embed_dim"] == 64 and record["n"] == len(GOOD)
    assert [s["shard"] for s in record["shards"]] == ["00000", "00003"]
    assert record["clip_model"] == "open_clip:daco-tiny-clip"  # random weights: no pretrained tag to name


def test_clip_model_is_named_as_clip_retrieval_back_expects():
    from transforms.clip_model import ClipConfig
    from transforms.embeddings_layout import clip_retrieval_name

    tagged = ClipConfig(model_name="ViT-L-14", pretrained="laion2b_s32b_b82k")
    resolved = tagged.replace(pretrained="/cache/open_clip_pytorch_model.bin")
    assert clip_retrieval_name(tagged, resolved) == "open_clip:ViT-L-14/laion2b_s32b_b82k"
    assert clip_retrieval_name(tagged, tagged.replace(pretrained=None, allow_untrained=True)) == "open_clip:ViT-L-14"


def test_bad_records_dead_lettered_counted_and_reconciled(runs):
    out, _, counters = runs
    dead = [json.loads(line) for line in (out / "deadletter" / "embed.jsonl").read_text().splitlines()]
    assert {(d["key"], d["reason"]) for d in dead} == {("000030007", "image"), ("000000011", "caption")}
    assert counters["embed.read"] == len(RECORDS)
    assert counters["embed.embedded"] == counters["embed.written"] == len(GOOD)
    assert counters["embed.deadletter_image"] == counters["embed.deadletter_caption"] == 1
    assert RECONCILIATION.check(counters)[0] and WRITE_RECONCILIATION.check(counters)[0]


def test_read_embeddings_round_trip(runs):
    out, _, _ = runs
    assert embeddings_exist(str(out / "embeddings"))
    img, txt, meta = read_embeddings(str(out / "embeddings"))
    emb = out / "embeddings"
    np.testing.assert_array_equal(img, np.concatenate([np.load(emb / f"img_emb/img_emb_{n}.npy") for n in (0, 3)]))
    np.testing.assert_array_equal(txt, np.concatenate([np.load(emb / f"text_emb/text_emb_{n}.npy") for n in (0, 3)]))
    assert meta.column("key").to_pylist() == sorted(r["key"] for r in GOOD)


def test_pipeline_matches_bare_open_clip_forward(runs):
    """Each record's row equals a bare open_clip forward of its own image and caption."""
    import open_clip

    out, _, _ = runs
    img_rows, txt_rows, meta = read_embeddings(str(out / "embeddings"))
    torch.manual_seed(CFG.seed)
    model, _, preprocess = open_clip.create_model_and_transforms("daco-tiny-clip")
    tokenizer = open_clip.get_tokenizer("daco-tiny-clip")
    by_key = {r["key"]: r for r in GOOD}
    records = [by_key[k] for k in meta.column("key").to_pylist()]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(r["jpg"])).convert("RGB")) for r in records])
        img = torch.nn.functional.normalize(model.eval().encode_image(images), dim=-1).numpy()
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([r["caption"] for r in records])), dim=-1).numpy()
    np.testing.assert_allclose(img_rows.astype(np.float32), img, atol=1e-3, rtol=0)
    np.testing.assert_allclose(txt_rows.astype(np.float32), txt, atol=1e-3, rtol=0)
    assert (img_rows == img.astype(np.float16)).mean() > 0.99
    assert (txt_rows == txt.astype(np.float16)).mean() > 0.99


def test_malformed_folders_give_clear_errors(runs, tmp_path):
    source = runs[0] / "embeddings"

    def broken(name, damage):
        target = tmp_path / name
        shutil.copytree(source, target)
        damage(target)
        return target

    cases = {
        "missing metadata": (lambda d: (d / "metadata/metadata_3.parquet").unlink(), "metadata_3.parquet: missing"),
        "row counts": (lambda d: np.save(d / "text_emb/text_emb_0.npy", np.load(d / "text_emb/text_emb_0.npy")[:-1]),
                       "row counts differ"),
        "dtype": (lambda d: np.save(d / "img_emb/img_emb_3.npy", np.ones((5, 64), dtype=np.int32)),
                  "img_emb_3.npy: expected a 2-D float array"),
        "dims": (lambda d: np.save(d / "text_emb/text_emb_3.npy", np.ones((5, 32), dtype=np.float16)),
                 "text_emb_3.npy: dimension 32 differs"),
        "pickle": (lambda d: np.save(d / "img_emb/img_emb_0.npy", np.array([{"a": 1}], dtype=object)),
                   "img_emb_0.npy: not a readable .npy array"),
    }
    for name, (damage, message) in cases.items():
        with pytest.raises(EmbeddingsLayoutError, match=message):
            read_embeddings(str(broken(name.replace(" ", "_"), damage)))
    assert not embeddings_exist(str(tmp_path / "missing_metadata"))
    assert not embeddings_exist(str(tmp_path / "nothing_here"))
    with pytest.raises(EmbeddingsLayoutError, match="no img_emb/img_emb_N.npy"):
        read_embeddings(str(tmp_path / "nothing_here"))


def test_embed_concepts_averages_normalised_templates():
    loaded = load_clip(CFG)
    concepts = pa.table({
        "concept_id": ["dog.n.01", "apple.n.01"],
        "lemma": ["dog", "apple"],
        "definition": ["a member of the genus Canis (probably descended from the common wolf); occurs in many breeds",
                       ""],
    })
    dog = concept_prompts(concepts.to_pylist()[0])
    assert dog[0] == "a photo of a dog, a member of the genus Canis."
    assert len(dog) == 6 and len(concept_prompts(concepts.to_pylist()[1])) == 2  # no gloss: gloss templates left out
    assert concept_prompts(concepts.to_pylist()[1])[0] == "a photo of an apple."
    got = embed_concepts(concepts, loaded)
    assert got.dtype == np.float32 and got.shape == (2, 64)
    for i, row in enumerate(concepts.to_pylist()):
        with torch.no_grad():
            each = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(concept_prompts(row))), dim=-1)
        mean = each.mean(0)
        np.testing.assert_allclose(got[i], (mean / mean.norm()).numpy(), atol=1e-5)
    assert not np.allclose(got[0], got[1])


def test_weights_resolution_errors_and_untrained_fallback():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['modle'\]"):
        ClipConfig.from_dict({"modle": "ViT-B-32"})
    missing = ClipConfig(model_name="daco-tiny-clip", pretrained="/nonexistent/ckpt.pt")
    with pytest.raises(ClipLoadError, match="neither a pretrained tag of daco-tiny-clip .* nor an existing checkpoint"):
        load_clip(missing)
    offline = ClipConfig(model_name="RN50", pretrained="openai", download=False, cache_dir="/nonexistent-cache")
    with pytest.raises(ClipLoadError, match="looked for open_clip tag RN50/openai .*--clip-allow-untrained"):
        load_clip(offline)
    with pytest.warns(UserWarning, match="marked untrained"):
        assert resolve_clip_config(offline.replace(allow_untrained=True)).pretrained is None
    with pytest.raises(ClipLoadError, match="not an open_clip architecture"):
        load_clip(CFG.replace(model_name="daco-huge-clip"))


def test_local_checkpoint_loads_as_trained(tmp_path):
    """A checkpoint file is real weights: loaded as given and not marked untrained."""
    source = load_clip(CFG.replace(seed=7))
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_clip(CFG.replace(pretrained=str(path), allow_untrained=False))
    assert loaded.untrained is False
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name


def test_daco_embed_command_on_real_shards(small_corpus, tmp_path, capsys):
    """`daco embed` over img2dataset shards (ReadShards -> ComputeEmbeddings); a second run skips."""
    from pipeline.cli import main as daco

    out = tmp_path / "out"
    args = ["embed", "--shards", str(small_corpus / "shards"), "--out", str(out), "--demo-clip", "--clip-batch-size", "16"]
    assert daco(args) == 0
    printed = capsys.readouterr().out
    assert "ok   embed: read 80 = embedded + deadletter_image + deadletter_caption = 80" in printed
    assert "80 image-caption pairs, daco-tiny-clip, UNTRAINED" in printed
    img, txt, meta = read_embeddings(str(out / "embeddings"))
    truth = pq.read_table(small_corpus / "corpus_truth.parquet")
    assert meta.column("key").to_pylist() == sorted(truth.column("key").to_pylist())
    assert meta.column("sha256").to_pylist() == truth.sort_by("key").column("sha256").to_pylist()
    assert img.shape == txt.shape == (80, 64)
    assert daco(args) == 0
    assert "already holds 80 embeddings; skipping" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"made with daco-tiny-clip \(random \(seed 0\)\) but concepts would be "
                                         r"embedded with daco-tiny-clip \(random \(seed 1\)\)(.|\n)*pass --overwrite"):
        daco(args + ["--clip-seed", "1"])
    with pytest.raises(SystemExit, match="matches no .tar file"):
        daco(["embed", "--shards", str(tmp_path / "none" / "*.tar"), "--out", str(tmp_path / "o2"), "--demo-clip"])
