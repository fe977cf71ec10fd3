"""Local multi-process runs (`daco build --workers N`): same dictionary bytes as one worker."""

import pytest

from pipeline.build import BuildConfig, CorpusConfig, main_graph
from pipeline.cli import main as daco
from pipeline.runner import local_worker_args, run_pipeline
from transforms import clip_model, fileio
from transforms.activations import MLLMConfig
from transforms.concepts import ConceptsConfig
from transforms.retrieve import RetrieveConfig

CFG = BuildConfig(
    concepts=ConceptsConfig(), corpus=CorpusConfig(),
    clip=clip_model.ClipConfig(model_name="daco-tiny-clip", pretrained=None, allow_untrained=True, batch_size=16),
    # min_evidence off: the random-weight CLIP finds no concept in the corpus (docs/concepts.md)
    retrieve=RetrieveConfig.from_dict({"k": 3, "n_negatives": 3, "min_positives": 2, "min_evidence": None}),
    mllm=MLLMConfig.from_dict({"family": "qwen2_vl", "untrained_size": {"num_hidden_layers": 3}, "layers": [1, 2],
                               "batch_size": 8}),
)


def test_worker_options():
    assert local_worker_args(None) == []
    assert local_worker_args("1") == ["--direct_num_workers", "1"]
    assert local_worker_args(2) == ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    assert local_worker_args("auto")[1] == str(__import__("os").cpu_count())
    with pytest.raises(ValueError, match="--workers 'many'"):
        local_worker_args("many")
    with pytest.raises(SystemExit, match="on Dataflow use --max_num_workers"):
        daco(["build", "--workers", "2", "--runner", "DataflowRunner"])


def test_two_worker_processes_write_the_same_dictionary_bytes(small_corpus, tmp_path):
    """The main graph (shards -> CLIP -> retrieval -> MLLM -> directions) on the embedded corpus,
    once on one worker and once on two worker processes (what --workers 2 passes)."""
    concepts = fileio.read_parquet(str(small_corpus / "concepts.parquet"))
    dictionaries = {}
    for workers in ("1", "2"):
        out = tmp_path / f"workers{workers}"
        counters = run_pipeline(lambda p: main_graph(
            p, out=str(out), shards_pattern=str(small_corpus / "shards" / "*.tar"),
            emb_dir=str(out / "embeddings"), compute_embeddings=True, concepts_path=str(small_corpus / "concepts.parquet"),
            concept_ids=concepts.column("concept_id").to_pylist(), cfg=CFG), local_worker_args(workers))
        assert counters["directions.kept"] > 0 and counters["embed.embedded"] == 80
        dictionaries[workers] = {p.name: p.read_bytes() for p in sorted((out / "dictionary").glob("*.parquet"))}
    assert list(dictionaries["1"]) == ["layer_001.parquet", "layer_002.parquet"]
    assert dictionaries["1"] == dictionaries["2"]
