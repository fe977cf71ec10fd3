"""The ``daco`` command line: one subcommand per module in ``pipeline/commands/``.

A command module (``train_sae.py`` is ``daco train-sae``) defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args, beam_args) -> int``; ``BEAM_OPTIONS = True`` lets it accept Beam's
pipeline options (``--runner``, ``--direct_num_workers``, ...) after its own.
Command modules import heavy libraries inside ``run`` so that ``--help`` is fast.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daco`` console script."""
    logging.basicConfig(level=logging.ERROR)  # Beam warns at import about optional GCP clients
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    module = args._module
    if extra and not getattr(module, "BEAM_OPTIONS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(module.run(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
