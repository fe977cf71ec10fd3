"""``daco build``: the whole pipeline, WordNet to the DACO-400K dictionary."""

HELP = ("Build the DACO-400K dataset end to end (concepts, stimuli, activations, directions). "
        "With no arguments: the embedded default (generated corpus, seeded tiny CLIP and MLLM) into ./daco-out.")
BEAM_OPTIONS = True


def add_arguments(parser):
    from pipeline.build import PRESETS

    parser.add_argument("--config", default=None, help="YAML config file with sections concepts, corpus, clip, "
                        "retrieve, mllm (see pipeline/presets/*.yaml)")
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="a named configuration (default: 'default', the embedded offline run); the real jobs "
                        "(cc3m-qwen2.5-vl-7b, laion-llava-1.5-7b) document what they download")
    parser.add_argument("--shards", default=None,
                        help="webdataset shards (path, glob or gs:// URL) as img2dataset writes them; "
                        "default: generate the embedded corpus")
    parser.add_argument("--embeddings", default=None,
                        help="CLIP embeddings already in clip-retrieval layout (e.g. LAION's); skips the CLIP stage")
    parser.add_argument("--out", default="daco-out", help="output directory (local path or Beam filesystem URL)")


def run(args, beam_args):
    from pipeline.build import load_build_config, run_build

    cfg = load_build_config(args.config, args.preset)
    return run_build(cfg, args.out, args.shards, args.embeddings, beam_args)
