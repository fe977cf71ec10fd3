"""The Dataflow path's storage: `daco build`, `retrieve`, `report` and `publish --dry-run` on gs://
folders, served by a real GCS emulator (gcp-storage-emulator) on 127.0.0.1 behind the real
google-cloud-storage client that Beam's GCS filesystem uses. Nothing leaves the loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main as daco

BUCKET = "daco-test"


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on a free loopback port (in memory) with bucket ``daco-test``; sets
    STORAGE_EMULATOR_HOST for the module, so Beam's gs:// filesystem talks to it anonymously."""
    from gcp_storage_emulator.server import create_server

    from transforms.fileio import settle_gcs_auth

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    settle_gcs_auth()
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


def _local_files(folder: Path, patterns) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for pattern in patterns for p in folder.glob(pattern)
            if p.is_file()}


def _remote_files(base: str, patterns) -> dict[str, bytes]:
    from transforms import fileio

    return {path[len(base) + 1:]: fileio.read_bytes(path) for pattern in patterns for path in fileio.list_files(base, pattern)}


COMPARED = ("concepts.parquet", "concept_embeddings.npy", "stimuli/*.parquet", "dictionary/*.parquet",
            "embeddings/*/*", "embeddings/embeddings.json", "deadletter/*.jsonl")


@pytest.fixture(scope="module")
def gcs_build(gcs, tiny_build):
    """The tiny build of conftest.py's ``b/`` (reading a's shards) run again with its shards and its
    output on gs://; returns (gs:// output folder, gs:// shard pattern, config path)."""
    from transforms import fileio

    shards = f"{gcs}/shards"
    assert fileio.upload_tree(tiny_build / "a" / "corpus" / "shards", shards) >= 2
    config = str(tiny_build / "tiny.yaml")
    out = f"{gcs}/out"
    assert daco(["build", "--config", config, "--shards", f"{shards}/*.tar", "--out", out]) == 0
    return out, f"{shards}/*.tar", config


def test_build_on_gcs_writes_the_same_bytes_and_a_complete_card(gcs_build, tiny_build):
    from transforms import fileio
    from transforms.write import read_card_front_matter

    out, _shards, _config = gcs_build
    local = tiny_build / "b"
    expected = _local_files(local, COMPARED)
    assert len(expected) > 10 and any(name.startswith("dictionary/") for name in expected)
    assert _remote_files(out, COMPARED) == expected
    front = read_card_front_matter(fileio.read_text(fileio.join(out, "README.md")))
    assert front == read_card_front_matter((local / "README.md").read_text())
    assert {c["config_name"] for c in front["configs"]} == {"concepts", "stimuli", "dictionary"}
    assert all(split["num_examples"] > 0 and split["num_bytes"] > 0 for info in front["dataset_info"]
               for split in info["splits"])
    metadata = json.loads(fileio.read_text(fileio.join(out, "metadata.json")))
    assert metadata["shards"].startswith("gs://") and metadata["embeddings"] == "embeddings"
    assert not fileio.exists(fileio.join(out, "_INCOMPLETE"))


def test_report_and_publish_dry_run_on_gcs(gcs_build, capsys):
    from transforms import fileio

    out, _shards, _config = gcs_build
    assert daco(["report", out]) == 0
    index = fileio.read_text(fileio.join(out, "report", "index.html"))
    assert "DACO-400K run report" in index
    assert fileio.list_files(out, "report/thumbs/*/*.jpg"), "thumbnails are read from the gs:// shards"
    assert "## Figures" in fileio.read_text(fileio.join(out, "README.md"))
    capsys.readouterr()
    assert daco(["publish", out, "--repo-id", "org/daco-test", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in ("README.md", "metadata.json", "concepts.parquet", "report/figures/concept_map.png"):
        assert f"  {name}" in printed
    assert "configs:" in printed


def test_publish_names_the_gcs_file_it_refuses(gcs_build, capsys):
    from transforms import fileio

    out, _shards, _config = gcs_build
    broken = f"{out}-broken"
    for path in fileio.list_files(out, "*") + fileio.list_files(out, "*/*.parquet"):
        data = fileio.read_bytes(path)
        rel = path[len(out) + 1:]
        fileio.write_bytes_atomic(fileio.join(broken, rel), data[: len(data) // 2] if rel == "concepts.parquet" else data)
    capsys.readouterr()
    assert daco(["publish", broken, "--repo-id", "org/daco-test", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{broken}/concepts.parquet: not a readable parquet file" in err and "daco-remote-" not in err


def test_retrieve_on_gcs_writes_the_same_bytes_as_locally(gcs_build, gcs, tiny_build, tmp_path):
    out, shards, config = gcs_build
    retrieved, local = f"{gcs}/retrieve", tmp_path / "retrieve"
    assert daco(["retrieve", "--concepts", f"{out}/concepts.parquet", "--shards", shards, "--out", retrieved,
                 "--config", config]) == 0
    assert daco(["retrieve", "--concepts", str(tiny_build / "b" / "concepts.parquet"), "--shards",
                 str(tiny_build / "a" / "corpus" / "shards" / "*.tar"), "--out", str(local), "--config", config]) == 0
    patterns = ("stimuli/*.parquet", "concept_embeddings.npy", "embeddings/*/*", "deadletter/*.jsonl")
    expected = _local_files(local, patterns)
    assert len(expected) > 5 and _remote_files(retrieved, patterns) == expected


def test_without_credentials_gcs_access_turns_anonymous_at_once_and_says_why(tmp_path):
    """No emulator, no credentials: one lookup (the GCE check off, so nothing leaves the machine),
    then a line saying why and anonymous access, instead of Beam's silent ~30 s of retries."""
    code = ("from transforms.fileio import settle_gcs_auth\n"
            "from apache_beam.internal.gcp import auth\n"
            "settle_gcs_auth(log=print)\n"
            "print('cached', auth._Credentials._credentials_init, auth._Credentials._credentials)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no Google Cloud credentials" in done.stdout and "anonymously" in done.stdout
    assert "cached True None" in done.stdout


def test_the_embedded_corpus_of_a_gcs_build_lands_under_out(gcs, tiny_build):
    """Without --shards, the corpus is drawn locally (img2dataset over 127.0.0.1) and copied to
    OUT/corpus on the bucket: no local 'gs:/...' folder."""
    import dataclasses

    from pipeline.build import _build_corpus, load_build_config
    from transforms import fileio

    cfg = load_build_config(str(tiny_build / "tiny.yaml"), None)
    cfg = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, n=8))
    pattern = _build_corpus(cfg, f"{gcs}/corpus-out", str(tiny_build / "a" / "concepts.parquet"))
    assert pattern == f"{gcs}/corpus-out/corpus/shards/*.tar"
    assert fileio.list_files(f"{gcs}/corpus-out/corpus/shards", "*.tar")
    assert fileio.exists(f"{gcs}/corpus-out/corpus/corpus.json") and not Path("gs:").exists()
