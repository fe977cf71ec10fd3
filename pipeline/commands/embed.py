"""``daco embed``: webdataset shards -> OUT/embeddings/ (clip-retrieval layout)."""

HELP = "Embed the images and captions of webdataset shards with CLIP into OUT/embeddings/ (clip-retrieval layout)."
BEAM_OPTIONS = True


def add_clip_arguments(parser):
    """The ``--clip-*`` options (shared with the commands that embed concepts)."""
    parser.add_argument("--clip-model", default=None,
                        help="open_clip architecture, e.g. ViT-L-14, ViT-B-32, daco-tiny-clip (default: the config's, ViT-L-14)")
    parser.add_argument("--clip-pretrained", default=None,
                        help="open_clip pretrained tag (e.g. laion2b_s32b_b82k) or a local checkpoint file")
    parser.add_argument("--clip-allow-untrained", action="store_true", default=None,
                        help="without weights, use random weights from --clip-seed (outputs are marked untrained)")
    parser.add_argument("--clip-no-download", action="store_true", default=None,
                        help="only look in open_clip's cache for a pretrained tag (fail fast offline)")
    parser.add_argument("--clip-batch-size", type=int, default=None, help="records per model call (default 64)")
    parser.add_argument("--clip-device", default=None, help="auto (GPU when present), cpu, cuda, cuda:N")
    parser.add_argument("--clip-precision", default=None, help="auto (fp32 on CPU, amp_bf16 on GPU), fp32, amp_bf16, amp_fp16")
    parser.add_argument("--clip-seed", type=int, default=None, help="seed of the random weights of an untrained model")
    parser.add_argument("--demo-clip", action="store_true",
                        help="the embedded demo's model: daco-tiny-clip with random weights (untrained), for offline runs")


def clip_config_from_args(args):
    """The ClipConfig of a command: --demo-clip or the config file's 'clip:' section, then the --clip-* options."""
    from pipeline.config import load_config_file, override, section
    from transforms.clip_model import DEMO_CLIP, ClipConfig

    cfg = DEMO_CLIP if args.demo_clip else section(load_config_file(args.config), "clip", ClipConfig, args.config)
    return override(cfg, {
        "model_name": args.clip_model, "pretrained": args.clip_pretrained, "allow_untrained": args.clip_allow_untrained,
        "download": False if args.clip_no_download else None, "batch_size": args.clip_batch_size,
        "device": args.clip_device, "precision": args.clip_precision, "seed": args.clip_seed,
    }, "clip")


def add_arguments(parser):
    parser.add_argument("--shards", required=True,
                        help="webdataset shards: a path, a glob (DIR/*.tar) or any Beam filesystem URL")
    parser.add_argument("--out", required=True, help="output directory (local path or any Beam filesystem URL)")
    parser.add_argument("--config", default=None, help="YAML config file; its 'clip:' section is used")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute even when OUT/embeddings already holds embeddings")
    add_clip_arguments(parser)


def run(args, beam_args):
    import json

    from pipeline.runner import print_summary, quiet_beam_logging, run_pipeline
    from transforms import fileio
    from transforms.shards import RECONCILIATION as SHARDS_RECONCILIATION
    from transforms.shards import ReadShards, ShardsNotFound
    from transforms.clip_model import ClipLoadError, resolve_clip_config
    from transforms.embed import RECONCILIATION, WRITE_RECONCILIATION, ComputeEmbeddings
    from transforms.embeddings_layout import (EmbeddingsLayoutError, check_matches_clip, embeddings_exist,
                                             read_embeddings)

    quiet_beam_logging()
    cfg = clip_config_from_args(args)
    emb_dir = fileio.join(args.out, "embeddings")
    if embeddings_exist(emb_dir) and not args.overwrite:
        try:  # the same model? (the one check shared with build and retrieve)
            check_matches_clip(emb_dir, cfg, resolve_clip_config(cfg))
            n = len(read_embeddings(emb_dir)[2])
        except (EmbeddingsLayoutError, ClipLoadError) as exc:
            raise SystemExit(f"{exc}\n(or pass --overwrite to recompute them)") from None
        print(f"{emb_dir} already holds {n:,} embeddings; skipping the embedding stage (--overwrite recomputes)")
        return 0

    def build(p):
        records = p | "ReadShards" >> ReadShards(args.shards, args.out)
        records | "ComputeEmbeddings" >> ComputeEmbeddings(args.out, cfg)

    try:
        counters = run_pipeline(build, beam_args)
    except (ClipLoadError, ShardsNotFound) as exc:  # raised while the graph is built, before any work
        raise SystemExit(str(exc)) from None
    ok = print_summary("embed", counters, [SHARDS_RECONCILIATION, RECONCILIATION, WRITE_RECONCILIATION])
    meta = json.loads(fileio.read_bytes(fileio.join(emb_dir, "embeddings.json")))
    trained = "UNTRAINED (random weights)" if meta["untrained"] else f"weights {meta['weights']}"
    print(f"wrote {emb_dir} ({meta['n']:,} image-caption pairs, {meta['model_name']}, {trained})")
    return 0 if ok else 1
