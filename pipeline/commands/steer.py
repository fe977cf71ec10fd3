"""``daco steer``: generate with and without a steering method and print both side by side."""

HELP = "Generate from a prompt (and image) with and without steering, and print the two side by side."

METHODS = ("daco", "mop", "actadd", "prompting")
DEFENCES = ("refusal", "mars", "iar", "ras")
"""Published defences fitted on contrastive sets (docs/methods.md §4), not on the dictionary."""


def add_arguments(parser):
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id or local folder (loaded with from_pretrained through its family's adapter)")
    parser.add_argument("--untrained-family", default=None, metavar="FAMILY",
                        help="instead of --model, build a tiny randomly initialised model of this family offline "
                             "(qwen2_vl, qwen2_5_vl, llava, llava_next, internvl, qwen2, llama); its outputs are meaningless")
    parser.add_argument("--dictionary", default=None,
                        help="dictionary output folder or Hub dataset repo id (required for daco, mop, actadd, prompting)")
    parser.add_argument("--prompt", required=True, help="the user's text")
    parser.add_argument("--image", default=None, help="an image file to send with the prompt (multimodal models)")
    parser.add_argument("--method", choices=METHODS + DEFENCES, default="daco", help="steering method (default: daco)")
    parser.add_argument("--layers", default="15-19", help="decoder layers to steer, e.g. 15-19 or 3,5,8-9 (default: 15-19)")
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
    for kind, what in (("harmful", "harmful prompts"), ("harmless", "harmless prompts"),
                       ("refusal-responses", "refusal responses"), ("compliant-responses", "compliant responses")):
        group.add_argument(f"--{kind}", default=None, metavar="FILE",
                           help=f"JSONL file of {what} (default: the small set shipped in steering/data/)")
    group.add_argument("--refusal-mode", choices=("addition", "ablation"), default="addition",
                       help="refusal, when fitting: add the direction at the selected layer (the defence, default) or "
                            "ablate it at every layer (ATTACK: Arditi et al.'s jailbreak, removes refusal)")
    group.add_argument("--refusal-induce-threshold", type=float, default=0.0,
                       help="refusal, when fitting: discard candidate directions whose induce score (refusal score of "
                            "harmless prompts with the direction added) is below this (default 0.0, as Arditi et al.'s "
                            "code; =-inf keeps all, e.g. for an untrained model)")
    group.add_argument("--strength", type=float, default=1.0, help="mars: gain of the gate (default 1.0)")
    group.add_argument("--iar-level", choices=("layer", "head"), default="head", help="iar: layer or head level (default head)")
    group.add_argument("--iar-direction", choices=("mms", "pwd"), default="mms", help="iar: MMS or PWD (default mms)")
    group.add_argument("--iar-k", type=int, default=None, help="iar: units kept by probe accuracy (default 48 heads, 1 layer)")
    group.add_argument("--alpha", type=float, default=15.0, help="iar: strength alpha (default 15)")


def run(args, beam_args):
    import textwrap
    from pathlib import Path

    if (args.model is None) == (args.untrained_family is None):
        raise SystemExit("daco steer: give exactly one of --model ID (a pretrained model) or --untrained-family FAMILY")
    if args.image is not None and not Path(args.image).is_file():
        raise SystemExit(f"daco steer: --image {args.image} is not a file")
    if args.max_new_tokens < 1:
        raise SystemExit("daco steer: --max-new-tokens must be at least 1")

    from steering.dictionary import load_dictionary
    from steering.steerers import parse_layers

    try:
        layers = parse_layers(args.layers)
    except ValueError as exc:
        raise SystemExit(f"daco steer: --layers: {exc}") from None
    defence = args.method in DEFENCES
    if defence:
        sets = _defence_sets(args)
    elif args.dictionary is None:
        raise SystemExit(f"daco steer: --method {args.method} needs --dictionary (a dictionary output folder)")
    if args.method == "daco" and bool(args.sae) == args.untrained_sae:
        raise SystemExit("daco steer: --method daco steers with a trained SAE: pass --sae DIR (from `daco train-sae`), "
                         "or --untrained-sae for the dictionary-initialised SAE without training (not both)")
    try:
        dictionary = load_dictionary(args.dictionary, layers=layers) if args.dictionary else None
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"daco steer: --dictionary {args.dictionary}: {exc}") from None
    model, processor, name = _load_model(args, dictionary.d if dictionary else None, layers)
    steerer = (_build_defence(args, model, processor, layers, sets) if defence
               else _build_steerer(args, model, processor, dictionary, layers))
    untrained = bool(getattr(model.config, "untrained", False))

    messages = _conversation(args)
    unsteered = _generate(model, processor, messages, args)
    with steerer:
        _before_generation(steerer, processor, args)
        steered = _generate(model, processor, steerer.edit_messages(messages), args)

    print(f"model: {name}" + ("  [UNTRAINED: random weights, the text is meaningless]" if untrained else ""))
    if getattr(steerer, "attack", False):
        print("ATTACK: refusal-direction ablation (Arditi et al.'s jailbreak) removes refusal; it is not a defence")
    if defence:
        print(f"{'attack' if getattr(steerer, 'attack', False) else 'defence'}: {args.method}; "
              f"steered layers: {list(steerer.layers)}"
              + (f"; loaded from {args.steerer}" if args.steerer else "; fitted on the contrastive sets")
              + (f"; saved to {args.save_steerer}" if args.save_steerer else ""))
    else:
        print(f"dictionary: {args.dictionary} ({len(dictionary)} concepts, d={dictionary.d}); "
              f"method: {args.method}; layers: {list(layers)}; gamma: {args.gamma}"
              + (f"; SAE: {'trained, ' + args.sae if args.sae else 'untrained dictionary-initialised'}"
                 if args.method == "daco" else ""))
        if args.method != "prompting":
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


