"""Subcommands of ``daco``; each module is one command (see pipeline/cli.py)."""
