"""``daco steer``: generate with and without a steering method and print both side by side."""

HELP = "Generate from a prompt (and image) with and without steering, and print the two side by side."

METHODS = ("daco", "mop", "actadd", "prompting")


def add_arguments(parser):
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id or local folder (loaded with from_pretrained through its family's adapter)")
    parser.add_argument("--untrained-family", default=None, metavar="FAMILY",
                        help="instead of --model, build a tiny randomly initialised model of this family offline "
                             "(qwen2_vl, qwen2_5_vl, llava, llava_next, internvl, qwen2, llama); its outputs are meaningless")
    parser.add_argument("--dictionary", required=True, help="dictionary output folder or Hub dataset repo id")
    parser.add_argument("--prompt", required=True, help="the user's text")
    parser.add_argument("--image", default=None, help="an image file to send with the prompt (multimodal models)")
    parser.add_argument("--method", choices=METHODS, default="daco", help="steering method (default: daco)")
    parser.add_argument("--layers", default="15-19", help="decoder layers to steer, e.g. 15-19 or 3,5,8-9 (default: 15-19)")
    parser.add_argument("--gamma", type=float, default=1.0,
                        help="strength: desirable atoms' code (daco), desirable amount (mop), coefficient (actadd)")
    parser.add_argument("--sae", default=None, metavar="DIR",
                        help="daco: folder with one saved SAE per layer as DIR/layer_<l>/ (default: the dictionary-"
                             "initialised SAE of each layer, one atom per concept, untrained)")
    parser.add_argument("--k", type=int, default=32, help="daco without --sae: TopK k of the dictionary-initialised SAE (capped at the number of concepts; default 32)")
    parser.add_argument("--eta", type=float, default=0.5,
                        help="daco: cosine threshold of the annotation's centroid rule (METHODS.md §3)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy; default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


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
    try:
        dictionary = load_dictionary(args.dictionary, layers=layers)
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"daco steer: --dictionary {args.dictionary}: {exc}") from None
    model, processor, name = _load_model(args, dictionary.d, layers)
    steerer = _build_steerer(args, model, dictionary, layers)
    untrained = bool(getattr(model.config, "untrained", False))

    messages = _conversation(args)
    unsteered = _generate(model, processor, messages, args)
    with steerer:
        steered = _generate(model, processor, steerer.edit_messages(messages), args)

    print(f"model: {name}" + ("  [UNTRAINED: random weights, the text is meaningless]" if untrained else ""))
    print(f"dictionary: {args.dictionary} ({len(dictionary)} concepts, d={dictionary.d}); "
          f"method: {args.method}; layers: {list(layers)}; gamma: {args.gamma}")
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
        model, processor = adapter.build_untrained(seed=args.seed, hidden_size=d, num_hidden_layers=max(layers) + 1)
        name = f"untrained {adapter.family} (seed {args.seed}, hidden {d}, {max(layers) + 1} layers)"
    else:
        from transformers import AutoConfig

        adapter = get_adapter(AutoConfig.from_pretrained(args.model))
        model, processor = adapter.load(args.model, device=args.device)
        name = args.model
    hidden = model.get_input_embeddings().weight.shape[1]
    if hidden != d:
        raise SystemExit(f"daco steer: the dictionary {args.dictionary} has d={d} but {name} has hidden size {hidden}; "
                         "use the dictionary built from this model")
    adapter.check_layers(model, list(layers))
    if args.image and not adapter.takes_images:
        raise SystemExit(f"daco steer: {name} is a text-only model; drop --image")
    return model.to(args.device).eval(), processor, name


def _build_steerer(args, model, dictionary, layers):
    from pathlib import Path

    from steering.steerers import ActAddSteerer, DacoSteerer, MOPSteerer, PromptingSteerer

    if args.method == "prompting":
        return PromptingSteerer(model)
    if args.method == "actadd":
        return ActAddSteerer.from_dictionary(model, dictionary, layers, coefficient=args.gamma)
    if args.method == "mop":
        return MOPSteerer.from_dictionary(model, dictionary, layers, gamma=args.gamma)
    from steering.annotate import annotate
    from steering.sae import SAE

    saes, undesirable, desirable = {}, {}, {}
    for layer in layers:
        if args.sae:
            folder = f"{args.sae.rstrip('/')}/layer_{layer}"
            if not Path(folder).is_dir():
                raise SystemExit(f"daco steer: --sae {args.sae} has no SAE for layer {layer} (expected {folder}/)")
            saes[layer] = SAE.load(folder)
        else:
            saes[layer] = SAE.from_dictionary(dictionary.directions(layer), k=min(args.k, len(dictionary)))
        labels = annotate(saes[layer], dictionary, args.eta, layer)
        undesirable[layer], desirable[layer] = list(labels.undesirable), list(labels.desirable)
    return DacoSteerer(model, saes, undesirable, desirable, gamma=args.gamma)


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
