"""steering.dictionary: writing, loading and validating concept dictionaries."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steering.dictionary import (
    DictionaryError,
    dictionary_schema,
    dictionary_table,
    load_dictionary,
    write_dictionary_parquet,
)

CONCEPTS = [("dog.n.01", "noun.animal", "neutral"), ("gun.n.01", "noun.artifact", "undesirable"),
            ("knife.n.01", "noun.artifact", "undesirable"), ("hug.n.01", "noun.act", "desirable"),
            ("tree.n.01", "noun.plant", "neutral")]


def write_folder(root, d=8, layers=(15, 16), concepts=CONCEPTS, split=True, seed=0):
    """An output folder: concepts.parquet + dictionary/ (one file per layer when split)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"concept_id": [c[0] for c in concepts], "group": [c[1] for c in concepts],
                             "polarity": [c[2] for c in concepts]}), root / "concepts.parquet")
    rows = {layer: [{"concept_id": c[0], "layer": layer, "direction": rng.normal(size=d).astype(np.float32),
                     "n_pos": 27, "n_neg": 27} for c in concepts] for layer in layers}
    if split:
        for layer, layer_rows in rows.items():
            write_dictionary_parquet(root / "dictionary" / f"layer_{layer}.parquet", layer_rows)
    else:
        write_dictionary_parquet(root / "dictionary" / "all.parquet", [r for rs in rows.values() for r in rs])
    return rows


def test_round_trip_follows_concepts_order_and_polarity(tmp_path):
    rows = write_folder(tmp_path / "out")
    (tmp_path / "out" / "metadata.json").write_text(json.dumps({"untrained": True}))
    dic = load_dictionary(tmp_path / "out")
    assert dic.concept_ids == [c[0] for c in CONCEPTS]
    assert dic.groups == [c[1] for c in CONCEPTS]
    assert dic.layers == [15, 16] and dic.d == 8 and len(dic) == 5
    assert dic.metadata == {"untrained": True}
    for layer in (15, 16):
        mat = dic.directions(layer)
        assert mat.dtype == torch.float32 and mat.shape == (5, 8)
        expected = np.stack([r["direction"] for r in rows[layer]])
        np.testing.assert_array_equal(mat.numpy(), expected)
        np.testing.assert_allclose(dic.stats(layer)["norm"], np.linalg.norm(expected, axis=1), rtol=1e-6)
        np.testing.assert_allclose(dic.directions(layer, unit=True).norm(dim=1).numpy(), 1.0, rtol=1e-6)
    assert dic.undesirable() == [1, 2] and dic.desirable() == [3]
    assert dic.indices(["knife.n.01", "dog.n.01"]) == [2, 0]


def test_layers_selection_and_single_file(tmp_path):
    write_folder(tmp_path / "out", split=False)
    dic = load_dictionary(str(tmp_path / "out"), layers=[16])
    assert dic.layers == [16]
    with pytest.raises(KeyError, match="loaded layers: \\[16\\]"):
        dic.directions(15)
    with pytest.raises(KeyError, match="available layers: \\[15, 16\\]"):
        load_dictionary(tmp_path / "out", layers=[3])


def test_writer_is_deterministic_and_order_free(tmp_path):
    rows = write_folder(tmp_path / "a")[15]
    write_dictionary_parquet(tmp_path / "b.parquet", list(reversed(rows)))
    write_dictionary_parquet(tmp_path / "c.parquet", rows)
    assert (tmp_path / "b.parquet").read_bytes() == (tmp_path / "c.parquet").read_bytes()
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.schema == dictionary_schema(8)
    assert table.column("concept_id").to_pylist() == sorted(c[0] for c in CONCEPTS)


def test_writer_rejects_bad_rows():
    good = {"concept_id": "a", "layer": 1, "direction": [1.0, 0.0], "n_pos": 1, "n_neg": 1}
    with pytest.raises(DictionaryError, match="NaN"):
        dictionary_table([{**good, "direction": [float("nan"), 0.0]}])
    with pytest.raises(DictionaryError, match="dimension 3"):
        dictionary_table([good, {**good, "concept_id": "b", "direction": [1.0, 2.0, 3.0]}])
    with pytest.raises(DictionaryError, match="duplicate"):
        dictionary_table([good, good])