def _load_model(args, d, layers):
    """(model, processor, display name): the pretrained model, or an untrained one sized to the dictionary."""
    from steering.models import get_adapter

    if args.untrained_family:
        try:
            adapter = get_adapter(args.untrained_family)
        except ValueError as exc:
            raise SystemExit(f"daco steer: --untrained-family: {exc}") from None
        _check_image(adapter, args)
        size = {"num_hidden_layers": max(layers) + 1} | ({"hidden_size": d} if d is not None else {})
        model, processor = adapter.build_untrained(seed=args.seed, **size)
        hidden_size = model.get_input_embeddings().weight.shape[1]
        name = f"untrained {adapter.family} (seed {args.seed}, hidden {hidden_size}, {max(layers) + 1} layers)"
    else:
        from transformers import AutoConfig

        adapter = get_adapter(AutoConfig.from_pretrained(args.model))
        _check_image(adapter, args)
        model, processor = adapter.load(args.model, device=args.device)
        name = args.model
    hidden = model.get_input_embeddings().weight.shape[1]
    if d is not None and hidden != d:
        raise SystemExit(f"daco steer: the dictionary {args.dictionary} has d={d} but {name} has hidden size {hidden}; "
                         "use the dictionary built from this model")
    adapter.check_layers(model, list(layers))
    return model.to(args.device).eval(), processor, name


def _check_image(adapter, args):
    """Refuse --image for a text-only family before its model is built."""
    if args.image and not adapter.takes_images:
        raise SystemExit(f"daco steer: {adapter.family} is a text-only model family; drop --image")


def _build_steerer(args, model, processor, dictionary, layers):
    from steering.steerers.from_dictionary import dictionary_steerer

    try:
        return dictionary_steerer(args.method, model, dictionary, layers, gamma=args.gamma, sae_dir=args.sae,
                                  k=args.k, eta=args.eta, processor=processor)
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


def _build_defence(args, model, processor, layers, sets):
    """The defence loaded from --steerer, or fitted on the contrastive sets (then saved to --save-steerer)."""
    from steering.steerers import get_steerer

    cls = get_steerer(args.method)
    if args.steerer is not None:
        try:
            steerer = cls.load(args.steerer, model)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"daco steer: --steerer {args.steerer}: {exc}") from None
    else:
        steerer = _fit_defence(cls, args, model, processor, layers, sets)
    return steerer


def _fit_defence(cls, args, model, processor, layers, sets):
    """Fit the defence ``cls`` with the command's options (--layers are MARS's and IAR's candidate layers)."""
    try:
        if args.method == "refusal":
            steerer = cls.fit(model, processor, sets.harmful, sets.harmless, mode=args.refusal_mode,
                              induce_threshold=args.refusal_induce_threshold)
        elif args.method == "mars":
            steerer = cls.fit(model, processor, sets.harmful, sets.harmless, layers=layers, strength=args.strength)
        elif args.method == "iar":
            steerer = cls.fit(model, processor, sets.harmful, sets.refusal, sets.compliant, level=args.iar_level,
                              direction=args.iar_direction, layers=layers, k=args.iar_k, alpha=args.alpha)
        else:
            steerer = cls.fit(model, processor, sets.harmful, sets.harmless)
    except ValueError as exc:
        raise SystemExit(f"daco steer: fitting {args.method}: {exc}") from None
    if args.save_steerer:
        steerer.save(args.save_steerer)
    return steerer


def _before_generation(steerer, processor, args):
    """The steerer's per-item step (the same call as ``daco eval``'s); RAS's risk is printed."""
    from steering.contrastive import open_image

    details = steerer.before_generation(processor, [args.prompt], [open_image(args.image)])
    if args.method == "ras":
        (result,) = details
        print(f"ras: risk {result['risk']:.4f} (score {result['score']:.4f}, S_base {steerer.s_base:.4f})"
              + (f"; context: {result['context']}" if result["context"] else ""))


def _conversation(args):
    content = ([{"type": "image"}] if args.image else []) + [{"type": "text", "text": args.prompt}]
    return [{"role": "user", "content": content}]


def _generate(model, processor, messages, args):
    """Greedy continuation of the chat ``messages`` (text only, special tokens removed)."""
    import torch

    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if args.image:
        from PIL import Image

        with Image.open(args.image) as img:
            inputs = processor(text=[text], images=[img.convert("RGB")], return_tensors="pt")
    else:
        inputs = processor(text=[text], return_tensors="pt")
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
