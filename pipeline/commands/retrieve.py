"""``daco retrieve``: concepts + webdataset shards -> OUT/stimuli/*.parquet, in one Beam graph.

ReadShards -> ComputeEmbeddings (skipped when --embeddings names an existing clip-retrieval
folder) -> concept text embeddings with the same CLIP (OUT/concept_embeddings.npy) ->
RetrieveStimuli, which takes the first two as a side input so it starts once they are written.
The graph is ``daco build``'s (pipeline/build.py, ``stimuli_graph``).
"""

HELP = "Retrieve positive and negative caption-image stimuli per concept (CLIP + faiss) into OUT/stimuli/."
BEAM_OPTIONS = True


def _min_evidence(value: str):
    """--min-evidence's value: a float, or ``none`` (evidence off: the option set to None)."""
    from steering.config import NULL

    return NULL if value.lower() == "none" else float(value)


RETRIEVE_OPTIONS = {  # --flag: (RetrieveConfig field, type, help)
    "--k": ("k", int, "positives per concept (default 27)"),
    "--n-negatives": ("n_negatives", int, "negatives per concept (default 27)"),
    "--candidates": ("candidates", int, "candidates per modality from each faiss index (default 200)"),
    "--min-positives": ("min_positives", int, "drop (and dead-letter) concepts with fewer positives (default 5)"),
    "--max-score": ("max_score", float, "a pair whose DACO distance exceeds this is never a positive"),
    "--similarity": ("similarity", str, "calibrated (Phi of z against the concept's random pairs, default), "
                     "cosine01 ((1+cos)/2) or softmax (over concepts)"),
    "--min-evidence": ("min_evidence", _min_evidence,
                       "a pair is evidence when image and caption both have z >= this against the concept's "
                       "random pairs; concepts with fewer than --min-positives are absent (default 3; 'none': off)"),
    "--exact-max": ("exact_max", int, "exact index up to this many pairs, approximate above (default 250000)"),
    "--ann": ("ann", str, "approximate index: ivf (default) or hnsw"),
    "--nprobe": ("nprobe", int, "IVF lists probed per query (default 32)"),
    "--seed": ("seed", int, "seed of the negatives and of IVF training (default 0)"),
    "--use-gpu": ("use_gpu", str, "auto (faiss-gpu when installed and a GPU is present), yes, no"),
}


def add_arguments(parser):
    from pipeline.commands.embed import add_clip_arguments

    parser.add_argument("--concepts", required=True, help="concepts.parquet (from `daco concepts` or `daco corpus`)")
    parser.add_argument("--shards", default=None,
                        help="webdataset shards: a path, a glob (DIR/*.tar) or any Beam filesystem URL "
                        "(not needed with --embeddings)")
    parser.add_argument("--embeddings", default=None,
                        help="an existing clip-retrieval embeddings folder (img_emb/, text_emb/, metadata/, e.g. "
                        "LAION's); the embedding stage is then skipped. Default: compute into OUT/embeddings")
    parser.add_argument("--out", required=True, help="output directory (local path or any Beam filesystem URL)")
    parser.add_argument("--config", default=None, help="YAML config file; its 'clip:' and 'retrieve:' sections are used")
    for flag, (_field, kind, text) in RETRIEVE_OPTIONS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    add_clip_arguments(parser)


def _retrieve_config(args):
    from pipeline.config import load_config_file, override, section
    from transforms.retrieve import RetrieveConfig

    cfg = section(load_config_file(args.config), "retrieve", RetrieveConfig, args.config)
    return override(cfg, {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _kind, _text)
                          in RETRIEVE_OPTIONS.items()}, "retrieve")


def _concept_pool(path: str) -> tuple[list[str], list[int] | None, int | None]:
    from transforms import fileio
    from transforms.retrieve import concept_pool

    try:
        table = fileio.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - say which file
        raise SystemExit(f"--concepts {path}: not a readable parquet file ({type(exc).__name__}: {exc}); "
                         "write one with `daco concepts --out DIR`") from None
    missing = {"concept_id", "lemma", "definition"} - set(table.column_names)
    if missing:
        raise SystemExit(f"--concepts {path}: missing column(s) {sorted(missing)} (expected concepts.parquet)")
    ids = table.column("concept_id").to_pylist()
    if not ids or len(set(ids)) != len(ids):
        raise SystemExit(f"--concepts {path}: needs at least one concept and unique concept_id values")
    return concept_pool(table)


def run(args, beam_args):
    from pipeline.build import stimuli_graph
    from pipeline.commands.embed import clip_config_from_args
    from pipeline.runner import print_summary, quiet_beam_logging, run_pipeline
    from transforms import clip_model, embed, embeddings_layout, fileio, retrieve, shards

    quiet_beam_logging()
    cfg = _retrieve_config(args)
    clip = clip_config_from_args(args)
    concept_ids, ranks, target = _concept_pool(args.concepts)
    try:
        resolved = clip_model.resolve_clip_config(clip)
    except clip_model.ClipLoadError as exc:
        raise SystemExit(str(exc)) from None
    compute = args.embeddings is None
    if compute:
        if not args.shards:
            raise SystemExit("--shards is required unless --embeddings names an existing embeddings folder")
        emb_dir, untrained = fileio.join(args.out, "embeddings"), resolved.pretrained is None
    else:
        emb_dir = args.embeddings
        try:
            record = embeddings_layout.check_matches_clip(emb_dir, clip, resolved)
        except embeddings_layout.EmbeddingsLayoutError as exc:
            raise SystemExit(f"--embeddings {exc}") from None
        untrained = record.get("untrained", False) or resolved.pretrained is None
        if args.shards:
            print(f"using the embeddings in {emb_dir}; --shards is not read")

    def build(p):
        records = p | "ReadShards" >> shards.ReadShards(args.shards, args.out) if compute else None
        stimuli_graph(p, out=args.out, records=records, emb_dir=emb_dir, concepts_path=args.concepts,
                      concept_ids=concept_ids, clip=clip, cfg=cfg, untrained=untrained, ranks=ranks, target=target)

    try:
        counters = run_pipeline(build, beam_args)
    except (shards.ShardsNotFound, clip_model.ClipLoadError) as exc:  # raised while the graph is built
        raise SystemExit(str(exc)) from None
    checks = [retrieve.RECONCILIATION, retrieve.STIMULI_RECONCILIATION]
    if compute:
        checks = [shards.RECONCILIATION, embed.RECONCILIATION, embed.WRITE_RECONCILIATION] + checks
    ok = print_summary("retrieve", counters, checks)
    get = lambda name: counters.get(f"retrieve.{name}", 0)  # noqa: E731
    out = args.out.rstrip("/")
    print(f"wrote {out}/stimuli/ ({get('positives'):,} positives and {get('negatives'):,} negatives for "
          f"{get('concepts_kept'):,} of {get('concepts_read'):,} concepts, {get('concepts_replacements'):,} of them from "
          f"the reserve; {get('deadletter_absent'):,} absent from the corpus; dropped ones in "
          f"{out}/deadletter/retrieve.jsonl, each concept's evidence in {out}/retrieve_evidence.parquet)"
          + (" [UNTRAINED CLIP: random weights]" if untrained else ""))
    return 0 if ok else 1
