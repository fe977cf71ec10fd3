"""``daco eval``: safety and utility of steering methods on benchmarks (table, JSON, trade-off plot)."""

HELP = "Generate with each steering method on safety and utility benchmarks; write a table, JSON and a trade-off plot."


def add_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="Hugging Face model id or local folder, or untrained:FAMILY (e.g. untrained:qwen2) for a tiny "
                             "seeded model whose outputs are meaningless")
    parser.add_argument("--methods", default="none,prompting",
                        help="comma-separated: none, prompting, actadd, mop, daco, refusal, mars, iar, ras, and the "
                             "ATTACK refusal_ablation (Arditi et al.'s jailbreak, labelled as such) (default none,prompting)")
    parser.add_argument("--bench", action="append", default=[], metavar="NAME:PATH", required=True,
                        help="a benchmark and its local folder/file (or a Hub dataset id, with network); repeat for more. "
                             "Names: mm-safetybench[-sd|-typo|-text], jailbreakv-28k[-mini], figstep, safebench-tiny, "
                             "scienceqa, mmbench")
    parser.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per benchmark, taken round-robin over its categories")
    parser.add_argument("--dictionary", default=None, help="dictionary folder or Hub id (needed by actadd, mop, daco)")
    parser.add_argument("--layers", default=None, help="decoder layers to steer, e.g. 15-19 (default 15-19)")
    parser.add_argument("--gamma", type=float, default=0.1,
                        help="strength of actadd, mop and daco in one unit: the mean activation norm at each steered "
                             "layer (each desirable concept pushed by gamma x that norm; docs/defences.md); default 0.1")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file whose defences: section sets the fit options of refusal, mars, iar, ras "
                             "(defences: {iar: {k: 8}}; docs/defences.md); default: each method's defaults")
    parser.add_argument("--refusal-induce-threshold", type=float, default=None,
                        help="refusal: discard candidate directions whose induce score is below this (default 0.0 as "
                             "Arditi et al.'s code; =-inf keeps all, e.g. for an untrained model); overrides --config")
    parser.add_argument("--sae", default=None, metavar="DIR",
                        help="daco: folder with one trained SAE per layer as DIR/layer_<l>/ (`daco train-sae`)")
    parser.add_argument("--untrained-sae", action="store_true",
                        help="daco without --sae: each layer's dictionary-initialised SAE, untrained (named in the output)")
    parser.add_argument("--steerers", default=None, metavar="DIR",
                        help="refusal, mars, iar, ras: folder with one saved steerer per method as DIR/<method>/ "
                             "(default: fitted on the shipped contrastive sets and saved under OUT/steerers/<method>/)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per item (greedy; default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed before every generation and of untrained models (default 0)")
    parser.add_argument("--judge", choices=("refusal", "llama-guard"), default="refusal",
                        help="refusal: keyword refusal scorer (default); llama-guard: also judge every response with Llama Guard")
    parser.add_argument("--judge-model", default="meta-llama/Llama-Guard-3-8B", help="Llama Guard model id or folder")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args, beam_args):
    from pathlib import Path

    from pipeline.config import defence_configs, override
    from steering.eval.benchmarks import BenchmarkError
    from steering.eval.run import EvalConfig, EvalError, parse_bench, run_eval
    from transforms.outdir import OutputFolderError, check_writable, writer_lock

    defences = defence_configs(args.config)
    defences["refusal"] = override(defences["refusal"], {"induce_threshold": args.refusal_induce_threshold}, "refusal")
    try:
        config = EvalConfig(model=args.model, methods=args.methods.split(","), benches=[parse_bench(b) for b in args.bench],
                            out=args.out, limit=args.limit, dictionary=args.dictionary, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, layers=args.layers, gamma=args.gamma,
                            defences=defences, sae=args.sae,
                            untrained_sae=args.untrained_sae, steerers=args.steerers, judge=args.judge,
                            judge_model=args.judge_model, device=args.device)
        check_writable(args.out)
        with writer_lock(args.out, "daco eval"):  # a second eval into the folder would count items twice
            metrics = run_eval(config)
    except (EvalError, BenchmarkError, FileNotFoundError, ConnectionError, OutputFolderError) as exc:
        raise SystemExit(f"daco eval: {exc}") from None
    out = Path(args.out)
    print((out / "table.md").read_text())
    print(f"eval: {metrics['generated']} generated, {metrics['skipped']} already done, "
          f"{metrics['dead_letters']} dead-lettered (unreadable image; {out / 'deadletter.jsonl'}); "
          f"results {out / 'results.jsonl'}, table {out / 'table.md'}, metrics {out / 'metrics.json'}, plot {out / 'tradeoff.png'}")
    return 0
