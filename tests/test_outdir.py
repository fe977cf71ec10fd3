"""Guarding an output folder: an interrupted rebuild leaves a folder publish refuses, a second
writer is refused while one holds the folder, and a bad --out fails before any work."""

from __future__ import annotations

import os
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
