"""`daco publish`: validation of the folder, --dry-run without network, refusal of bad folders."""

import json
import shutil
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (loopback included: publish must not connect at all)."""
    def refuse(self, address):
        raise AssertionError(f"network touched: connect({address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a))


@pytest.fixture
def folder(dataset_folder, tmp_path):
    """A private copy of the good folder, free to damage."""
    return shutil.copytree(dataset_folder, tmp_path / "out")


def _publish(folder, *extra):
    return main(["publish", str(folder), "--repo-id", "daco/daco-400k-test", *extra])


def test_dry_run_lists_every_file_with_its_size_and_the_card(folder, no_network, capsys):
    assert _publish(folder, "--dry-run", "--private") == 0
    out = capsys.readouterr().out
    assert "would upload 7 files" in out and "one commit" in out and "private" in out
    for path in ("README.md", "metadata.json", "concepts.parquet", "stimuli/stimuli-00000-of-00001.parquet",
                 "dictionary/layer_015.parquet", "dictionary/layer_016.parquet", "deadletter/directions.jsonl"):
        size = (folder / path).stat().st_size
        assert f"{size:,}  {path}" in out, path
    assert "config_name: dictionary" in out and "not meaningful" in out  # the card is printed


def test_embeddings_stay_local(folder, no_network, capsys):
    (folder / "embeddings" / "img_emb").mkdir(parents=True)
    (folder / "embeddings" / "img_emb" / "img_emb_0.npy").write_bytes(b"\x93NUMPY")
    assert _publish(folder, "--dry-run") == 0
    assert "img_emb" not in capsys.readouterr().out


def _write_nan_direction(path):
    table = pq.read_table(path)
    directions = table.column("direction").combine_chunks()
    values = directions.flatten().to_numpy(zero_copy_only=False).copy()
    values[5] = float("nan")
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), directions.type.list_size)
    pq.write_table(table.set_column(table.column_names.index("direction"), "direction", column), path)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _mark_incomplete(folder):
    """What an interrupted rebuild leaves: the marker a build writes first and removes last."""
    from transforms.outdir import mark_incomplete

    mark_incomplete(str(folder), "daco build")


def _link_outside(folder, path):
    """Replace ``path`` by a symbolic link to a copy of it outside the folder (publish would upload that)."""
    outside = folder.parent / f"outside-{path.name}"
    (shutil.copytree if path.is_dir() else shutil.copy)(path, outside)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(outside)


@pytest.mark.parametrize("damage, named", [
    (lambda f: _write_nan_direction(f / "dictionary" / "layer_016.parquet"), "layer_016.parquet"),
    (lambda f: (f / "stimuli" / "stimuli-00000-of-00001.parquet").unlink(), "stimuli/*.parquet: missing"),
    (lambda f: (f / "README.md").unlink(), "README.md: missing"),
    (lambda f: (f / "metadata.json").write_text(json.dumps(
        {**json.loads((f / "metadata.json").read_text()), "counts": {"concepts": 4, "stimuli": 16, "directions": 7}})),
     "counts.directions is 7"),
    (lambda f: pq.write_table(pq.read_table(f / "concepts.parquet").drop_columns(["polarity"]), f / "concepts.parquet"),
     "concepts.parquet: missing column(s) ['polarity']"),
    (lambda f: _truncate(f / "dictionary" / "layer_015.parquet"), "layer_015.parquet: not a readable parquet file"),
    (lambda f: _truncate(f / "stimuli" / "stimuli-00000-of-00001.parquet"), "stimuli-00000-of-00001.parquet: not a readable"),
    (lambda f: _mark_incomplete(f), "_INCOMPLETE: `daco build` started"),
    (lambda f: _link_outside(f, f / "deadletter" / "directions.jsonl"), "directions.jsonl: a symbolic link"),
    (lambda f: _link_outside(f, f / "stimuli"), "stimuli: a symbolic link"),
])
def test_a_bad_folder_is_refused_with_the_file_and_the_reason(folder, no_network, capsys, damage, named):
    damage(folder)
    assert _publish(folder, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "refusing to publish" in err and named in err, err
    if "layer_016" in named:
        assert "NaN" in err


def test_upload_failure_is_reported_not_raised(folder, no_network, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _publish(folder) == 1
    err = capsys.readouterr().err
    assert "upload to daco/daco-400k-test failed" in err and "Offline" in err
