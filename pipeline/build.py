"""``daco build``: the whole DACO-400K pipeline, WordNet to dictionary (docs/design.md, upper line).

Phases (each a Beam pipeline on the chosen runner, except the corpus step):

1. concepts: WordNet -> ``OUT/concepts.parquet`` (:func:`concepts_graph`);
2. corpus (only without ``--shards``): the embedded corpus drawn for those concepts,
   written by the real img2dataset from a loopback server into ``OUT/corpus/shards``;
3. the main graph (:func:`main_graph`): shards -> CLIP embeddings (skipped when
   ``--embeddings`` points at a clip-retrieval folder) and concept text embeddings
   (``OUT/concept_embeddings.npy``) -> retrieval -> stimuli -> MLLM activations -> directions
   -> ``OUT/dictionary/``; then ``metadata.json`` and the dataset card ``README.md``.

The graphs are assembled here once: ``daco concepts`` runs :func:`concepts_graph`, ``daco
retrieve`` runs :func:`stimuli_graph` (the front of the main graph), and the Dataflow plan
(pipeline/dataflow.py) describes :func:`concepts_graph` and :func:`main_graph`. The corpus
must be drawn for the selected concepts, so phases 1-2 run before the main graph is built.
Everything a stage needs is checked (config, shards, embeddings against the CLIP, model,
layers) before phase 1.
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
from steering.config import Config
from transforms import (
    activations, clip_model, concepts, directions, embed, embeddings_layout, fileio, outdir, retrieve, shards,
)
from transforms.counters import Reconciliation

PRESETS = sorted(p.name[:-5] for p in resources.files("pipeline.presets").iterdir() if p.name.endswith(".yaml"))


@dataclass
class CorpusConfig(Config):
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


OTHER_SECTIONS = ("sae",)
"""Sections of a preset or config file that other commands read (``sae:``: ``daco train-sae``)."""


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
    unknown = sorted(set(data) - set(SECTIONS) - set(OTHER_SECTIONS))
    if unknown:
        raise SystemExit(f"{path}: unknown section(s) {unknown}; valid: {sorted([*SECTIONS, *OTHER_SECTIONS])}")
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


def concepts_graph(p, *, out: str, cfg: concepts.ConceptsConfig):
    """Phase 1 (and ``daco concepts``): WordNet -> ``OUT/concepts.parquet``."""
    return p | "SelectConcepts" >> concepts.SelectConcepts(cfg) | "WriteConcepts" >> concepts.WriteConcepts(out, cfg)


def stimuli_provenance(clip: clip_model.ClipConfig, resolved: clip_model.ClipConfig, untrained: bool,
                       cfg: retrieve.RetrieveConfig) -> dict:
    """What every stimuli part records in its schema metadata: the CLIP, ``untrained``, the retrieve options."""
    return {"clip": {"model_name": clip.model_name, "weights": embeddings_layout.weights_label(resolved)},
            "untrained": bool(untrained), "retrieve": dataclasses.asdict(cfg)}


def stimuli_graph(p, *, out: str, records, emb_dir: str, concepts_path: str | None, concept_ids: list[str],
                  clip: clip_model.ClipConfig, cfg: retrieve.RetrieveConfig, untrained: bool | None = None,
                  ranks: list[int] | None = None, target: int | None = None, concept_emb_path: str | None = None):
    """Records (or None when ``emb_dir`` already holds embeddings) -> CLIP embeddings, and the
    concepts of ``concepts_path`` -> their text embeddings (``OUT/concept_embeddings.npy``;
    a given ``concept_emb_path`` is read instead) -> ``OUT/stimuli/``; returns the stimuli
    paths. ``untrained`` (default: the resolved CLIP has no weights) goes into the provenance."""
    import apache_beam as beam

    embeds_concepts = concept_emb_path is None
    resolved = clip_model.resolve_clip_config(clip) if embeds_concepts or records is not None else clip
    ready = []
    if embeds_concepts:
        concept_emb_path = fileio.join(out, "concept_embeddings.npy")
        ready.append(p | "EmbedConcepts" >> retrieve.EmbedConcepts(concepts_path, concept_emb_path, resolved))
    if records is not None:
        ready.append(records | "ComputeEmbeddings" >> embed.ComputeEmbeddings(out, clip))
    after = tuple(ready) | "EmbeddingsWritten" >> beam.Flatten() if ready else None
    untrained = resolved.pretrained is None if untrained is None else untrained
    return p | "RetrieveStimuli" >> retrieve.RetrieveStimuli(
        out, emb_dir, concept_emb_path, concept_ids, cfg, after=after,
        provenance=stimuli_provenance(clip, resolved, untrained, cfg), ranks=ranks, target=target)


def main_graph(p, *, out: str, shards_pattern: str, emb_dir: str, compute_embeddings: bool,
               concept_ids: list[str], cfg: BuildConfig, concepts_path: str | None = None,
               concept_emb_path: str | None = None, ranks: list[int] | None = None, target: int | None = None,
               untrained: bool | None = None, list_shards=shards.match_shards) -> None:
    """The main Beam graph: shards (``shards_pattern`` listed by ``list_shards``) -> CLIP
    embeddings (unless given) -> retrieval (:func:`stimuli_graph`) -> MLLM activations ->
    directions -> ``OUT/dictionary/``."""
    import apache_beam as beam

    from transforms.write import WriteDictionary

    records = p | "ReadShards" >> shards.ReadShards(shards_pattern, out, list_shards)
    stimuli_paths = stimuli_graph(p, out=out, records=records if compute_embeddings else None, emb_dir=emb_dir,
                                  concepts_path=concepts_path, concept_ids=concept_ids, clip=cfg.clip,
                                  cfg=cfg.retrieve, untrained=untrained, ranks=ranks, target=target,
                                  concept_emb_path=concept_emb_path)
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
    _step("checking the MLLM and its layers")
    try:
        mllm_info = activations.check_model(cfg.mllm)
    except ValueError as exc:  # a layer the model lacks, a token cap above its context: one line
        raise SystemExit(f"daco build: mllm: {exc}") from None
    try:
        resolved = clip_model.resolve_clip_config(cfg.clip)
    except clip_model.ClipLoadError as exc:
        raise SystemExit(f"daco build: {exc}") from None
    try:
        supplied = embeddings_layout.check_matches_clip(embeddings_dir, cfg.clip, resolved) if embeddings_dir else {}
    except embeddings_layout.EmbeddingsLayoutError as exc:
        raise SystemExit(f"daco build: --embeddings {exc}") from None
    untrained = supplied.get("untrained", False) or resolved.pretrained is None

    outdir.mark_incomplete(out, "daco build")
    _step("phase 1/3: concepts")
    counters = run_pipeline(functools.partial(concepts_graph, out=out, cfg=cfg.concepts), beam_args)
    concepts_path = fileio.join(out, "concepts.parquet")

    if not shards_pattern:
        _step(f"phase 2/3: embedded corpus ({cfg.corpus.n} pairs, img2dataset over 127.0.0.1)")
        shards_pattern = _build_corpus(cfg, out, concepts_path)

    _step("phase 3/3: shards -> embeddings -> retrieval -> activations -> directions")
    concept_ids, ranks, target = retrieve.concept_pool(fileio.read_parquet(concepts_path))
    emb_dir = embeddings_dir or fileio.join(out, "embeddings")

    graph = functools.partial(main_graph, out=out, shards_pattern=shards_pattern, emb_dir=emb_dir,
                              compute_embeddings=not embeddings_dir, concepts_path=concepts_path,
                              concept_ids=concept_ids, ranks=ranks, target=target, untrained=untrained, cfg=cfg)
    for key, value in run_pipeline(graph, beam_args).items():
        counters[key] = counters.get(key, 0) + value

    clip_record = {"id": f"{cfg.clip.model_name}/{cfg.clip.pretrained or 'untrained'}",
                   "untrained": resolved.pretrained is None,
                   "embed_dim": int(clip_model.model_config(cfg.clip)["embed_dim"]), "seed": cfg.clip.seed}
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
