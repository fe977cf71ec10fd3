"""``daco corpus``: an embedded image-caption corpus in LAION's webdataset format (see transforms/corpus.py)."""

HELP = ("Draw an image-caption corpus of WordNet concepts, serve it on 127.0.0.1 and fetch it with img2dataset "
        "into LAION-style webdataset shards (OUT/shards/) plus OUT/corpus_truth.parquet.")


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory (local)")
    parser.add_argument("--n", type=int, default=2000, help="number of image-caption pairs (default 2000)")
    parser.add_argument("--concepts", default=None,
                        help="concepts.parquet to draw concepts from (default: ~60 built-in picturable WordNet nouns)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed and --n: same corpus)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--shard-size", type=int, default=1000, help="records per webdataset shard (default 1000)")
    parser.add_argument("--wordnet-dir", default=None,
                        help="WordNet 3.0 database directory for the built-in concepts (default: see `daco concepts`)")


def run(args, beam_args):
    import time

    from transforms.corpus import build_corpus
    from transforms.wordnet import WordNetNotFound

    start = time.monotonic()
    try:
        summary = build_corpus(args.out, n=args.n, concepts_path=args.concepts, seed=args.seed,
                               image_size=args.image_size, shard_size=args.shard_size, wordnet_dir=args.wordnet_dir)
    except (ValueError, WordNetNotFound) as exc:
        raise SystemExit(str(exc)) from None
    kinds = ", ".join(f"{count:,} {kind}" for kind, count in summary.kinds.items())
    print(f"wrote {summary.out_dir}: {summary.n_pairs:,} pairs ({kinds}) of {summary.n_concepts} concepts "
          f"in {summary.n_shards} shard(s) under shards/, corpus_truth.parquet, concepts.parquet "
          f"({time.monotonic() - start:.1f}s)")
    return 0