def test_unknown_names_suggest_closest(tmp_path):
    write_folder(tmp_path / "out")
    dic = load_dictionary(tmp_path / "out")
    with pytest.raises(KeyError) as err:
        dic.indices(["knif.n.01"])
    assert "knif.n.01" in str(err.value) and "knife.n.01" in str(err.value)


def _overwrite_direction(path, concept, value):
    table = pq.read_table(path)
    mat = np.asarray(table.column("direction").combine_chunks().flatten()).reshape(len(table), -1).copy()
    mat[table.column("concept_id").to_pylist().index(concept)] = value
    col = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), mat.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("direction"), "direction", col), path)


def test_nan_direction_names_file_and_concept(tmp_path):
    write_folder(tmp_path / "out")
    bad = tmp_path / "out" / "dictionary" / "layer_16.parquet"
    _overwrite_direction(bad, "gun.n.01", np.inf)
    with pytest.raises(DictionaryError) as err:
        load_dictionary(tmp_path / "out")
    assert "layer_16.parquet" in str(err.value) and "gun.n.01@16" in str(err.value)


def test_wrong_dimension_names_both_files(tmp_path):
    write_folder(tmp_path / "out", layers=(15,))
    write_dictionary_parquet(tmp_path / "out" / "dictionary" / "layer_16.parquet",
                             [{"concept_id": c[0], "layer": 16, "direction": np.ones(6), "n_pos": 1, "n_neg": 1}
                              for c in CONCEPTS])
    with pytest.raises(DictionaryError, match="layer_16.parquet: directions have dimension 6.*layer_15.parquet has 8"):
        load_dictionary(tmp_path / "out")


def test_schema_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dictionary(tmp_path / "nowhere")
    write_folder(tmp_path / "out")
    (tmp_path / "out" / "concepts.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="concepts.parquet is missing"):
        load_dictionary(tmp_path / "out")
    write_folder(tmp_path / "out2")
    path = tmp_path / "out2" / "dictionary" / "layer_15.parquet"
    pq.write_table(pq.read_table(path).drop(["n_neg"]), path)
    with pytest.raises(DictionaryError, match="layer_15.parquet: missing column\\(s\\) \\['n_neg'\\]"):
        load_dictionary(tmp_path / "out2")
    empty = tmp_path / "out3"
    write_folder(empty)
    for f in (empty / "dictionary").glob("*.parquet"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        load_dictionary(empty)


def test_missing_concepts_are_reported_not_silent(tmp_path):
    write_folder(tmp_path / "out", concepts=CONCEPTS[:4])
    # concepts.parquet lists a fifth concept that has no direction
    pq.write_table(pa.table({"concept_id": [c[0] for c in CONCEPTS], "group": [c[1] for c in CONCEPTS],
                             "polarity": [c[2] for c in CONCEPTS]}), tmp_path / "out" / "concepts.parquet")
    with pytest.warns(UserWarning, match="tree.n.01"):
        dic = load_dictionary(tmp_path / "out")
    assert dic.missing == ["tree.n.01"] and len(dic) == 4


def test_unused_reserve_concepts_are_not_missing(tmp_path):
    """Reserve rows (next-ranked candidates retrieval did not need) have no direction by design."""
    import warnings

    write_folder(tmp_path / "out", concepts=CONCEPTS[:4])
    pq.write_table(pa.table({"concept_id": [c[0] for c in CONCEPTS], "group": [c[1] for c in CONCEPTS],
                             "polarity": [c[2] for c in CONCEPTS], "reserve": [False] * 4 + [True]}),
                   tmp_path / "out" / "concepts.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dic = load_dictionary(tmp_path / "out")
    assert dic.missing == [] and len(dic) == 4 and "tree.n.01" not in dic.concept_ids


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DictionaryError) as err:
        load_dictionary("daco-test-owner/daco-400k-missing")
    assert "daco-test-owner/daco-400k-missing" in str(err.value) and "local path" in str(err.value)


def test_steering_does_not_import_beam_or_pipeline():
    code = ("import sys, steering\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'pipeline', 'transforms')]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
