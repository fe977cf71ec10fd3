"""``daco label --concepts FILE --model ID --out FILE``: polarity labels from a language model.

The optional model labeller of docs/concepts.md (transforms/label.py): writes a copy of the
concepts file whose ``polarity`` is the model's label and ``polarity_source`` is
``model:<ID>``, and prints the agreement with the lexicon's labels (also as JSON with --report).
The lexicon stays the default; pass the written file to later stages to use the model's labels.
"""

HELP = "Label concepts desirable / undesirable / neutral with a language model; report agreement with the lexicon."


def add_arguments(parser):
    parser.add_argument("--concepts", required=True, help="concepts.parquet (from `daco concepts`)")
    parser.add_argument("--model", required=True, help="a causal LM: hub id or local folder (AutoModelForCausalLM)")
    parser.add_argument("--out", required=True, help="the relabelled concepts parquet to write")
    parser.add_argument("--report", default=None, help="also write the agreement as JSON here")
    parser.add_argument("--batch-size", type=int, default=16, help="concepts per forward pass (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args, beam_args):
    import json

    from transforms import fileio
    from transforms.label import agreement, label_rows, load_model, relabel

    try:
        table = fileio.read_parquet(args.concepts)
    except Exception as exc:  # noqa: BLE001 - say which file
        raise SystemExit(f"--concepts {args.concepts}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    missing = {"concept_id", "lemma", "definition", "polarity", "polarity_source"} - set(table.column_names)
    if missing:
        raise SystemExit(f"--concepts {args.concepts}: missing column(s) {sorted(missing)} (expected concepts.parquet)")
    try:
        model, tokenizer = load_model(args.model, args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    rows = table.to_pylist()
    labels = label_rows(rows, model, tokenizer, args.batch_size)
    fileio.write_parquet_atomic(args.out, relabel(table, labels, args.model))
    summary = {"model": args.model, **agreement([r["polarity"] for r in rows], labels)}
    if args.report:
        fileio.write_bytes_atomic(args.report, json.dumps(summary, indent=2, sort_keys=True).encode())
    per = ", ".join(f"{k} {v:.0%}" for k, v in summary["per_lexicon_label"].items() if v is not None)
    print(f"wrote {args.out}: {len(labels):,} concepts labelled by {args.model} (polarity_source model:{args.model})")
    print(f"agreement with the lexicon: {summary['agreement']:.1%} of {summary['n']:,} ({per})")
    return 0
