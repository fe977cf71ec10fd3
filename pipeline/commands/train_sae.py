"""``daco train-sae``: train one dictionary-initialised TopK SAE per layer on the MLLM's token activations.

See ``pipeline/train_sae.py`` for the run and docs/train-sae.md for the guide.
"""

HELP = ("Train one dictionary-initialised TopK SAE per layer on the MLLM's per-token activations over the "
        "stimuli; write SAELens-format folders, the atom annotation and a card.")


def add_arguments(parser):
    from pipeline.build import PRESETS

    parser.add_argument("--dictionary", required=True,
                        help="output folder of `daco build`: its dictionary initialises the atoms, its stimuli/ are "
                             "the default stimuli and its metadata.json names the shards")
    parser.add_argument("--out", required=True, help="folder for the SAEs (layer_<l>/), training.json, README.md")
    parser.add_argument("--shards", default=None,
                        help="webdataset shards holding the stimuli's images, a glob (default: the shards the "
                             "dictionary was built from, from its metadata.json)")
    parser.add_argument("--stimuli", choices=("dictionary", "all"), default="dictionary",
                        help="dictionary: the distinct images of DICTIONARY/stimuli/ (default); all: every shard record")
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="named configuration (its mllm: and sae: sections; default: default)")
    parser.add_argument("--config", default=None, help="YAML file with mllm: and sae: sections (see docs/train-sae.md)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly where it stopped")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="stop at the first stimulus batch after N optimiser steps in this call, write a "
                             "checkpoint and exit 3 (for time-limited machines; continue with --resume)")


def run(args, beam_args):
    import json
    from pathlib import Path

    import torch

    from pipeline.train_sae import CHECKPOINT, Run, load_train_config, stimulus_keys, train, write_outputs
    from steering.dictionary import load_dictionary
    from steering.models import is_untrained

    mllm, cfg, source = load_train_config(args.config, args.preset)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise SystemExit("daco train-sae: --stop-after-steps must be at least 1")
    folder = Path(args.dictionary)
    metadata_path = folder / "metadata.json"
    if not metadata_path.is_file():
        raise SystemExit(f"daco train-sae: --dictionary {folder} has no metadata.json; give an output folder of `daco build`")
    metadata = json.loads(metadata_path.read_text())
    built_with = (metadata.get("models") or {}).get("mllm", {}).get("id")
    wanted = mllm.model_id or f"untrained:{mllm.family}"
    if built_with and built_with != wanted:
        raise SystemExit(f"daco train-sae: {folder} was built with {built_with} but the config's mllm is {wanted}; "
                         "use the preset or config the dictionary was built with")
    shards = args.shards or metadata.get("shards")
    if not shards:
        raise SystemExit(f"daco train-sae: {metadata_path} names no shards; pass --shards GLOB")
    if not args.shards and "://" not in shards and not Path(shards).is_absolute():
        shards = str(folder / shards)  # metadata.json records shards inside the folder relative to it
    try:
        dictionary = load_dictionary(folder, layers=mllm.layers)
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"daco train-sae: --dictionary {folder}: {exc}") from None
    keys = stimulus_keys(str(folder)) if args.stimuli == "dictionary" else None

    out = Path(args.out)
    checkpoint = out / CHECKPOINT
    if checkpoint.exists() and not args.resume:
        raise SystemExit(f"daco train-sae: {checkpoint} exists; pass --resume to continue it, or choose another --out")
    if args.resume and not checkpoint.exists():
        raise SystemExit(f"daco train-sae --resume: {checkpoint} does not exist (nothing to resume)")
    out.mkdir(parents=True, exist_ok=True)
    run_ = Run(out, dictionary, mllm, cfg, shards, keys, source)
    if args.resume:
        run_.load_state_dict(torch.load(checkpoint, weights_only=False))
        print(f"[train-sae] resumed at step {run_.step} (pass {run_.position['pass']}, "
              f"{run_.position['records']} stimuli into it)", flush=True)
    if not train(run_, args.stop_after_steps):
        print(f"[train-sae] stopped after step {run_.step}; checkpoint {checkpoint}; continue with --resume", flush=True)
        return 3
    untrained = is_untrained(run_.loaded.model) or bool(metadata.get("untrained"))
    info = write_outputs(run_, untrained)
    checkpoint.unlink(missing_ok=True)
    print(f"train-sae: {info['counts']['tokens_trained']:,} tokens from {info['counts']['stimuli']:,} stimuli "
          f"({sum(v for k, v in info['counts'].items() if k.startswith('deadletter'))} dead-lettered), "
          f"{run_.step} steps" + ("  [UNTRAINED model: the SAEs mean nothing]" if untrained else ""))
    for layer, v in info["layers"].items():
        print(f"  layer {layer}: fvu {v['fvu']:.4f}  l0 {v['l0']:.1f}  dead {v['dead_fraction']:.3f}  "
              f"undesirable atoms {v['undesirable_atoms']}  desirable atoms {v['desirable_atoms']}")
    print(f"SAEs: {out}/layer_<l>/ ; card {out / 'README.md'} ; summary {out / 'training.json'}")
    return 0
