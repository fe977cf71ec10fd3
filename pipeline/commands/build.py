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
    parser.add_argument("--workers", default=None, metavar="N|auto",
                        help="local runner only: N worker processes (auto: one per core); default one")
    parser.add_argument("--accelerator", default=None, metavar="HINT",
                        help="GPU for both model stages as a Beam accelerator resource hint, e.g. "
                        "'type:nvidia-l4;count:1;install-nvidia-driver' (a bare type such as nvidia-l4 means "
                        "count 1 with the driver); overrides clip.accelerator and mllm.accelerator")
    parser.add_argument("--dataflow-plan", default=None, metavar="FILE",
                        help="with --runner DataflowRunner: check the options, write the job description "
                        "Dataflow would receive (graphs, resource hints, options) to FILE as JSON and exit; "
                        "no network, no credentials, nothing submitted (dataflow/README.md)")


def run(args, beam_args):
    from pipeline import dataflow
    from pipeline.build import load_build_config, run_build
    from pipeline.runner import local_worker_args
    from transforms.outdir import OutputFolderError

    cfg = load_build_config(args.config, args.preset)
    if args.accelerator:
        cfg = dataflow.set_accelerator(cfg, dataflow.expand_accelerator(args.accelerator))
    on_dataflow = dataflow.is_dataflow(beam_args)
    try:
        if args.workers is not None:
            if on_dataflow:
                raise dataflow.DataflowOptionsError("workers_local")
            beam_args = [*beam_args, *local_worker_args(args.workers)]
        if args.dataflow_plan or on_dataflow:
            launch = dataflow.Launch(out=args.out, shards=args.shards, embeddings=args.embeddings, cfg=cfg,
                                     beam_args=beam_args)
            if args.dataflow_plan:
                if not on_dataflow:
                    raise dataflow.DataflowOptionsError("plan_runner")
                dataflow.print_plan_summary(dataflow.write_plan(launch, args.dataflow_plan), args.dataflow_plan)
                return 0
            dataflow.validate(launch)
    except ValueError as exc:
        raise SystemExit(f"daco build: {exc}") from None
    try:
        return run_build(cfg, args.out, args.shards, args.embeddings, beam_args)
    except OutputFolderError as exc:
        raise SystemExit(f"daco build: {exc}") from None
