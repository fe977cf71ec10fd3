"""``daco concepts``: WordNet -> OUT/concepts.parquet."""

HELP = "Select visual concepts from WordNet 3.0 and write OUT/concepts.parquet."
BEAM_OPTIONS = True


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory (local path or any Beam filesystem URL)")
    parser.add_argument("--max-concepts", type=int, default=None,
                        help="number of concepts to keep (default: the config's, 15000)")
    parser.add_argument("--config", default=None, help="YAML config file; its 'concepts:' section is used")
    parser.add_argument("--wordnet-dir", default=None,
                        help="WordNet 3.0 database directory (default: $WNSEARCHDIR, NLTK's data, /usr/share/wordnet)")


def run(args, beam_args):
    from pipeline.build import concepts_graph
    from pipeline.config import load_config_file, override, section
    from pipeline.runner import quiet_beam_logging, run_pipeline, print_summary
    from transforms.concepts import ConceptsConfig, RECONCILIATION
    from transforms.wordnet import WordNetNotFound, find_wordnet

    quiet_beam_logging()
    cfg = override(section(load_config_file(args.config), "concepts", ConceptsConfig, args.config),
                   {"max_concepts": args.max_concepts, "wordnet_dir": args.wordnet_dir}, "concepts")
    try:
        find_wordnet(cfg.wordnet_dir)  # fail before any pipeline work
    except WordNetNotFound as exc:
        raise SystemExit(str(exc)) from None

    counters = run_pipeline(lambda p: concepts_graph(p, out=args.out, cfg=cfg), beam_args)
    ok = print_summary("concepts", counters, [RECONCILIATION])
    print(f"wrote {args.out.rstrip('/')}/concepts.parquet ({counters.get('concepts.kept', 0):,} concepts "
          f"and a reserve of {counters.get('concepts.reserve', 0):,} for retrieval to draw on)")
    return 0 if ok else 1
