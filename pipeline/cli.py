"""The ``daco`` command line: one subcommand per module in ``pipeline/commands/``.

A command module (``train_sae.py`` is ``daco train-sae``) defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args, beam_args) -> int``; ``BEAM_OPTIONS = True`` lets it accept Beam's
pipeline options (``--runner``, ``--direct_num_workers``, ...) after its own.
Command modules import heavy libraries inside ``run`` so that ``--help`` is fast.

Every command rejects an option it does not know: for a Beam command, an option that
neither the command nor any of Beam's pipeline-option classes defines is an error
naming it and its close matches (it would otherwise vanish silently inside Beam).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import pkgutil
import sys

from pipeline import commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield info.name.replace("_", "-"), importlib.import_module(f"pipeline.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="daco",
        description="DACO-400K: build a dictionary of visual concept directions from WordNet, "
        "caption-image stimuli and a multimodal LLM, and steer models with it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _command_modules():
        beam_note = " Beam pipeline options (--runner, --direct_num_workers, ...) may follow." if getattr(module, "BEAM_OPTIONS", False) else ""
        p = sub.add_parser(name, help=module.HELP, description=module.HELP + beam_note)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def beam_option_parser() -> argparse.ArgumentParser:
    """A parser holding every option of Beam's pipeline-option classes (as Beam itself builds it)."""
    from apache_beam.options import pipeline_options

    parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # what PipelineOptions.get_all_options uses
    seen: dict[str, type] = {}
    pending = list(pipeline_options.PipelineOptions.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:  # an option two classes define: the first definition stands
            continue
    return parser


def unknown_options(extra: list[str], command_parser: argparse.ArgumentParser) -> list[str]:
    """The options in ``extra`` that Beam does not know either, each with its close matches in the message."""
    beam = beam_option_parser()
    _, unknown = beam.parse_known_args(extra)
    flags = [f for f in unknown if f.startswith("-")] or unknown
    known = [o for p in (command_parser, beam) for a in p._actions for o in a.option_strings if o.startswith("--")]
    problems = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        problems.append(f"{name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return problems


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daco`` console script."""
    logging.basicConfig(level=logging.ERROR)  # Beam warns at import about optional GCP clients
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    module = args._module
    command_parser = parser._subparsers._group_actions[0].choices[args.command]
    if extra and not getattr(module, "BEAM_OPTIONS", False):
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        problems = unknown_options(extra, command_parser)
        if problems:
            command_parser.error(f"unrecognized option(s), known neither to daco {args.command} nor to Beam: "
                                 + "; ".join(problems))
    if any(str(a).startswith("gs://") or "=gs://" in str(a) for a in (argv if argv is not None else sys.argv[1:])):
        from transforms.fileio import settle_gcs_auth

        settle_gcs_auth(log=lambda message: print(f"[daco] {message}", file=sys.stderr, flush=True))
    return int(module.run(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
