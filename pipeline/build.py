"""``daco build``: the whole DACO-400K pipeline, WordNet to dictionary (DESIGN.md, upper line).

Phases (each a Beam pipeline on the chosen runner, except the corpus step):

1. concepts: WordNet -> ``OUT/concepts.parquet`` (transforms/concepts.py);
2. corpus (only without ``--shards``): the embedded corpus drawn for those concepts,
   written by the real img2dataset from a loopback server into ``OUT/corpus/shards``;
3. concept text embeddings with the CLIP model (``OUT/concept_embeddings.npy``);
4. the main graph: shards -> CLIP embeddings (skipped when ``--embeddings`` points at a
   clip-retrieval folder) -> retrieval -> stimuli -> MLLM activations -> directions ->
   ``OUT/dictionary/``; then ``metadata.json`` and the dataset card ``README.md``.

Retrieval needs every concept's text embedding as one array, and the corpus must be
drawn for the selected concepts, so phases 1-3 run before the main graph is built.
Everything a stage needs is checked (config, shards, model, layers) before phase 1.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources

from pipeline.config import load_config_file, section
from pipeline.runner import print_summary, run_pipeline
from transforms import activations, clip_model, concept_prompts, concepts, directions, embed, embeddings_layout, fileio, outdir, retrieve, shards
from transforms.config import StageConfig
from transforms.counters import Reconciliation

PRESETS = sorted(p.name[:-5] for p in resources.files("pipeline.presets").iterdir() if p.name.endswith(".yaml"))


@dataclass
class CorpusConfig(StageConfig):
    """Options of the embedded corpus (``corpus:`` section; used only without ``--shards``)."""

    n: int = 2000
    seed: int = 0
    image_size: int = 64

    def validate(self, where: str) -> None:
        if self.n < 1:
            raise ValueError(f"{where}.n must be >= 1, got {self.n}")


@dataclass
class BuildConfig:
    """Every stage's options, from a preset or a config file."""

    concepts: concepts.ConceptsConfig
    corpus: CorpusConfig
    clip: clip_model.ClipConfig
    retrieve: retrieve.RetrieveConfig
    mllm: activations.MLLMConfig
    source: str = "preset:default"
    extra: dict = field(default_factory=dict)


SECTIONS = {"concepts": concepts.ConceptsConfig, "corpus": CorpusConfig, "clip": clip_model.ClipConfig,
            "retrieve": retrieve.RetrieveConfig, "mllm": activations.MLLMConfig}


def preset_path(name: str) -> str:
    """The YAML file of a named preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise SystemExit(f"--preset {name!r} is not a preset; known: {', '.join(PRESETS)}")
    return str(resources.files("pipeline.presets").joinpath(f"{name}.yaml"))


def load_build_config(config: str | None, preset: str | None) -> BuildConfig:
    """The build options: ``--config FILE`` or ``--preset NAME`` (default: the embedded default)."""
    if config and preset:
        raise SystemExit("give --config or --preset, not both")
    path = config or preset_path(preset or "default")
    data = load_config_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"{path}: unknown section(s) {unknown}; valid: {sorted(SECTIONS)}")
    parts = {name: section(data, name, cls, path) for name, cls in SECTIONS.items()}
    return BuildConfig(**parts, source=f"config:{config}" if config else f"preset:{preset or 'default'}")


def _step(message: str) -> None:
    print(f"[daco] {message}", file=sys.stderr, flush=True)


def reconciliations() -> list[Reconciliation]:
    """Every stage's checks, plus the hand-offs between stages."""
    return [
        concepts.RECONCILIATION, shards.RECONCILIATION, embed.RECONCILIATION, embed.WRITE_RECONCILIATION,
        retrieve.RECONCILIATION, retrieve.STIMULI_RECONCILIATION,
        Reconciliation("activations", "stimuli", ("retrieve.stimuli_written",)),
        activations.RECONCILIATION,
        Reconciliation("directions", "read", ("activations.emitted",)),
        *directions.RECONCILIATIONS,
    ]


def _read_stimuli(path: str):
    yield from fileio.read_parquet(path).to_pylist()


def main_graph(p, *, out: str, shards_pattern: str, emb_dir: str, compute_embeddings: bool,
               concept_emb_path: str, concept_ids: list[str], cfg: BuildConfig,
               ranks: list[int] | None = None, target: int | None = None) -> None:
    """The main Beam graph: shards -> CLIP embeddings (unless given) -> retrieval -> stimuli
    -> MLLM activations -> directions -> ``OUT/dictionary/``."""
    import apache_beam as beam

    from transforms.write import WriteDictionary

    records = p | "ReadShards" >> shards.ReadShards(shards_pattern, out)
    after = records | "ComputeEmbeddings" >> embed.ComputeEmbeddings(out, cfg.clip) if compute_embeddings else None
    stimuli_paths = p | "RetrieveStimuli" >> retrieve.RetrieveStimuli(
        out, emb_dir, concept_emb_path, concept_ids, cfg.retrieve, after=after, ranks=ranks, target=target)
    stimuli = stimuli_paths | "ReadStimuli" >> beam.FlatMap(_read_stimuli)
    vectors = {"records": records, "stimuli": stimuli} | "Activations" >> activations.ComputeActivations(out, cfg.mllm)
    vectors | "Directions" >> directions.ComputeDirections(out) | "WriteDictionary" >> WriteDictionary(out)


