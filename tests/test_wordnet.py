"""WordNet 3.0 from the three places it can come from, and the error when it is nowhere."""

import shutil

import nltk
import pytest

from transforms import wordnet as wnmod


def _system_wordnet_or_skip():
    if not wnmod._is_database(wnmod.SYSTEM_WORDNET):
        pytest.skip("Debian's wordnet-base is not installed (make test installs it)")
    return wnmod.SYSTEM_WORDNET


def test_lexnames_file_matches_wordnet_numbering():
    lines = wnmod.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[5] == "05\tnoun.animal\t1"
    assert lines[6] == "06\tnoun.artifact\t1"
    assert lines[44] == "44\tadj.ppl\t3"


def test_loads_wordnet_30_with_groups_and_counts():
    wn = wnmod.load_wordnet()
    assert wn.get_version() == "3.0"
    dog = wn.synset("dog.n.01")
    assert dog.lexname() == "noun.animal"
    assert dog.lemmas()[0].count() > 0


def test_wnsearchdir_is_staged_with_generated_lexnames(tmp_path, monkeypatch):
    source = _system_wordnet_or_skip()
    monkeypatch.setenv("DACO_CACHE", str(tmp_path / "cache"))
    root, origin = wnmod.find_wordnet(str(source))
    assert origin == f"WNSEARCHDIR:{source}"
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    reader = wnmod.load_wordnet.__wrapped__(str(source))  # uncached: stages into this test's cache
    staged = root / "corpora" / "wordnet"
    assert (staged / "lexnames").read_text() == wnmod.lexnames_text()
    assert (staged / "data.noun").stat().st_size == (source / "data.noun").stat().st_size
    assert reader.synset("rifle.n.01").lexname() == "noun.artifact"


def test_nltk_data_directory_is_found(tmp_path, monkeypatch):
    source = _system_wordnet_or_skip()
    data = tmp_path / "nltk_data"
    wnmod.stage_database(source, data)  # the layout `nltk.downloader wordnet` leaves (unzipped)
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(data)])
    root, origin = wnmod.find_wordnet()
    assert origin.startswith("nltk:") and root == data


def test_bad_wnsearchdir_names_the_variable(tmp_path):
    with pytest.raises(wnmod.WordNetNotFound, match="WNSEARCHDIR"):
        wnmod.find_wordnet(str(tmp_path))


def test_missing_wordnet_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nothing")])
    monkeypatch.setattr(wnmod, "SYSTEM_WORDNET", tmp_path / "no-system-copy")
    with pytest.raises(wnmod.WordNetNotFound) as err:
        wnmod.find_wordnet()
    assert "apt-get install wordnet-base wordnet-sense-index" in str(err.value)
    assert "nltk.downloader wordnet" in str(err.value)


def test_cli_reports_missing_wordnet_before_running(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nothing")])
    monkeypatch.setattr(wnmod, "SYSTEM_WORDNET", tmp_path / "no-system-copy")
    with pytest.raises(SystemExit) as exit_:
        main(["concepts", "--out", str(tmp_path / "out")])
    assert "nltk.downloader wordnet" in str(exit_.value.code)
    assert not (tmp_path / "out").exists()


def test_stage_is_idempotent(tmp_path):
    source = _system_wordnet_or_skip()
    first = wnmod.stage_database(source, tmp_path)
    mtime = (first / "data.noun").stat().st_mtime_ns
    wnmod.stage_database(source, tmp_path)
    assert (first / "data.noun").stat().st_mtime_ns == mtime
    shutil.rmtree(first)
