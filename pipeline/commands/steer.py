"""``daco steer``: generate with and without a steering method and print both side by side."""

HELP = "Generate from a prompt (and image) with and without steering, and print the two side by side."

FIT_FLAGS = {  # method: {fit option: the flag's argparse name}; --layers is apart (see _fit_config)
    "refusal": {"mode": "refusal_mode", "induce_threshold": "refusal_induce_threshold"},
    "mars": {"strength": "strength"},
    "iar": {"level": "iar_level", "direction": "iar_direction", "k": "iar_k", "alpha": "alpha"},
}


def add_arguments(parser):
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id or local folder (loaded with from_pretrained through its family's adapter)")
    parser.add_argument("--untrained-family", default=None, metavar="FAMILY",
                        help="instead of --model, build a tiny randomly initialised model of this family offline "
                             "(qwen2_vl, qwen2_5_vl, llava, llava_next, internvl, qwen2, llama); its outputs are meaningless")
    parser.add_argument("--dictionary", default=None,
                        help="dictionary output folder or Hub dataset repo id (required by the methods that steer with "
                             "it: daco, mop, actadd)")
    parser.add_argument("--prompt", required=True, help="the user's text")
    parser.add_argument("--image", default=None, help="an image file to send with the prompt (multimodal models)")
    parser.add_argument("--method", default="daco",
                        help="a registered steering method (steering.steerers.STEERERS: daco, mop, actadd, prompting, "
                             "and the defences refusal, mars, iar, ras); default daco")
    parser.add_argument("--layers", default=None,
                        help="decoder layers to steer, e.g. 15-19 or 3,5,8-9 (default: 15-19); for mars and iar the "
                             "candidate layers (default: the config's defences section, else 15-19)")
    parser.add_argument("--gamma", type=float, default=0.1,
                        help="strength of daco, mop and actadd in one unit: the mean activation norm at each steered "
                             "layer (each desirable concept pushed by gamma x that norm; docs/defences.md); default 0.1")
    parser.add_argument("--sae", default=None, metavar="DIR",
                        help="daco: folder with one trained SAE per layer as DIR/layer_<l>/ (`daco train-sae`)")
    parser.add_argument("--untrained-sae", action="store_true",
                        help="daco without --sae: the dictionary-initialised SAE of each layer, one atom per concept, "
                             "untrained")
    parser.add_argument("--k", type=int, default=32, help="daco with --untrained-sae: TopK k of the dictionary-initialised SAE (capped at the number of concepts; default 32)")
    parser.add_argument("--eta", type=float, default=0.5,
                        help="daco: cosine threshold of the annotation's centroid rule (docs/methods.md §3)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy; default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _add_defence_arguments(parser)


def _add_defence_arguments(parser):
    """Options of the published defences (--method refusal|mars|iar|ras)."""
    group = parser.add_argument_group("defences (--method refusal, mars, iar, ras)")
    group.add_argument("--steerer", default=None, metavar="DIR", help="load a fitted defence saved in DIR (skips fitting)")
    group.add_argument("--save-steerer", default=None, metavar="DIR", help="save the fitted defence into DIR")
    group.add_argument("--config", default=None, metavar="FILE",
                       help="YAML file whose defences: section sets each defence's fit options (defences: {iar: "
                            "{k: 8}}; docs/defences.md); the flags below override it")
    for kind, what in (("harmful", "harmful prompts"), ("harmless", "harmless prompts"),
                       ("refusal-responses", "refusal responses"), ("compliant-responses", "compliant responses")):
        group.add_argument(f"--{kind}", default=None, metavar="FILE",
                           help=f"JSONL file of {what} (default: the small set shipped in steering/data/)")
    group.add_argument("--refusal-mode", choices=("addition", "ablation"), default=None,
                       help="refusal, when fitting: add the direction at the selected layer (the defence, default) or "
                            "ablate it at every layer (ATTACK: Arditi et al.'s jailbreak, removes refusal)")
    group.add_argument("--refusal-induce-threshold", type=float, default=None,
                       help="refusal, when fitting: discard candidate directions whose induce score (refusal score of "
                            "harmless prompts with the direction added) is below this (default 0.0, as Arditi et al.'s "
                            "code; =-inf keeps all, e.g. for an untrained model)")
    group.add_argument("--strength", type=float, default=None, help="mars: gain of the gate (default 1.0)")
    group.add_argument("--iar-level", choices=("layer", "head"), default=None, help="iar: layer or head level (default head)")
    group.add_argument("--iar-direction", choices=("mms", "pwd"), default=None, help="iar: MMS or PWD (default mms)")
    group.add_argument("--iar-k", type=int, default=None, help="iar: units kept by probe accuracy (default 48 heads, 1 layer)")
    group.add_argument("--alpha", type=float, default=None, help="iar: strength alpha (default 15)")


def run(args, beam_args):
    import textwrap
    from pathlib import Path

    if (args.model is None) == (args.untrained_family is None):
        raise SystemExit("daco steer: give exactly one of --model ID (a pretrained model) or --untrained-family FAMILY")
    if args.image is not None and not Path(args.image).is_file():
        raise SystemExit(f"daco steer: --image {args.image} is not a file")
    if args.max_new_tokens < 1:
        raise SystemExit("daco steer: --max-new-tokens must be at least 1")

    from steering.contrastive import open_image
    from steering.dictionary import load_dictionary
    from steering.generation import UNTRAINED_PREFIX, generate, load_model
    from steering.steerers import get_steerer, parse_layers

    try:
        cls = get_steerer(args.method)
    except ValueError as exc:
        raise SystemExit(f"daco steer: --method: {exc}") from None
    try:
        layers = parse_layers(args.layers)
    except ValueError as exc:
        raise SystemExit(f"daco steer: --layers: {exc}") from None
    sets = _defence_sets(args) if cls.fitted else None
    fit = _fit_config(cls, args) if cls.fitted and args.steerer is None else None
    if cls.needs_dictionary and args.dictionary is None:
        raise SystemExit(f"daco steer: --method {args.method} needs --dictionary (a dictionary output folder)")
    if args.method == "daco":
        from steering.steerers.from_dictionary import check_sae_choice

        try:
            check_sae_choice(args.sae, args.untrained_sae)
        except ValueError as exc:
            raise SystemExit(f"daco steer: --method daco: {exc}") from None
    try:
        dictionary = load_dictionary(args.dictionary, layers=layers) if args.dictionary else None
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"daco steer: --dictionary {args.dictionary}: {exc}") from None
    spec = args.model or UNTRAINED_PREFIX + args.untrained_family
    try:
        model, processor, _, name = load_model(spec, dictionary.d if dictionary else None, layers, args.seed,
                                               args.device, images=args.image is not None)
    except ValueError as exc:
        raise SystemExit(f"daco steer: {exc}") from None
    steerer = (_load_or_fit_defence(cls, args, model, processor, sets, fit) if cls.fitted
               else _build_steerer(cls, args, model, processor, dictionary, layers))
    untrained = bool(getattr(model.config, "untrained", False))

    image = open_image(args.image)
    unsteered = generate(model, processor, args.prompt, image, None, args.max_new_tokens, args.seed).text
    result = generate(model, processor, args.prompt, image, steerer, args.max_new_tokens, args.seed)
    for detail in result.details or ():
        print(f"{args.method}: {steerer.describe(detail)}")
    steered = result.text

    print(f"model: {name}" + ("  [UNTRAINED: random weights, the text is meaningless]" if untrained else ""))
    if getattr(steerer, "attack", False):
        print("ATTACK: refusal-direction ablation (Arditi et al.'s jailbreak) removes refusal; it is not a defence")
    if cls.fitted:
        print(f"{'attack' if getattr(steerer, 'attack', False) else 'defence'}: {args.method}; "
              f"steered layers: {list(steerer.layers)}"
              + (f"; loaded from {args.steerer}" if args.steerer else "; fitted on the contrastive sets")
              + (f"; saved to {args.save_steerer}" if args.save_steerer else ""))
    elif dictionary is None:
        print(f"method: {args.method} (no dictionary)")
    else:
        print(f"dictionary: {args.dictionary} ({len(dictionary)} concepts, d={dictionary.d}); "
              f"method: {args.method}; layers: {list(layers)}; gamma: {args.gamma}"
              + (f"; SAE: {'trained, ' + args.sae if args.sae else 'untrained dictionary-initialised'}"
                 if args.method == "daco" else ""))
        if cls.needs_dictionary:
            from steering.steerers.from_dictionary import STRENGTH_UNIT

            print(f"strength unit: {STRENGTH_UNIT}")
    width = 48
    left = textwrap.wrap(unsteered, width) or [""]
    right = textwrap.wrap(steered, width) or [""]
    print(f"{'unsteered':<{width}} | steered ({args.method})")
    print(f"{'-' * width}-+-{'-' * width}")
    for i in range(max(len(left), len(right))):
        print(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    return 0


def _build_steerer(cls, args, model, processor, dictionary, layers):
    """A method built from the dictionary and the common options (gamma in the shared unit)."""
    from steering.steerers import BuildOptions

    try:
        return cls.build(BuildOptions(model, processor, layers, dictionary, gamma=args.gamma, sae_dir=args.sae,
                                      k=args.k, eta=args.eta))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"daco steer: {exc}") from None


def _defence_sets(args):
    """The contrastive sets (user files or the shipped defaults), read and checked before any model loads."""
    from steering.contrastive import ContrastiveSets

    if args.steerer is not None:
        if args.save_steerer:
            raise SystemExit("daco steer: --save-steerer saves a freshly fitted defence; drop it when loading --steerer")
        return None
    try:
        return ContrastiveSets.from_files(args.harmful, args.harmless, args.refusal_responses, args.compliant_responses)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"daco steer: {exc}") from None