def run_build(cfg: BuildConfig, out: str, shards_pattern: str | None, embeddings_dir: str | None,
              beam_args: list[str]) -> int:
    """Run every phase into ``out`` (local path or Beam filesystem URL) holding its writer lock,
    with ``OUT/_INCOMPLETE`` present until the card is written (transforms/outdir.py); prints
    the summary; returns the exit code."""
    outdir.check_writable(out)
    with outdir.writer_lock(out, "daco build"):
        return _run_phases(cfg, out, shards_pattern, embeddings_dir, beam_args)


def _build_corpus(cfg: BuildConfig, out: str, concepts_path: str) -> str:
    """Phase 2: the embedded corpus into ``OUT/corpus``; returns its shard pattern. img2dataset
    writes locally, so for a remote ``out`` the corpus is built in a temporary folder and copied."""
    from transforms.corpus import build_corpus

    corpus_dir = fileio.join(out, "corpus")
    args = dict(n=cfg.corpus.n, concepts_path=concepts_path, seed=cfg.corpus.seed,
                image_size=cfg.corpus.image_size, wordnet_dir=cfg.concepts.wordnet_dir)
    if fileio.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="daco-corpus-") as tmp:
            build_corpus(tmp, **args)
            fileio.upload_tree(tmp, corpus_dir)
    else:
        build_corpus(corpus_dir, **args)
    return fileio.join(corpus_dir, "shards", "*.tar")


def relative_to(path: str, out: str) -> str:
    """How metadata.json records an input: relative to the output folder when inside it (so
    `daco report` finds it wherever it runs and after the folder moves), else absolute."""
    if fileio.is_remote(path) or fileio.is_remote(out):
        prefix = out.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path
    path, base = os.path.abspath(path), os.path.abspath(out)
    return os.path.relpath(path, base) if path.startswith(base + os.sep) else path


def _run_phases(cfg: BuildConfig, out: str, shards_pattern: str | None, embeddings_dir: str | None,
                beam_args: list[str]) -> int:
    from transforms.write import write_dataset_card, write_metadata
    from transforms.wordnet import find_wordnet

    find_wordnet(cfg.concepts.wordnet_dir)
    if shards_pattern:
        shards.match_shards(shards_pattern)
    if embeddings_dir and not embeddings_layout.embeddings_exist(embeddings_dir):
        raise SystemExit(f"--embeddings {embeddings_dir}: no clip-retrieval layout there "
                         "(img_emb/, text_emb/, metadata/); drop the option to compute embeddings")
    _step("checking the MLLM and its layers")
    try:
        mllm_info = activations.check_model(cfg.mllm)
    except ValueError as exc:  # a layer the model lacks, a token cap above its context: one line
        raise SystemExit(f"daco build: mllm: {exc}") from None
    clip = clip_model.load_clip(cfg.clip)

    outdir.mark_incomplete(out, "daco build")
    _step("phase 1/4: concepts")
    counters = run_pipeline(
        lambda p: p | "SelectConcepts" >> concepts.SelectConcepts(cfg.concepts)
        | "WriteConcepts" >> concepts.WriteConcepts(out, cfg.concepts), beam_args)
    concepts_path = fileio.join(out, "concepts.parquet")

    if not shards_pattern:
        _step(f"phase 2/4: embedded corpus ({cfg.corpus.n} pairs, img2dataset over 127.0.0.1)")
        shards_pattern = _build_corpus(cfg, out, concepts_path)

    _step("phase 3/4: concept text embeddings")
    table = fileio.read_parquet(concepts_path)
    concept_ids, ranks, target = retrieve.concept_pool(table)
    concept_emb = concept_prompts.embed_concepts(table, clip)
    emb_path = fileio.join(out, "concept_embeddings.npy")
    fileio.write_npy_atomic(emb_path, concept_emb)

    _step("phase 4/4: shards -> embeddings -> retrieval -> activations -> directions")
    emb_dir = embeddings_dir or fileio.join(out, "embeddings")

    graph = functools.partial(main_graph, out=out, shards_pattern=shards_pattern, emb_dir=emb_dir,
                              compute_embeddings=not embeddings_dir, concept_emb_path=emb_path,
                              concept_ids=concept_ids, ranks=ranks, target=target, cfg=cfg)
    for key, value in run_pipeline(graph, beam_args).items():
        counters[key] = counters.get(key, 0) + value

    clip_record = {"id": f"{cfg.clip.model_name}/{cfg.clip.pretrained or 'untrained'}",
                   "untrained": clip.untrained, "embed_dim": clip.embed_dim, "seed": cfg.clip.seed}
    metadata = write_metadata(out, {
        "models": {"clip": clip_record, "mllm": {"id": mllm_info["model_id"], **mllm_info}},
        "layers": mllm_info["layers"], "pooling": cfg.mllm.pooling, "prompt_template": cfg.mllm.prompt_template,
        "seeds": {"clip": cfg.clip.seed, "mllm": cfg.mllm.seed, "corpus": cfg.corpus.seed,
                  "retrieve": cfg.retrieve.seed},
        "config_source": cfg.source,
        "config": {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS},
        "shards": relative_to(shards_pattern, out), "embeddings": relative_to(emb_dir, out), "counters": dict(sorted(counters.items())),
    })
    write_dataset_card(out, metadata)
    outdir.mark_complete(out)
    ok = print_summary("daco build", counters, reconciliations())
    print(f"\nDACO-400K output in {out}: concepts.parquet, stimuli/, dictionary/, metadata.json, README.md"
          + ("\nWARNING: models were randomly initialised (untrained): the directions are not meaningful."
             if metadata["untrained"] else ""))
    return 0 if ok else 1
