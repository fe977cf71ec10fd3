"""The ``daco`` command line: every command rejects an option it does not know (Beam commands included)."""

from __future__ import annotations

import pytest

from pipeline.cli import _command_modules, main as daco

REQUIRED = {"concepts": ["--out", "x"], "corpus": ["--out", "x"], "embed": ["--shards", "x", "--out", "x"],
            "eval": ["--model", "m", "--bench", "b:p", "--out", "x"],
            "label": ["--concepts", "c", "--model", "m", "--out", "x"], "publish": ["--repo-id", "o/n"],
            "retrieve": ["--concepts", "c", "--out", "x"], "steer": ["--prompt", "hi"],
            "train-sae": ["--dictionary", "d", "--out", "x"]}
"""Each command's required options, so that parsing reaches the unknown one."""


@pytest.mark.parametrize("command", [name for name, _ in _command_modules()])
def test_every_command_rejects_an_unknown_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        daco([command, *REQUIRED.get(command, []), "--no-such-option", "1"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_build_rejects_a_typo_and_an_option_it_does_not_have_naming_the_close_matches(capsys):
    with pytest.raises(SystemExit):
        daco(["build", "--clip-allow-untrained"])  # daco embed's option; build takes clip.allow_untrained from its config
    err = capsys.readouterr().err
    assert "known neither to daco build nor to Beam: --clip-allow-untrained" in err
    with pytest.raises(SystemExit):
        daco(["build", "--runer", "DirectRunner", "--direct_num_worker=2"])
    err = capsys.readouterr().err
    assert "--runer (did you mean --runner" in err and "--direct_num_worker (did you mean --direct_num_workers" in err


def test_beam_options_still_reach_beam():
    from pipeline.cli import build_parser, unknown_options

    build = build_parser()._subparsers._group_actions[0].choices["build"]
    assert unknown_options(["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
                            "--experiments=use_runner_v2", "--direct_num_workers", "2"], build) == []
