"""Hostile input not owned by one stage (docs/reliability.md): an interrupted rebuild leaves a
folder publish refuses, a second writer is refused, a bad --out or a mistyped config value fails
before any work, a runner that loses data is refused, and no run claims a vacuous reconciliation."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main as daco

ROOT = Path(__file__).resolve().parents[1]


def test_an_interrupted_rebuild_is_refused_by_publish_and_locks_out_a_second_writer(tiny_build, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_build / "b", out)  # an earlier, complete build
    assert daco(["publish", str(out), "--repo-id", "org/name", "--dry-run"]) == 0
    shards = str(tiny_build / "a" / "corpus" / "shards" / "*.tar")
    rebuild = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "build", "--config", str(tiny_build / "tiny.yaml"), "--out", str(out),
         "--shards", shards],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "_INCOMPLETE").exists():
            assert rebuild.poll() is None, f"the rebuild ended before marking its folder: {rebuild.stderr.read()}"
            assert time.monotonic() < deadline, "the rebuild never marked its folder"
            time.sleep(0.1)
        with pytest.raises(SystemExit, match="another daco process is writing this folder .*daco build, pid"):
            daco(["build", "--config", str(tiny_build / "tiny.yaml"), "--out", str(out), "--shards", shards])
    finally:
        rebuild.send_signal(signal.SIGKILL)  # the interruption: no handler runs, nothing is cleaned up
        rebuild.wait()
    capsys.readouterr()
    assert daco(["publish", str(out), "--repo-id", "org/name", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "_INCOMPLETE: `daco build` started" in err and "may mix the files of two builds" in err


def test_out_that_is_a_file_fails_before_any_work(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    with pytest.raises(SystemExit, match=f"--out {target}: is a file, not a folder"):
        daco(["build", "--out", str(target)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only folder; the check cannot fail as root")
def test_read_only_out_fails_before_any_work(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(SystemExit, match="is not writable"):
            daco(["build", "--out", str(parent / "out")])
    finally:
        parent.chmod(0o755)


def test_a_runner_without_counters_is_not_reconciled_vacuously():
    import io

    from pipeline.build import reconciliations
    from pipeline.runner import print_summary

    printed = io.StringIO()
    assert print_summary("daco build", {}, reconciliations(), out=printed)
    text = printed.getvalue()
    assert "not reconciled: this runner reports no counters" in text and "ok " not in text
    printed = io.StringIO()
    assert not print_summary("daco build", {"concepts.read": 3}, reconciliations(), out=printed)
    assert "FAIL concepts" in printed.getvalue()


@pytest.mark.parametrize("runner", ["DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner"])
def test_the_dask_runner_is_refused_with_the_reason(runner, tmp_path):
    with pytest.raises(SystemExit, match="not supported: Beam's Dask runner drops data without an error"):
        daco(["concepts", "--out", str(tmp_path), "--runner", runner])


@pytest.mark.parametrize("section, text, named", [
    ("retrieve", "k: eight", "retrieve.k: 'eight' is a str; expected int"),
    ("retrieve", "k: 2.5", "retrieve.k: 2.5 is a float; expected int"),
    ("mllm", "layers: '15'", "mllm.layers: '15' is a str; expected list[int]"),
    ("mllm", "layers: [15, 'x']", "mllm.layers: [15, 'x'] is a list; expected list[int]"),
    ("concepts", "include_polarity_roots: 1", "concepts.include_polarity_roots: 1 is a int; expected bool"),
])
def test_config_values_are_type_checked_before_any_work(tmp_path, section, text, named):
    config = tmp_path / "bad.yaml"
    config.write_text(f"{section}:\n  {text}\n")
    with pytest.raises(SystemExit, match=re.escape(named)):
        daco(["build", "--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_missing_layer_is_one_line(tmp_path, capsys):
    config = tmp_path / "layers.yaml"
    config.write_text("mllm:\n  untrained_size: {num_hidden_layers: 2}\n  layers: [1, 7]\n")
    with pytest.raises(SystemExit) as exc:
        daco(["build", "--config", str(config), "--out", str(tmp_path / "out")])
    message = str(exc.value)
    assert message.startswith("daco build: mllm: layers [1, 7] invalid") and "\n" not in message
    assert not (tmp_path / "out").exists()  # the folder made for the writer lock is gone again


def test_yaml_tags_in_a_config_never_execute(tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "tagged.yaml"
    config.write_text(f"concepts: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SystemExit, match="is not valid YAML"):
        daco(["build", "--config", str(config), "--out", str(tmp_path / "out")])
    assert not marker.exists()


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / "dictionary" / "layer_015.parquet").write_bytes(
        (f / "dictionary" / "layer_015.parquet").read_bytes()[:300]), "layer_015.parquet: not a readable parquet file"),
    (lambda f: (f / "concepts.parquet").write_bytes(b"PAR1 not really"), "concepts.parquet: not a readable parquet file"),
    (lambda f: _nan_direction(f / "dictionary" / "layer_016.parquet"), "layer_016.parquet: 1 direction(s) contain NaN/inf, e.g. ['planted0.n.01@16']"),
])
def test_report_names_a_damaged_file(dataset_folder, tmp_path, capsys, damage, named):
    out = shutil.copytree(dataset_folder, tmp_path / "out")
    damage(out)
    assert daco(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def _nan_direction(path):
    from test_publish import _write_nan_direction

    _write_nan_direction(path)