def _fit_config(cls, args):
    """The defence's fit config: the --config file's ``defences:`` section, then the flags the user gave.

    MARS's and IAR's candidate layers are ``--layers`` when given, else the section's, else
    15-19 (the steered layers' default)."""
    from pipeline.config import defence_configs, override
    from steering.steerers import parse_layers

    cfg = defence_configs(args.config)[cls.name]
    flags = {option: getattr(args, name) for option, name in FIT_FLAGS.get(cls.name, {}).items()}
    if hasattr(cfg, "layers") and (args.layers is not None or cfg.layers is None):
        flags["layers"] = list(parse_layers(args.layers))
    return override(cfg, flags, cls.name)


def _load_or_fit_defence(cls, args, model, processor, sets, fit):
    """The defence loaded from --steerer, or fitted on the contrastive sets (then saved to --save-steerer)."""
    from steering.steerers import BuildOptions

    if args.steerer is not None:
        try:
            return cls.load(args.steerer, model)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"daco steer: --steerer {args.steerer}: {exc}") from None
    try:
        steerer = cls.build(BuildOptions(model, processor, sets=sets, fit=fit))
    except ValueError as exc:
        raise SystemExit(f"daco steer: fitting {args.method}: {exc}") from None
    if args.save_steerer:
        steerer.save(args.save_steerer)
    return steerer
