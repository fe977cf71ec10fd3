"""`daco build` end to end: a planted model recovered through the whole graph, and the
embedded pipeline's outputs, determinism and Hugging Face loading."""

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from transformers import BatchFeature

import steering.models as models
from pipeline.build import BuildConfig, CorpusConfig, main_graph
from pipeline.runner import run_pipeline
from steering import load_dictionary
from steering.models.base import LoadedModel, ModelAdapter
from transforms import clip_model, embeddings_layout, fileio
from transforms.activations import MLLMConfig
from transforms.concepts import ConceptsConfig
from transforms.retrieve import RetrieveConfig

D_MODEL, D_CLIP, LAYERS = 96, 32, (1, 2)


class PlantedLayer(nn.Module):
    """Outputs a known combination of planted concept vectors: the image's concept, half the
    caption's concept, plus seeded noise."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)  # [n_concepts + 1, d]; last row: none

    def forward(self, hidden, concept_idx):
        gen = torch.Generator().manual_seed(int(concept_idx.sum()) + 7)
        noise = 0.02 * torch.randn(concept_idx.shape[0], 1, self.table.shape[1], generator=gen)
        planted = self.table[concept_idx[:, 0]] + 0.5 * self.table[concept_idx[:, 1]]
        return planted[:, None, :] + noise  # the residual stream is replaced: layer l shows table l


class PlantedModel(nn.Module):
    def __init__(self, tables):
        super().__init__()
        self.layers = nn.ModuleList(PlantedLayer(t) for t in tables)
        self.config = type("Cfg", (), {"untrained": True, "hidden_size": tables.shape[-1], "model_type": "planted"})()

    @property
    def device(self):
        return self.layers[0].table.device

    def forward(self, concept_idx, attention_mask, use_cache=False):
        hidden = torch.zeros(concept_idx.shape[0], 1, self.layers[0].table.shape[1])
        for layer in self.layers:
            hidden = layer(hidden, concept_idx)
        return hidden


class PlantedAdapter(ModelAdapter):
    """A test family: inputs are the (image concept, caption concept) indices, read back from
    the image pixels and the caption text through maps the test builds from the corpus truth."""

    family = "planted"
    model_types = ("planted",)
    model_class_name = "PlantedModel"
    tables: torch.Tensor = None
    by_pixels: dict = {}
    by_caption: dict = {}
    none: int = 0

    def decoder_layers(self, model):
        return model.layers

    def vision_tower(self, model):
        return None

    def build_inputs(self, processor, images, texts, prompt_template):
        idx = [[self.by_pixels.get(_pixel_hash(img), self.none), self.by_caption.get(text, self.none)]
               for img, text in zip(images, texts)]
        return BatchFeature({"concept_idx": torch.tensor(idx), "attention_mask": torch.ones(len(idx), 1, dtype=torch.long)})

    def build_untrained(self, seed=0, **size):
        return LoadedModel(PlantedModel(self.tables).eval(), None)


def _pixel_hash(img: Image.Image) -> str:
    return hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()


def _records(shards_dir: Path):
    for tar_path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                yield tar_path.stem, name[:-4], data


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_planted_directions_are_recovered_through_the_whole_graph(small_corpus, tmp_path, monkeypatch):
    truth = pq.read_table(small_corpus / "corpus_truth.parquet").to_pylist()
    concept_ids = sorted({t["image_concept_id"] for t in truth if t["image_concept_id"]}
                         | {t["caption_concept_id"] for t in truth if t["caption_concept_id"]})
    index = {c: i for i, c in enumerate(concept_ids)}
    rng = np.random.default_rng(0)

    # CLIP side: planted embeddings in clip-retrieval layout (image and caption halves follow the truth)
    clip_vectors = _unit(rng.normal(size=(len(concept_ids), D_CLIP)))
    by_key = {t["key"]: t for t in truth}
    emb_dir = str(tmp_path / "out" / "embeddings")
    rows_by_shard: dict[str, list] = {}
    pixels = {}
    for shard, key, jpg in _records(small_corpus / "shards"):
        t = by_key[key]
        half = lambda c: clip_vectors[index[c]] if c else _unit(rng.normal(size=D_CLIP))  # noqa: E731
        img = _unit(half(t["image_concept_id"]) + 0.1 * rng.normal(size=D_CLIP))
        txt = _unit(half(t["caption_concept_id"]) + 0.1 * rng.normal(size=D_CLIP))
        rows_by_shard.setdefault(shard, []).append(
            (key, t["caption"], t["url"], hashlib.sha256(jpg).hexdigest(), img.astype(np.float16), txt.astype(np.float16)))
        with Image.open(io.BytesIO(jpg)) as im:
            pixels[_pixel_hash(im)] = t["image_concept_id"]
    for shard, rows in rows_by_shard.items():
        embeddings_layout.write_file_set(emb_dir, shard, rows)
    concept_emb = str(tmp_path / "concept_emb.npy")
    fileio.write_npy_atomic(concept_emb, clip_vectors.astype(np.float32))

    # MLLM side: the planted model's layers. The planted concept vectors are centred (zero mean
    # over concepts), so negatives drawn from the other concepts average out and the difference
    # of means estimates exactly the planted vector.
    planted = _unit(rng.normal(size=(max(LAYERS) + 1, len(concept_ids), D_MODEL)))
    planted -= planted.mean(axis=1, keepdims=True)
    tables = torch.zeros(max(LAYERS) + 1, len(concept_ids) + 1, D_MODEL)
    tables[:, :-1] = torch.tensor(planted, dtype=torch.float32)
    monkeypatch.setattr(PlantedAdapter, "tables", tables)
    monkeypatch.setattr(PlantedAdapter, "none", len(concept_ids))
    monkeypatch.setattr(PlantedAdapter, "by_pixels", {h: index[c] for h, c in pixels.items() if c})
    monkeypatch.setattr(PlantedAdapter, "by_caption",
                        {t["caption"]: index[t["caption_concept_id"]] for t in truth if t["caption_concept_id"]})
    monkeypatch.setitem(models.REGISTRY, "planted", PlantedAdapter)

    cfg = BuildConfig(
        concepts=ConceptsConfig(), corpus=CorpusConfig(), clip=clip_model.ClipConfig(),
        retrieve=RetrieveConfig.from_dict({"k": 3, "n_negatives": 48, "negative_quantile": 0.9, "min_positives": 2}),
        mllm=MLLMConfig.from_dict({"family": "planted", "layers": list(LAYERS), "batch_size": 4}),
    )
    out = str(tmp_path / "out")
    counters = run_pipeline(lambda p: main_graph(
        p, out=out, shards_pattern=str(small_corpus / "shards" / "*.tar"), emb_dir=emb_dir,
        compute_embeddings=False, concept_emb_path=concept_emb, concept_ids=concept_ids, cfg=cfg))
    assert counters["activations.stimuli"] == counters["retrieve.stimuli_written"] > 0

    # positives are the pairs whose image AND caption show the concept
    stimuli = pq.read_table(Path(out) / "stimuli").to_pylist()
    for row in stimuli:
        if row["role"] == "positive":
            t = by_key[row["key"]]
            assert t["image_concept_id"] == t["caption_concept_id"] == row["concept_id"], row

    # the dictionary the pipeline wrote recovers every planted direction
    dictionary_rows = {(r["concept_id"], r["layer"]): np.array(r["direction"])
                       for r in pq.read_table(Path(out) / "dictionary").to_pylist()}
    assert {c for c, _ in dictionary_rows} == set(concept_ids)
    cosines = [float(_unit(dictionary_rows[(c, layer)]) @ _unit(planted[layer, index[c]]))
               for c in concept_ids for layer in LAYERS]
    assert min(cosines) >= 0.95, sorted(cosines)[:5]


@pytest.fixture(scope="module")
def built(tiny_build):
    """conftest.py's two tiny builds (``a`` made its corpus, ``b`` read a's shards)."""
    return tiny_build


def test_build_writes_every_design_output(built):
    out = built / "a"
    for name in ("concepts.parquet", "metadata.json", "README.md", "concept_embeddings.npy"):
        assert (out / name).is_file(), name
    for folder in ("stimuli", "dictionary", "deadletter", "embeddings/img_emb", "embeddings/text_emb",
                   "embeddings/metadata"):
        assert any((out / folder).iterdir()), folder
    metadata = yaml.safe_load((out / "metadata.json").read_text())
    assert metadata["untrained"] is True and metadata["layers"] == [1, 2]
    assert metadata["models"]["mllm"]["model_class"] == "Qwen2VLForConditionalGeneration"
    assert "not meaningful" in (out / "README.md").read_text()
    d = load_dictionary(str(out))
    assert d.layers == [1, 2] and d.directions(2).shape[1] == 64


def test_two_builds_give_byte_identical_dictionaries(built):
    a = sorted((built / "a" / "dictionary").glob("*.parquet"))
    b = sorted((built / "b" / "dictionary").glob("*.parquet"))
    assert [p.name for p in a] == [p.name for p in b] and a
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_datasets_reads_the_folder_back(built, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = datasets.load_dataset(str(built / "a"), "dictionary", split="train")
    feature = ds.features["direction"]
    assert getattr(feature, "length", None) == 64 and feature.feature.dtype == "float32"
    assert len(ds) == len(pq.read_table(built / "a" / "dictionary"))


def test_pretrained_model_is_checked_from_its_config_without_loading_weights(tmp_path):
    from transforms.activations import _architecture, check_model

    model, processor = models.get_adapter("qwen2_vl").build_untrained(0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cfg = MLLMConfig.from_dict({"model_id": str(tmp_path), "layers": [1, 2]})
    structure, _adapter = _architecture(cfg)
    assert next(structure.parameters()).device.type == "meta"  # no weights were read
    info = check_model(cfg)
    assert (info["model_class"], info["num_layers"], info["hidden_size"]) == ("Qwen2VLForConditionalGeneration", 4, 64)
    with pytest.raises(ValueError, match="it has 4 decoder layers"):
        check_model(MLLMConfig.from_dict({"model_id": str(tmp_path), "layers": [1, 9]}))


def test_build_checks_supplied_embeddings_against_the_clip_before_any_work(tmp_path):
    """``daco build --embeddings`` fails before phase 1 when the folder's dimension or its
    embeddings.json's weights are not the configured CLIP's, naming the file and the fix."""
    import json

    from pipeline.cli import main as daco
    from conftest import TINY_BUILD

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_BUILD))
    vec = lambda d: np.eye(2, d, dtype=np.float16)  # noqa: E731
    wide, other = str(tmp_path / "wide"), str(tmp_path / "other")
    rows = lambda d: [(f"0000{i}", "a caption", "", "0" * 64, vec(d)[i], vec(d)[i]) for i in range(2)]  # noqa: E731
    embeddings_layout.write_file_set(wide, "00000", rows(32))
    embeddings_layout.write_file_set(other, "00000", rows(64))
    (tmp_path / "other" / "embeddings.json").write_text(json.dumps({"model_name": "daco-tiny-clip", "weights": "random (seed 7)"}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--embeddings .*wide has dimension 32 but CLIP daco-tiny-clip embeds concepts in 64"):
        daco(["build", "--config", str(config), "--embeddings", wide, "--out", str(out)])
    with pytest.raises(SystemExit, match=r"other/embeddings.json: the embeddings were made with daco-tiny-clip "
                                         r"\(random \(seed 7\)\) but concepts would be embedded with daco-tiny-clip "
                                         r"\(random \(seed 0\)\): configure the same CLIP"):
        daco(["build", "--config", str(config), "--embeddings", other, "--out", str(out)])
    assert not (out / "concepts.parquet").exists()
