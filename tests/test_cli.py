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


# ------------------------------------------------------------------ one way to override a config


def _args(*argv):
    from pipeline.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_override_skips_flags_not_given_checks_types_and_validates_again():
    from steering.config import NULL
    from transforms.clip_model import ClipConfig
    from transforms.retrieve import RetrieveConfig

    base = ClipConfig(batch_size=16, seed=3)
    changed = base.override({"batch_size": None, "seed": 7, "precision": None}, "command line: clip")
    assert (changed.batch_size, changed.seed, changed.precision) == (16, 7, "auto")  # None: the flag was not given
    assert (base.batch_size, base.seed) == (16, 3)  # a copy; the original is unchanged
    with pytest.raises(ValueError, match=r"command line: clip\.batch_size: '8' is a str; expected int"):
        base.override({"batch_size": "8"}, "command line: clip")
    with pytest.raises(ValueError, match=r"command line: clip\.batch_size must be >= 1"):  # the class's own validate
        base.override({"batch_size": 0}, "command line: clip")
    with pytest.raises(ValueError, match=r"command line: clip: unknown option\(s\) \['batch'\]"):
        base.override({"batch": 8}, "command line: clip")
    assert RetrieveConfig().min_evidence is not None
    assert RetrieveConfig().override({"min_evidence": NULL}, "command line: retrieve").min_evidence is None


def test_a_command_takes_the_config_file_then_the_flags_through_override(tmp_path):
    from pipeline.commands.embed import clip_config_from_args

    config = tmp_path / "c.yaml"
    config.write_text("clip:\n  batch_size: 16\n  seed: 4\n")
    common = ["embed", "--shards", "s", "--out", "o", "--config", str(config)]
    cfg = clip_config_from_args(_args(*common, "--clip-seed", "9"))
    assert (cfg.batch_size, cfg.seed) == (16, 9)  # the file's value where no flag was given
    with pytest.raises(SystemExit, match=r"command line: clip\.batch_size must be >= 1, got 0"):
        daco([*common, "--clip-batch-size", "0"])  # before any pipeline work
    config.write_text("clip:\n  batch_size: 0\n")
    with pytest.raises(SystemExit, match=r"c\.yaml: clip\.batch_size must be >= 1"):
        clip_config_from_args(_args(*common))


def test_steer_fit_options_come_from_the_defences_section_then_the_flags(tmp_path):
    from pipeline.commands.steer import _fit_config
    from steering.steerers import DEFAULT_LAYERS, IARFitConfig, IARSteerer, MARSSteerer, RefusalDirectionSteerer

    config = tmp_path / "d.yaml"
    config.write_text("defences:\n  iar:\n    alpha: 5.0\n    k: 3\n    layers: [1]\n  refusal:\n    skip_last: 0.4\n")
    steer = ["steer", "--prompt", "hi", "--config", str(config)]
    iar = _fit_config(IARSteerer, _args(*steer, "--iar-k", "2"))
    assert isinstance(iar, IARFitConfig) and (iar.alpha, iar.k, iar.layers, iar.level) == (5.0, 2, [1], "head")
    assert _fit_config(IARSteerer, _args(*steer, "--layers", "1-2")).layers == [1, 2]  # --layers beats the file
    assert _fit_config(MARSSteerer, _args(*steer)).layers == list(DEFAULT_LAYERS)  # neither: steer's 15-19
    refusal = _fit_config(RefusalDirectionSteerer, _args(*steer, "--refusal-induce-threshold=-inf"))
    assert (refusal.skip_last, refusal.induce_threshold, refusal.mode) == (0.4, float("-inf"), "addition")
    with pytest.raises(SystemExit, match=r"command line: iar\.k must be >= 1, got 0"):
        daco(["steer", "--untrained-family", "qwen2", "--prompt", "hi", "--method", "iar", "--iar-k", "0"])
    config.write_text("defences:\n  iar:\n    kk: 3\n")
    with pytest.raises(SystemExit, match=r"d\.yaml: defences\.iar: unknown option\(s\) \['kk'\]"):
        daco(["steer", "--untrained-family", "qwen2", "--prompt", "hi", "--method", "iar", "--config", str(config)])
    config.write_text("defences:\n  daco:\n    k: 3\n")
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['daco'\]; the fitted defences are"):
        daco(["eval", "--model", "untrained:qwen2", "--bench", "b:p", "--out", str(tmp_path / "o"),
              "--config", str(config)])


def test_retrieve_flags_go_through_override_and_none_turns_evidence_off():
    from pipeline.commands.retrieve import _retrieve_config

    cfg = _retrieve_config(_args("retrieve", "--concepts", "c", "--out", "x", "--min-evidence", "none", "--k", "5"))
    assert (cfg.min_evidence, cfg.k) == (None, 5)
    assert _retrieve_config(_args("retrieve", "--concepts", "c", "--out", "x")).min_evidence == 3.0  # not given
    with pytest.raises(SystemExit, match=r"command line: retrieve\.k"):
        _retrieve_config(_args("retrieve", "--concepts", "c", "--out", "x", "--k", "0"))
